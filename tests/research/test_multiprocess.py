"""Multi-host training on one machine: two CPU processes x 4 devices joined by ``jax.distributed`` on localhost train
the tiny LM on a data=2 x fsdp=4 mesh and match the single-process 8-device run of the same mesh."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from experiments.configs import get_preset
from research.metrics import read_metrics
from research.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--d-model", "64", "--num-heads", "4", "--num-kv-heads", "4", "--layers", "attn,attn", "--seq-len", "32",
         "--batch-size", "16", "--steps", "4", "--eval-batches", "1", "--log-every", "1", "--checkpoint-every", "2",
         "--mesh", "data=2,fsdp=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_on_a_2x4_mesh_match_the_8_device_run(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONUNBUFFERED": "1"}
  command = [sys.executable, "-m", "experiments.train", "--config", "tiny", "--workdir", str(tmp_path / "two"),
             *FLAGS, "--coordinator", f"localhost:{port}", "--num-processes", "2"]
  procs = [subprocess.Popen([*command, "--process-id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "8 device(s)" in outputs[0] and "done: step 4" in outputs[0]

  base = get_preset("tiny")
  one = dataclasses.replace(base, seq_len=32, batch_size=16, steps=4, eval_batches=1, log_every=1, checkpoint_every=2,
                            mesh="data=2,fsdp=4", model=dataclasses.replace(base.model, d_model=64, num_heads=4,
                                                                            num_kv_heads=4, layers=("attn", "attn")))
  train_and_evaluate(one, tmp_path / "one", log=lambda s: None)
  losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"]
  assert len(losses(tmp_path / "two")) == 4  # process 0 alone wrote the metrics, each step once
  np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "4"]
