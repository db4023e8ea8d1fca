"""The ``diloco`` regime in the training loop on 8 fake CPU devices (4 replicas x 2-way data parallel): it equals
data-parallel SGD where the algebra says so (spec oracle 17), refuses replicas initialised differently (oracle 22),
reports its bytes, and a SIGKILLed run resumes on the same loss curve bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optim  # noqa: F401  (registers the diloco regime)
from optim.diloco import DiLoCoConfig
from optim.diloco.wire import FORMATS, wire_bytes
from research.models import ModelConfig
from research.optimizers import AdamWConfig, SGDConfig
from research.train import TrainConfig, TrainError, build_model, build_regime

REPO = Path(__file__).resolve().parents[2]
BATCH, SEQ = 16, 16


def _config(regime: str, optimizer: str = "sgd", momentum: float = 0.0, **diloco) -> TrainConfig:
  plugins = {"sgd": SGDConfig(momentum=momentum)} if optimizer == "sgd" else {"adamw": AdamWConfig()}
  if regime == "diloco":
    settings = dict(replicas=4, sync_every=1, outer_learning_rate=1.0, outer_momentum=0.0, nesterov=False)
    plugins["diloco"] = DiLoCoConfig(**{**settings, **diloco})
  return TrainConfig(model=ModelConfig(layers=("attn", "attn"), d_model=32, num_heads=2, num_kv_heads=2),
                     seq_len=SEQ, batch_size=BATCH, steps=10, optimizer=optimizer, learning_rate=0.05,
                     warmup_steps=0, grad_clip=0.0, regime=regime, plugins=plugins)


def _batches(steps: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  return [{"inputs": rng.integers(0, 256, (BATCH, SEQ), dtype=np.int32),
           "labels": rng.integers(0, 256, (BATCH, SEQ), dtype=np.int32)} for _ in range(steps)]


def _trained_params(cfg: TrainConfig, steps: int = 3):
  model = build_model(cfg)
  regime = build_regime(cfg, model)
  state = regime.init_state(model.params)
  for batch in _batches(steps):
    state, _ = regime.step(state, regime.place_batch(batch))
  return jax.device_get(regime.eval_params(state))


def _max_difference(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_h1_plain_outer_sgd_and_linear_inner_sgd_equal_data_parallel_sgd(momentum):
  """H = 1, outer SGD lr 1 without momentum: θ_g ← mean_m θ_m = θ_g − η·mean_m(g_m) (momentum is linear too), which
  is data-parallel SGD on the 4 replicas' batches concatenated."""
  dp = _trained_params(_config("first_order", momentum=momentum))
  diloco = _trained_params(_config("diloco", momentum=momentum))
  err = _max_difference(dp, diloco)
  print(f"momentum {momentum}: max |DiLoCo - DP| = {err:.2e}")
  assert err < 1e-6
  assert _max_difference(dp, jax.device_get(build_model(_config("first_order")).params)) > 1e-3  # it trained


def test_h1_with_inner_adam_and_several_replicas_is_not_data_parallel():
  """Adam of the mean gradient is not the mean of the replicas' Adam steps (negative control of the test above)."""
  err = _max_difference(_trained_params(_config("first_order", "adamw")), _trained_params(_config("diloco", "adamw")))
  print(f"inner AdamW: max |DiLoCo - DP| = {err:.2e}")
  assert err > 1e-4


