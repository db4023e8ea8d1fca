"""The ``zo_spsa`` regime on the 8 fake CPU devices (spec oracles 13-15): 8 workers end bit-identical and equal a
sequential ledger replay, a worker joining from checkpoint(k) + ledger equals the run from 0, a departed worker
leaves the ledger and N, a resumed run re-records identical rounds over a torn ledger tail, diverged copies stop
the run, and the donated step's memory is that of inference."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments.configs  # noqa: F401  (registers the plugins)
from experiments.zo_replay import replay_workdir
from optim.zo.ledger import read_ledger
from optim.zo.regime import WorkerDivergence, ZOSPSAConfig
from optim.zo.registry import MeZOConfig
from research.memory import compiled_memory
from research.metrics import read_metrics
from research.models import ModelConfig
from research.train import TrainConfig, TrainError, build_model, build_regime, lower_train_step, train_and_evaluate
from research.train.loop import make_task
from research.train.steps import lm_loss

SAMPLES = 2


def _config(**overrides) -> TrainConfig:
  base = TrainConfig(
      model=ModelConfig(layers=("attn",), d_model=32, num_heads=2, num_kv_heads=2), seq_len=16, batch_size=16,
      steps=6, warmup_steps=0, learning_rate=2e-2, grad_clip=0.0, eval_every=3, eval_batches=1, checkpoint_every=3,
      log_every=1, regime="zo_spsa", optimizer="mezo_sgd",
      plugins={"zo_spsa": ZOSPSAConfig(check_every=2, departures=("5@4",)),
               "mezo_sgd": MeZOConfig(num_samples=SAMPLES, weight_decay=0.01)})
  return dataclasses.replace(base, **overrides)


def _train(cfg, workdir, **kwargs):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    summary = train_and_evaluate(cfg, workdir, log=print, **kwargs)
  return summary, out.getvalue()


@pytest.fixture(scope="module")
def zo_run(tmp_path_factory):
  """Six rounds of 8 workers x 2 directions, worker 5 leaving at round 4: (workdir, summary, printed output)."""
  workdir = tmp_path_factory.mktemp("zo")
  summary, printed = _train(_config(), workdir)
  return workdir, summary, printed


def test_eight_workers_end_bit_identical_and_equal_a_sequential_ledger_replay(zo_run):
  workdir, summary, printed = zo_run
  checks = [line for line in printed.splitlines() if line.startswith("zo check at step")]
  assert [line.split()[4] for line in checks] == ["2:", "4:", "6:"]
  assert all(line.endswith("on all 8 workers") for line in checks)
  assert checks[-1].split()[6] == summary["param_sha256"]  # the device hash at the last step = hashlib's
  assert len({line.split()[6] for line in checks}) == 3  # the parameters moved between checks
  replayed = replay_workdir(workdir, log=lambda s: None)
  assert replayed["rounds"] == 6 and replayed["param_sha256"] == summary["param_sha256"]
  assert summary["zo_workers"] == 8 and summary["zo_nonfinite_codes"] == 0


def test_a_worker_joining_at_step_k_from_checkpoint_and_ledger_equals_the_run_from_zero(zo_run):
  workdir, summary, _ = zo_run
  joined = replay_workdir(workdir, from_checkpoint=3, log=lambda s: None)
  assert joined["start_round"] == 3 and joined["rounds"] == 3
  assert joined["param_sha256"] == summary["param_sha256"]


def test_bytes_per_worker_per_step_equal_the_number_of_directions(zo_run):
  workdir, summary, printed = zo_run
  assert summary["bytes_per_worker_per_step"] == SAMPLES
  assert f"codec log8: {SAMPLES} bytes sent per worker per step" in printed
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert [r["bytes_sent_per_worker"] for r in rows] == [SAMPLES] * 6
  ledger = read_ledger(workdir / "zo" / "ledger.bin")
  assert [r.codes.shape for r in ledger.rounds] == [(8, SAMPLES, 1)] * 4 + [(7, SAMPLES, 1)] * 2
  # The ledger is the run's tiny checkpoint: bytes per round, not per parameter.
  assert ledger.end < 100 * 6 + 1000 < 4 * sum(int(np.prod(p.shape)) for p in jax.tree.leaves(
      build_model(_config(), abstract=True).params))


def test_a_departed_worker_leaves_the_entries_and_n(zo_run):
  workdir, _, _ = zo_run
  ledger = read_ledger(workdir / "zo" / "ledger.bin")
  assert [r.active for r in ledger.rounds] == [tuple(range(8))] * 4 + [(0, 1, 2, 3, 4, 6, 7)] * 2
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert [r["active_workers"] for r in rows] == [8, 8, 8, 8, 7, 7]
  assert [r.lr for r in ledger.rounds] == sorted((r.lr for r in ledger.rounds), reverse=True)  # cosine decay


def test_a_resumed_run_re_records_identical_rounds_over_a_torn_ledger_tail(zo_run, tmp_path):
  workdir, summary, _ = zo_run
  crashed = tmp_path / "crashed"
  shutil.copytree(workdir, crashed)
  # The process died after writing the ledger up to round 5 and half of a later record, before checkpoint 6.
  shutil.rmtree(crashed / "checkpoints" / "6")
  ledger = crashed / "zo" / "ledger.bin"
  ledger.write_bytes(ledger.read_bytes() + b"ZOL1R\x40\x00\x00\x00partial")
  resumed, printed = _train(_config(), crashed)
  assert "resumed from checkpoint at step 3" in printed and "dropped a torn last record" in printed
  assert resumed["param_sha256"] == summary["param_sha256"]
  contents = read_ledger(ledger)
  assert contents.torn is None and [r.step for r in contents.rounds] == list(range(6))


def test_diverged_worker_copies_stop_the_run_naming_the_step_and_the_workers(tmp_path):
  cfg = _config(plugins={"zo_spsa": ZOSPSAConfig(check_every=1), "mezo_sgd": MeZOConfig(num_samples=SAMPLES)})
  model = build_model(cfg)
  regime = build_regime(cfg, model)
  state = regime.init_state(model.params)
  embedding = state["params"]["embed"]["embedding"]
  shards = []
  for shard in embedding.addressable_shards:
    data = np.array(shard.data)
    if shard.device == regime.mesh.devices.flat[3]:
      data.view(np.uint32)[0, 0] ^= 1  # one bit of worker 3's copy
    shards.append(jax.device_put(data, shard.device))
  state["params"]["embed"]["embedding"] = jax.make_array_from_single_device_arrays(
      embedding.shape, embedding.sharding, shards)
  batch = regime.place_batch(make_task(cfg).train_batch(0, cfg.batch_size))
  _, metrics = regime.step(state, batch)
  with pytest.raises(WorkerDivergence) as failure:
    with contextlib.redirect_stdout(io.StringIO()):
      regime.record(1, [jax.device_get(metrics)], tmp_path)
  message = str(failure.value)
  print(message)
  assert "\n" not in message and message.startswith("param_sha256 differs across workers after step 1 (round 0)")
  assert "workers 0,1,2,4,5,6,7 hold" in message and "workers 3 hold" in message
  assert isinstance(failure.value, TrainError)  # the CLI prints it as one line and stops


def test_settings_the_regime_cannot_run_are_refused_in_one_line():
  with pytest.raises(TrainError, match="--optimizer mezo_sgd"):
    build_regime(_config(optimizer="adamw"), build_model(_config(), abstract=True))
  with pytest.raises(TrainError, match="--grad-clip 0"):
    build_regime(_config(grad_clip=1.0), build_model(_config(), abstract=True))
  with pytest.raises(TrainError, match="divisible by the number of workers"):
    build_regime(_config(batch_size=12), build_model(_config(), abstract=True))
  with pytest.raises(ValueError, match="WORKER@ROUND"):
    ZOSPSAConfig(departures=("three@4",))


def test_donated_zo_step_memory_is_that_of_inference_and_below_the_first_order_step():
  """XLA's memory analysis per device: the ZO step (8 workers, 16 sequences each) vs a forward pass of the same
  model on one worker's 16 sequences, and vs the first-order AdamW step on the same global batch."""
  model_cfg = ModelConfig(layers=("attn", "attn"), d_model=64, num_heads=4, num_kv_heads=4)
  zo = _config(model=model_cfg, seq_len=128, batch_size=8 * 16)
  first_order = TrainConfig(model=model_cfg, seq_len=128, batch_size=8 * 16)
  model = build_model(zo, abstract=True)
  tokens = jax.ShapeDtypeStruct((16, 128), jnp.int32)
  forward = jax.jit(lambda p, b: lm_loss(model.merge(p), b, 0.01)).lower(
      model.params, {"inputs": tokens, "labels": tokens}).compile()
  zo_memory = compiled_memory(lower_train_step(zo).compile())
  peaks = {"zo": zo_memory["peak_estimate_bytes"], "forward": compiled_memory(forward)["peak_estimate_bytes"],
           "first_order": compiled_memory(lower_train_step(first_order).compile())["peak_estimate_bytes"]}
  params_bytes = sum(4 * int(np.prod(p.shape)) for p in jax.tree.leaves(model.params))
  print({k: f"{v / 2**20:.2f} MiB" for k, v in peaks.items()}, f"params {params_bytes / 2**20:.2f} MiB")
  assert peaks["zo"] <= 1.1 * peaks["forward"]
  assert peaks["zo"] < peaks["first_order"]
  assert zo_memory["alias_size_in_bytes"] >= params_bytes  # the state is donated: updated in place
