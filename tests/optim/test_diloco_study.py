"""The DiLoCo study tool: variant names, and a two-variant study whose bytes, gaps and verdicts follow from the
runs' own summaries."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.configs import get_preset
from experiments.diloco_study import parse_variant, run_study
from research.cli import UsageError


def test_variant_names_set_the_diloco_config_or_select_data_parallelism():
  base = get_preset("tiny_diloco")
  assert parse_variant("dp", base).regime == "first_order"
  cfg = parse_variant("h100-p2-t1-a0.5-e2m1", base)
  d = cfg.plugins["diloco"]
  assert (cfg.regime, d.sync_every, d.fragments, d.overlap_steps, d.alpha, d.wire, d.replicas) == \
      ("diloco", 100, 2, 1, 0.5, "e2m1", 4)
  with pytest.raises(UsageError, match="expected dp or h<H>-p<P>-t<tau>-a<alpha>-<wire>"):
    parse_variant("diloco", base)
  with pytest.raises(UsageError, match="sync_every must be divisible by fragments"):
    parse_variant("h100-p3-t1-a0.5-e3m0", base)
  with pytest.raises(UsageError, match="wire must be one of"):
    parse_variant("h30-p3-t1-a0.5-fp4", base)


def test_study_rows_follow_from_the_runs(tmp_path):
  base = get_preset("tiny_diloco")
  cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, d_model=32, num_heads=2, num_kv_heads=2),
                            seq_len=32, steps=8, eval_every=4, eval_batches=2, checkpoint_every=8, log_every=4)
  rows = run_study(cfg, tmp_path, ["dp", "h4-p2-t1-a0.5-e3m0"])
  dp, streaming = rows
  summary = json.loads((tmp_path / "h4-p2-t1-a0.5-e3m0" / "summary.json").read_text())
  assert streaming["bytes_per_replica"] == summary["bytes_per_replica_total"] > 0
  assert dp["bytes_per_replica"] == summary["data_parallel_bytes_per_replica_total"]
  assert streaming["reduction_vs_dp_fp32"] == dp["bytes_per_replica"] / streaming["bytes_per_replica"]
  assert streaming["reduction_vs_dp_bf16"] == pytest.approx(streaming["reduction_vs_dp_fp32"] / 2)
  assert streaming["eval_loss_vs_dp"] == streaming["final_eval_loss"] / dp["final_eval_loss"] - 1
  assert streaming["meets_claim"] == (streaming["eval_loss_vs_dp"] <= 0.02 and streaming["reduction_vs_dp_bf16"] >= 400)
  saved = json.loads((tmp_path / "study.json").read_text())["rows"]
  assert [r["variant"] for r in saved] == ["dp", "h4-p2-t1-a0.5-e3m0"]
  assert (tmp_path / "eval_loss.png").stat().st_size > 0
  assert "| h4-p2-t1-a0.5-e3m0 | 4 | 2 | 1 | 0.5 | e3m0 |" in (tmp_path / "study.md").read_text()