def test_replicas_initialised_differently_stop_the_run():
  cfg = _config("diloco", sync_every=2)
  model = build_model(cfg)
  regime = build_regime(cfg, model)
  sharding = NamedSharding(regime.mesh, P())
  devices = list(regime.mesh.devices.flat)

  def per_device_copies(x, bad_device=None):  # what a process with another seed would contribute
    copies = [np.asarray(x) + (np.float32(1e-3) if d == bad_device else np.float32(0)) for d in devices]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, [jax.device_put(c, d)
                                                                        for c, d in zip(copies, devices)])

  regime.init_state(jax.tree.map(per_device_copies, model.params))  # identical copies pass
  params = dict(model.params)
  params["embed"] = jax.tree.map(lambda x: per_device_copies(x, devices[5]), params["embed"])
  with pytest.raises(TrainError, match="replicas were initialised with different parameters"):
    regime.init_state(params)


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ValueError, match="sync_every must be divisible by fragments"):
    DiLoCoConfig(sync_every=10, fragments=3)
  with pytest.raises(ValueError, match=r"overlap_steps must be < sync_every/fragments = 5 \(got 5\)"):
    DiLoCoConfig(sync_every=10, fragments=2, overlap_steps=5)
  with pytest.raises(TrainError, match="fragments"):
    build_regime(_config("diloco", fragments=3, sync_every=3), build_model(_config("diloco")))
  with pytest.raises(TrainError, match="3 replicas need a device count divisible by 3"):
    build_regime(_config("diloco", replicas=3), build_model(_config("diloco")))
  with pytest.raises(TrainError, match="leave --mesh at data=-1"):
    build_regime(dataclasses.replace(_config("diloco"), mesh="fsdp=8"), build_model(_config("diloco")))
  with pytest.raises(TrainError, match="--skip-nonfinite must be 0"):
    build_regime(dataclasses.replace(_config("diloco"), skip_nonfinite=2), build_model(_config("diloco")))


def _command(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", "--config", "tiny_diloco", "--workdir", str(workdir),
          "--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2", "--seq-len", "32", "--batch-size", "16",
          "--warmup-steps", "5", "--diloco.sync-every", "12", "--diloco.overlap-steps", "2", "--eval-batches", "2",
          *extra]


def _train_records(workdir: Path) -> list[dict]:
  return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_sigkill_mid_run_then_restart_continues_the_same_loss_curve_bit_for_bit(tmp_path):
  """Fragments sync every 4 steps, each captured 2 steps before its merge, checkpoints every 3 steps: restored
  states hold a fragment in flight (steps 3, 6 mod 12), none (9) or just merged (12)."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
  steps = 60
  flags = ["--steps", str(steps), "--checkpoint-every", "3", "--eval-every", str(steps), "--log-every", "3"]
  reference = subprocess.run(_command(tmp_path / "reference", *flags), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
  assert reference.returncode == 0, reference.stdout + reference.stderr
  assert "diloco sync after step 4: fragment 0/3" in reference.stdout

  workdir = tmp_path / "killed"
  job = subprocess.Popen(_command(workdir, *flags), cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and len([p for p in checkpoints.glob("*") if p.name.isdigit()]) < 2:
    time.sleep(0.02)
  job.send_signal(signal.SIGKILL)
  job.wait(timeout=30)
  assert job.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  complete = sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
  assert complete and complete[-1] < steps

  resumed = subprocess.run(_command(workdir, *flags), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  restored = int(resumed.stdout.split("resumed from checkpoint at step ")[1].split()[0])
  print(f"killed after checkpoint {complete[-1]}, resumed from {restored}")
  ours, theirs = _train_records(workdir), _train_records(tmp_path / "reference")
  assert [r["step"] for r in ours] == list(range(1, steps + 1))
  assert ours == theirs  # every step's loss, gradient norm and bytes, as exact floats
  summaries = [json.loads((d / "summary.json").read_text()) for d in (workdir, tmp_path / "reference")]
  assert summaries[0]["final_eval_loss"] == summaries[1]["final_eval_loss"]

  # the bytes: event k (fragment k mod 3) is captured after step 4(k+1) - 2, sent during the next step and merged
  # after step 4(k+1); a fragment captured after the last step is never sent
  summary = summaries[0]
  rows = summary["diloco"]["fragment_rows"]
  sent = sum(wire_bytes(rows[k % 3], 128, FORMATS["e3m0"], 4) for k in range(steps) if 4 * (k + 1) - 1 <= steps)
  assert summary["bytes_per_replica_total"] == sent == sum(r["sent_bytes"] for r in ours)
  params = sum(summary["diloco"]["fragment_params"])
  assert summary["data_parallel_bytes_per_replica_total"] == steps * 2 * 3 * params * 4 // 4
