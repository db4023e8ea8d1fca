"""The MQAR study driver: settings validation, the report files, and finished cells read back instead of re-run."""

import json

import pytest

from experiments import mqar
from experiments.configs import get_preset
from research.cli import UsageError

SMALL = ["--d-model", "16", "--num-heads", "2", "--num-kv-heads", "2", "--vocab-size", "64", "--batch-size", "8",
         "--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--checkpoint-every", "3", "--log-every", "1",
         "--warmup-steps", "1"]


def test_parse_settings():
  assert mqar.parse_settings("64x4,128X16") == [(64, 4), (128, 16)]
  with pytest.raises(UsageError, match="4·D <= T"):
    mqar.parse_settings("32x16")
  with pytest.raises(UsageError, match="expected TxD"):
    mqar.parse_settings("64by4")


def test_shards_partition_the_grid_balanced_by_length():
  cells = [(m, t, d, 0) for t, d in [(128, 8), (256, 16), (512, 32)] for m in ("attn", "gdn", "mom")]
  shards = [mqar.shard_cells(cells, (k, 3)) for k in range(3)]
  assert sorted(c for s in shards for c in s) == sorted(cells)
  assert [sum(c[1] for c in s) for s in shards] == [896] * 3
  with pytest.raises(UsageError, match="0 <= K < N"):
    mqar.parse_shard("4/4")
  assert mqar.parse_seeds("0,2") == (0, 2)
  with pytest.raises(UsageError, match="distinct"):
    mqar.parse_seeds("1,1")


def test_several_seeds_report_mean_and_each_seed(tmp_path):
  rows = [{"model": "gdn", "seq_len": 64, "kv_pairs": 8, "seed": s, "accuracy": a} for s, a in [(1, 0.25), (0, 0.75)]]
  rows.append({"model": "mom", "seq_len": 64, "kv_pairs": 4, "seed": 0, "accuracy": 1.0})
  table = mqar.write_report(rows, tmp_path, get_preset("mqar_tiny"))
  assert "| 64 | 8 | 0.500 (0.750 / 0.250) | — |" in table and "| 64 | 4 | — | 1.000 |" in table
  assert mqar.cell_dir(tmp_path, ("mom", 64, 4, 0)).name == "mom_T64_D4"
  assert mqar.cell_dir(tmp_path, ("mom", 64, 4, 3)).name == "mom_T64_D4_seed3"


def test_study_writes_report_and_reuses_finished_cells(tmp_path, capsys):
  argv = ["--workdir", str(tmp_path), "--models", "attn,gdn", "--settings", "16x2", *SMALL]
  rows = mqar.main(argv)
  assert [(r["model"], r["seq_len"], r["kv_pairs"], r["steps"]) for r in rows] == [("attn", 16, 2, 3),
                                                                                   ("gdn", 16, 2, 3)]
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["device"] == "cpu" for r in rows)
  assert json.loads((tmp_path / "study.json").read_text()) == rows
  assert "| 16 | 2 |" in (tmp_path / "study.md").read_text()
  assert (tmp_path / "accuracy_vs_kv_pairs.png").stat().st_size > 0

  metrics = (tmp_path / "gdn_T16_D2" / "metrics.jsonl").read_text()
  capsys.readouterr()
  again = mqar.main(argv)  # both cells finished: read back, nothing trained or evaluated again
  assert again == rows
  assert "starting a new run" not in capsys.readouterr().out
  assert (tmp_path / "gdn_T16_D2" / "metrics.jsonl").read_text() == metrics

  shard = mqar.main([*argv, "--shard", "1/2"])  # the other shard's finished cell still appears in the report
  assert shard == rows
  wider = mqar.main([*argv, "--settings", "16x2,16x4", "--seeds", "0,5", "--report-only"])
  assert wider == rows and not (tmp_path / "attn_T16_D4").exists()  # only finished cells, nothing trained

  longer = ["--workdir", str(tmp_path), "--models", "gdn", "--settings", "16x2", *SMALL, "--steps", "4"]
  with pytest.raises(SystemExit):  # the schedule changes: refused with one line unless accepted
    mqar.main(longer)
  assert "holds a run with a different config (steps: saved 3, now 4)" in capsys.readouterr().err
  longer = mqar.main([*longer, "--accept-change", "steps"])
  assert longer[0]["steps"] == 4  # the accepted change resumes the cell instead of reusing it
  assert json.loads((tmp_path / "gdn_T16_D2" / "summary.json").read_text())["final_step"] == 4
