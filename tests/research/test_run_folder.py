"""A run folder never loses a step, never holds NaN, never restores into the wrong model, and has one run at a time.

The kill test runs the main job in subprocesses (one device, as a user's job) and kills it with SIGKILL while it
compiles, between steps and while a checkpoint is being written; the resumed run's ``metrics.jsonl`` must equal an
uninterrupted run's, step for step and bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import get_preset
from research.checkpoint import Checkpointer, abstract_like
from research.data.text_corpus import CorpusError, collect_text_files
from research.metrics import read_metrics
from research.run_lock import RunLock
from research.train import TrainError, train_and_evaluate

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2", "--seq-len", "32", "--batch-size", "8",
         "--eval-batches", "1", "--eval-every", "1000"]


def _small(**overrides):
  base = get_preset("tiny")
  cfg = dataclasses.replace(base, seq_len=32, batch_size=8, eval_batches=1, eval_every=1000, log_every=3,
                            checkpoint_every=4, model=dataclasses.replace(base.model, d_model=32, num_heads=2,
                                                                          num_kv_heads=2))
  return dataclasses.replace(cfg, **overrides)


def _train_rows(workdir: Path) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]


class _Job:
  """The main job in a subprocess, its output collected line by line."""

  def __init__(self, workdir: Path, steps: int, *extra: str):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "-m", "experiments.train", "--config", "tiny", "--workdir", str(workdir),
               "--steps", str(steps), "--log-every", "3", *SMALL, *extra]
    self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.lines: list[str] = []
    threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

  def wait_for(self, predicate, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if predicate():
        return True
      time.sleep(0.001)
    return predicate()

  def kill(self) -> None:
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(timeout=30)

  def finish(self) -> str:
    self.proc.wait(timeout=300)
    time.sleep(0.1)
    return "".join(self.lines)


def test_sigkill_while_compiling_between_steps_and_mid_save_loses_no_step(tmp_path):
  steps = 24  # log every 3, checkpoint every 4: the two periods do not divide each other
  reference = _Job(tmp_path / "straight", steps, "--checkpoint-every", "4")
  assert "done: step 24" in reference.finish()

  workdir = tmp_path / "killed"
  job = _Job(workdir, steps, "--checkpoint-every", "4")
  assert job.wait_for(lambda: any(line.startswith("model:") for line in job.lines))
  job.kill()  # while the step compiles (its memory report comes after compiling)
  assert not any("XLA memory analysis" in line for line in job.lines)

  job = _Job(workdir, steps, "--checkpoint-every", "4")
  assert job.wait_for(lambda: any(line.startswith("step 15/") for line in job.lines))
  job.kill()  # between steps, after checkpoint 12, with steps 13-15 logged but not checkpointed

  job = _Job(workdir, steps, "--checkpoint-every", "1")  # a save at every step: kill one while it is written
  checkpoints = workdir / "checkpoints"
  caught = job.wait_for(lambda: any("tmp" in p.name for p in checkpoints.iterdir()))
  job.kill()
  assert caught, "no checkpoint was being written when the job was killed"

  output = _Job(workdir, steps, "--checkpoint-every", "4").finish()
  assert "done: step 24" in output and "resumed from checkpoint at step" in output
  rows = _train_rows(workdir)
  assert [s for s, _ in rows] == list(range(1, steps + 1))  # every step exactly once, in order
  assert rows == _train_rows(tmp_path / "straight")  # bit for bit
  assert not list(checkpoints.glob("*tmp*")), "a half-written checkpoint was left behind"


def test_a_second_run_on_a_busy_workdir_stops_with_one_line_and_a_stale_lock_is_taken_over(tmp_path):
  with RunLock(tmp_path, log=lambda s: None):
    with pytest.raises(TrainError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on "):
      train_and_evaluate(_small(steps=1), tmp_path, log=lambda s: None)
  assert not (tmp_path / "config.json").exists()
  (tmp_path / "run.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))
  logs = []
  train_and_evaluate(_small(steps=1), tmp_path, log=logs.append)
  assert "took over the lock of a run that is no longer running (pid 999999 on gone since yesterday)" in logs


def test_non_finite_loss_stops_the_run_before_any_checkpoint_holds_it(tmp_path):
  cfg = _small(steps=40, learning_rate=1e4, warmup_steps=0, checkpoint_every=2, log_every=5)
  with pytest.raises(TrainError, match=r"non-finite training metrics at step \d+ \(.*nan.*\); the run stopped, "
                                       r"its newest checkpoint is step \d+ \(resume from it with a lower"):
    train_and_evaluate(cfg, tmp_path, log=lambda s: None)
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  step = checkpointer.latest_step()
  assert step is not None
  state, _ = checkpointer.restore(step, abstract_like(_initial_state(cfg)))
  assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state))
  assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train")


def _initial_state(cfg):
  from research.train import build_model, build_regime
  model = build_model(cfg)
  return build_regime(cfg, model).init_state(model.params)


def test_skip_nonfinite_keeps_the_state_and_stops_past_the_budget(tmp_path):
  cfg = _small(steps=40, learning_rate=1e4, warmup_steps=0, checkpoint_every=2, log_every=1, skip_nonfinite=3)
  with pytest.raises(TrainError, match=r"non-finite loss or gradient at step \d+: 4 updates skipped, more than "
                                       r"--skip-nonfinite 3"):
    train_and_evaluate(cfg, tmp_path, log=lambda s: None)
  rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  skipped = [r for r in rows if r.get("skipped")]
  assert len(skipped) == 3 and all("grad_norm" not in r for r in skipped)  # recorded, without their NaN
  assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
  state, _ = Checkpointer(tmp_path / "checkpoints").restore(Checkpointer(tmp_path / "checkpoints").latest_step(),
                                                            abstract_like(_initial_state(cfg)))
  assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state))


def test_schedule_changes_on_resume_are_refused_unless_accepted(tmp_path):
  train_and_evaluate(_small(steps=2), tmp_path, log=lambda s: None)
  with pytest.raises(TrainError, match=r"different config \(steps: saved 2, now 4\); use a fresh --workdir, the "
                                       r"saved settings or --accept-change KEY"):
    train_and_evaluate(_small(steps=4), tmp_path, log=lambda s: None)
  with pytest.raises(TrainError, match=r"learning_rate: saved 0.003, now 0.001"):
    train_and_evaluate(_small(steps=2, learning_rate=1e-3), tmp_path, log=lambda s: None)
  with pytest.raises(TrainError, match="--accept-change model: only run settings"):
    train_and_evaluate(_small(steps=4), tmp_path, accept_changes=("model",), log=lambda s: None)
  logs = []
  train_and_evaluate(_small(steps=4), tmp_path, accept_changes=("steps",), log=logs.append)
  assert "accepted changes: steps 2 -> 4 (the learning-rate schedule differs from step 2 on)" in logs


def test_the_checkpoint_knows_its_model_when_config_json_is_gone(tmp_path):
  train_and_evaluate(_small(steps=2), tmp_path, log=lambda s: None)
  saved = (tmp_path / "config.json").read_text()
  swa = dataclasses.replace(_small(steps=2), model=dataclasses.replace(_small().model, layers=("swa",) * 3))
  (tmp_path / "config.json").unlink()
  with pytest.raises(TrainError, match=r"checkpoint 2 in .* holds a run with a different config \(model.layers: "
                                       r"saved \['attn', 'attn', 'attn'\], now \['swa', 'swa', 'swa'\]"):
    train_and_evaluate(swa, tmp_path, log=lambda s: None)
  assert not (tmp_path / "config.json").exists()  # written only after a successful restore
  (tmp_path / "config.json").write_text(saved)
  with pytest.raises(TrainError, match="model.layers: saved"):
    train_and_evaluate(swa, tmp_path, log=lambda s: None)
  assert (tmp_path / "config.json").read_text() == saved


def test_an_unreadable_data_subfolder_is_named(tmp_path, monkeypatch):
  (tmp_path / "texts" / "locked").mkdir(parents=True)
  (tmp_path / "texts" / "locked" / "a.txt").write_text("hello")
  real_scandir = os.scandir

  def scandir(path="."):
    if str(path).endswith("locked"):
      raise PermissionError(13, "Permission denied", str(path))
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir)
  with pytest.raises(CorpusError, match=r"data folder '.*texts': cannot read .*locked \(permission denied or gone\)"):
    collect_text_files([tmp_path / "texts"])


def test_init_from_starts_from_another_runs_newest_checkpoint(tmp_path):
  first = train_and_evaluate(_small(steps=3), tmp_path / "a", log=lambda s: None)
  logs = []
  frozen = _small(steps=1, learning_rate=0.0, init_from=str(tmp_path / "a"))  # lr 0: the loaded params stay
  second = train_and_evaluate(frozen, tmp_path / "b", log=logs.append)
  assert f"initialised from {tmp_path / 'a'} at step 3" in logs
  assert second["final_eval_loss"] == first["final_eval_loss"]
  other = dataclasses.replace(frozen, model=dataclasses.replace(frozen.model, d_model=48))
  with pytest.raises(TrainError, match=r"--init-from .*: that run trained another model"):
    train_and_evaluate(other, tmp_path / "c", log=lambda s: None)
  with pytest.raises(TrainError, match="not a run folder with a readable config.json"):
    train_and_evaluate(dataclasses.replace(frozen, init_from=str(tmp_path / "nowhere")), tmp_path / "d",
                       log=lambda s: None)
