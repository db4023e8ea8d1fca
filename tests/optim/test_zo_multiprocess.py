"""ZO-SPSA across processes: two CPU processes x 4 devices joined by ``jax.distributed`` on localhost (8 workers, the
one-byte codes all-gathered between the processes) end with the same ``param_sha256`` as the single-process
8-device run of the same seeds, and their ledger replays to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from experiments.train import parser
from experiments.zo_replay import replay_workdir
from optim.zo.ledger import read_ledger
from research.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--config", "tiny_zo", "--init-from", "none", "--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2",
         "--layers", "attn", "--seq-len", "16", "--batch-size", "16", "--steps", "4", "--eval-batches", "1",
         "--eval-every", "2", "--log-every", "1", "--checkpoint-every", "2", "--learning-rate", "0.02",
         "--zo-spsa.check-every", "2", "--mezo-sgd.num-samples", "2"]


def _two_processes(workdir: Path, flags: list[str]) -> list[str]:
  """The outputs of ``experiments.train`` run by two processes of 4 CPU devices each, joined on a free local port."""
  with socket.create_server(("localhost", 0)) as probe:
    coordinator = f"localhost:{probe.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  launched = [subprocess.Popen([sys.executable, "-m", "experiments.train", "--workdir", str(workdir), *flags,
                                "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(rank)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for rank in range(2)]
  outputs = [process.communicate(timeout=900)[0] for process in launched]
  failed = [out[-3000:] for process, out in zip(launched, outputs, strict=True) if process.returncode]
  assert not failed, failed
  return outputs


def test_two_processes_of_four_workers_match_the_8_device_run(tmp_path):
  outputs = _two_processes(tmp_path / "two", FLAGS)
  assert "8 device(s)" in outputs[0] and "done: step 4" in outputs[0]
  assert "zo check at step 4" in outputs[0] and "on all 8 workers" in outputs[0]
  two = json.loads((tmp_path / "two" / "summary.json").read_text())

  cfg, _ = parser().parse(FLAGS)
  one = train_and_evaluate(cfg, tmp_path / "one", log=lambda s: None)
  print("two processes:", two["param_sha256"], "| one process:", one["param_sha256"])
  assert two["param_sha256"] == one["param_sha256"]
  assert two["bytes_per_worker_per_step"] == one["bytes_per_worker_per_step"] == 2
  ledger = read_ledger(tmp_path / "two" / "zo" / "ledger.bin")  # written once, by process 0
  assert [r.step for r in ledger.rounds] == [0, 1, 2, 3]
  assert (tmp_path / "two" / "zo" / "ledger.bin").read_bytes() == (tmp_path / "one" / "zo" / "ledger.bin").read_bytes()
  assert replay_workdir(tmp_path / "two", log=lambda s: None)["param_sha256"] == two["param_sha256"]
