"""Training loop: smoke run, exact resume, data parallelism, gradient accumulation, memory report, MQAR."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments.configs import get_preset, mqar_tiny
from research.checkpoint import Checkpointer
from research.metrics import read_metrics
from research.models import ModelConfig
from research.train import TrainConfig, TrainError, lower_train_step, train_and_evaluate

SMALL_MODEL = ModelConfig(layers=("attn", "attn"), d_model=32, num_heads=2, num_kv_heads=2)


def _small(**overrides) -> TrainConfig:
  base = TrainConfig(model=SMALL_MODEL, seq_len=32, batch_size=16, steps=6, warmup_steps=2, eval_every=3,
                     eval_batches=2, checkpoint_every=3, log_every=1)
  return dataclasses.replace(base, **overrides)


def _train_losses(workdir):
  return [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]


def test_two_step_smoke_run_of_the_tiny_config(tmp_path):
  cfg = dataclasses.replace(get_preset("tiny"), steps=2, eval_every=1, eval_batches=1, log_every=1)
  summary = train_and_evaluate(cfg, tmp_path, log=lambda s: None)
  for name in ("config.json", "metrics.jsonl", "memory.json", "loss.png", "summary.json"):
    assert (tmp_path / name).exists(), name
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
  assert np.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < summary["uniform_loss"] + 0.5
  memory = json.loads((tmp_path / "memory.json").read_text())
  assert memory["compiled"]["temp_size_in_bytes"] > 0 and memory["compiled"]["argument_size_in_bytes"] > 0


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """An uninterrupted 6-step run on all 8 devices: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, train_and_evaluate(_small(), workdir, log=lambda s: None)


def test_resumed_run_continues_the_same_loss_curve_bit_for_bit(straight_run, tmp_path):
  straight, _ = straight_run
  train_and_evaluate(_small(steps=3), tmp_path, log=lambda s: None)
  logs = []
  train_and_evaluate(_small(), tmp_path, accept_changes=("steps",), log=logs.append)
  assert any("resumed from checkpoint at step 3" in line for line in logs)
  assert any(line.startswith("accepted changes: steps 3 -> 6 (the learning-rate schedule differs from step 3")
             for line in logs)
  assert _train_losses(straight) == _train_losses(tmp_path)  # exact float equality
  assert len(_train_losses(tmp_path)) == 6
  # Starting the finished run again restores it and trains nothing more.
  summary = train_and_evaluate(_small(), tmp_path, log=lambda s: None)
  assert summary["steps_this_session"] == 0 and len(_train_losses(tmp_path)) == 6


def test_resuming_with_a_different_model_is_refused(tmp_path):
  train_and_evaluate(_small(steps=1), tmp_path, log=lambda s: None)
  other = _small(model=dataclasses.replace(SMALL_MODEL, d_model=48))
  with pytest.raises(TrainError, match="model.d_model: saved 32, now 48"):
    train_and_evaluate(other, tmp_path, log=lambda s: None)


def test_data_parallel_over_8_devices_matches_one_device(straight_run, tmp_path):
  assert jax.device_count() == 8
  many_dir, many = straight_run
  one = train_and_evaluate(_small(), tmp_path, devices=jax.devices()[:1], log=lambda s: None)
  np.testing.assert_allclose(_train_losses(many_dir), _train_losses(tmp_path), rtol=1e-5)
  assert abs(many["final_eval_loss"] - one["final_eval_loss"]) < 1e-4


def test_gradient_accumulation_matches_one_large_batch(straight_run, tmp_path):
  one_dir, one = straight_run
  accum = train_and_evaluate(_small(grad_accum=2), tmp_path, log=lambda s: None)
  np.testing.assert_allclose(_train_losses(one_dir), _train_losses(tmp_path), rtol=1e-5)
  assert abs(one["final_eval_loss"] - accum["final_eval_loss"]) < 1e-4


def test_indivisible_batch_is_rejected_before_training(tmp_path):
  with pytest.raises(TrainError, match=r"divisible by the devices it is split over \(data x fsdp = 8\)"):
    train_and_evaluate(_small(batch_size=12), tmp_path, log=lambda s: None)
  assert not (tmp_path / "config.json").exists()
  assert not tmp_path.joinpath("never_made").exists()
  with pytest.raises(TrainError):
    train_and_evaluate(_small(batch_size=12), tmp_path / "never_made", log=lambda s: None)
  assert not (tmp_path / "never_made").exists(), "a refused run must not leave an empty run folder"


def test_lowered_train_step_reports_memory_without_materialising_params():
  lowered = lower_train_step(_small())
  analysis = lowered.compile().memory_analysis()
  assert analysis.argument_size_in_bytes > 0 and analysis.temp_size_in_bytes > 0


def test_mqar_task_trains_and_reports_accuracy(tmp_path):
  cfg = dataclasses.replace(mqar_tiny(), steps=2, eval_every=2, eval_batches=1, log_every=1, batch_size=16)
  summary = train_and_evaluate(cfg, tmp_path, log=lambda s: None)
  assert 0.0 <= summary["final_eval_accuracy"] <= 1.0 and np.isfinite(summary["final_eval_loss"])
