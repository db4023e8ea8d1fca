"""Two CPU processes x 4 devices, joined by ``jax.distributed.initialize`` on localhost, train the ``diloco`` regime
through the shared loop and end with the same global params, bit for bit, as the same run on 8 devices of one
process (spec oracle 23). Run as a script, this file is one of the two processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _config():
  from optim.diloco import DiLoCoConfig
  from research.models import ModelConfig
  from research.train import TrainConfig
  diloco = DiLoCoConfig(replicas=4, sync_every=4, fragments=2, overlap_steps=1, alpha=0.5, wire="e2m1")
  return TrainConfig(model=ModelConfig(layers=("attn", "attn"), d_model=32, num_heads=2, num_kv_heads=2),
                     seq_len=32, batch_size=16, steps=STEPS, warmup_steps=2, eval_every=STEPS, eval_batches=2,
                     checkpoint_every=STEPS, log_every=4, regime="diloco", plugins={"diloco": diloco})


def _final_global_params(workdir: Path):
  import jax

  from research.checkpoint import Checkpointer
  from research.train import build_model, build_regime
  cfg = _config()
  regime = build_regime(cfg, build_model(cfg, abstract=True))
  with Checkpointer(workdir / "checkpoints") as checkpointer:
    state, _ = checkpointer.restore(STEPS, regime.abstract_state())
  return jax.device_get(state["global_params"])


def test_two_processes_of_four_devices_end_with_the_8_device_run_global_params(tmp_path):
  import jax
  import numpy as np

  import optim  # noqa: F401
  from research.train import build_model, train_and_evaluate

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / "two_processes")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)
  assert "diloco sync after step 2: fragment 0/2" in outputs[0]  # process 0 reports

  train_and_evaluate(_config(), tmp_path / "one_process", log=lambda line: None)
  ours, theirs = _final_global_params(tmp_path / "two_processes"), _final_global_params(tmp_path / "one_process")
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  start = jax.device_get(build_model(_config()).params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(start)))


def _worker(process_id: int, port: int, workdir: str) -> None:
  import jax
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  import optim  # noqa: F401
  from research.train import train_and_evaluate
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  train_and_evaluate(_config(), workdir)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
