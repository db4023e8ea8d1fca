"""``experiments.zo_study``: AdamW and ZO variants from the same checkpoint, with the memory and bytes it reports."""

from __future__ import annotations

import json

import pytest

from experiments.train import parser
from experiments.zo_study import main, variant_config
from research.cli import UsageError
from research.train import train_and_evaluate

SMALL = ["--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2", "--layers", "attn", "--seq-len", "16",
         "--batch-size", "16", "--eval-batches", "1", "--log-every", "1"]


def test_variants_spread_the_same_directions_over_workers():
  cfg, _ = parser(default_preset="tiny_zo").parse([])
  zo = variant_config("zo2x4-f32", cfg, 3e-4)
  assert (zo.plugins["zo_spsa"].workers, zo.plugins["mezo_sgd"].num_samples, zo.plugins["zo_spsa"].codec) == \
      (2, 4, "f32")
  adamw = variant_config("adamw", cfg, 3e-4)
  assert (adamw.regime, adamw.optimizer, adamw.learning_rate, adamw.init_from) == ("first_order", "adamw", 3e-4,
                                                                                   cfg.init_from)
  with pytest.raises(UsageError, match="zo<N>x<S>-<codec>"):
    variant_config("zo8-log8", cfg, 3e-4)


def test_study_from_a_checkpoint_reports_loss_memory_and_bytes(tmp_path):
  source_cfg, _ = parser(default_preset="tiny").parse([*SMALL, "--steps", "12", "--eval-every", "12",
                                                       "--warmup-steps", "0", "--learning-rate", "1e-2"])
  train_and_evaluate(source_cfg, tmp_path / "source", log=lambda s: None)
  rows = main([*SMALL, "--init-from", str(tmp_path / "source"), "--workdir", str(tmp_path / "study"), "--steps", "2",
               "--eval-every", "2", "--checkpoint-every", "2", "--variants", "adamw,zo8x1-log8,zo2x4-log8"])
  by_name = {r["variant"]: r for r in rows}
  assert by_name["zo8x1-log8"]["bytes_sent_per_worker_per_step"] == 1
  assert by_name["zo2x4-log8"]["bytes_sent_per_worker_per_step"] == 4
  assert by_name["zo2x4-log8"]["sequences_per_device"] == 8 and by_name["zo8x1-log8"]["sequences_per_device"] == 2
  params = by_name["adamw"]["params"]
  assert by_name["adamw"]["bytes_sent_per_worker_per_step"] == pytest.approx(2 * 7 / 8 * 4 * params)
  start = json.loads((tmp_path / "source" / "summary.json").read_text())["final_eval_loss"]
  assert start < 4.5  # the source learnt something, so starting from its checkpoint is visible
  for r in rows:  # every variant starts there: two steps move the loss a little
    assert abs(r["final_eval_loss"] - start) < 0.1, (r["variant"], r["final_eval_loss"], start)
  assert by_name["adamw"]["step_peak_bytes"] > by_name["zo8x1-log8"]["step_peak_bytes"]
  assert by_name["zo8x1-log8"]["ledger_bytes"] > 0 and by_name["adamw"]["ledger_bytes"] is None
  report = json.loads((tmp_path / "study" / "study.json").read_text())
  assert report["start_eval_loss"] == start
  assert (tmp_path / "study" / "loss_curves.png").stat().st_size > 0
  assert (tmp_path / "study" / "study.md").read_text().startswith(f"Fine-tuning from {tmp_path / 'source'}")
