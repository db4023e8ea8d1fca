"""The benchmarks' shared timer: with a timing lock, a timing (or a peer's child process) waits while another
process times."""
import fcntl
import json
import sys
import threading
import time

from benchmarks import linear_attention
from benchmarks.child import rows_from_child


def test_a_timing_waits_for_the_lock_and_runs_once_it_is_free(tmp_path, monkeypatch):
  lock = tmp_path / "gpu.lock"
  monkeypatch.setattr(linear_attention, "TIMING_LOCK", str(lock))
  calls, result = [], {}
  timer = threading.Thread(target=lambda: result.setdefault("ms", linear_attention._median_ms(
      lambda: calls.append(time.perf_counter()), warmup=1, iters=3)))
  with open(lock, "a") as other:  # another process's timing (a separate open file description conflicts likewise)
    fcntl.flock(other, fcntl.LOCK_EX)
    timer.start()
    time.sleep(0.5)
    assert not calls, "the timer ran while another held the lock"
    fcntl.flock(other, fcntl.LOCK_UN)
  timer.join(timeout=30)
  assert len(calls) == 4 and result["ms"] >= 0.0


def test_without_a_lock_the_timer_runs_at_once(monkeypatch):
  monkeypatch.setattr(linear_attention, "TIMING_LOCK", "")
  assert linear_attention._median_ms(lambda: None, warmup=0, iters=2) >= 0.0


def test_a_peer_child_process_waits_for_the_lock(tmp_path, monkeypatch):
  lock, child_json = tmp_path / "gpu.lock", tmp_path / "child.json"
  monkeypatch.setattr(linear_attention, "TIMING_LOCK", str(lock))
  write = f"import json; json.dump({{'rows': [{{'op': 'peer'}}]}}, open({str(child_json)!r}, 'w'))"
  cmd = [sys.executable, "-c", write]
  result = {}
  child = threading.Thread(target=lambda: result.setdefault("rows", rows_from_child(cmd, str(child_json), "peer")))
  with open(lock, "a") as other:
    fcntl.flock(other, fcntl.LOCK_EX)
    child.start()
    time.sleep(1.0)
    assert not child_json.exists(), "the child ran while another held the lock"
    fcntl.flock(other, fcntl.LOCK_UN)
  child.join(timeout=60)
  assert result["rows"] == [{"op": "peer"}] and json.loads(child_json.read_text())["rows"] == result["rows"]
