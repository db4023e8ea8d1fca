"""The GaLore study runs every variant through the real training loop and writes its plot and tables."""

from __future__ import annotations

import json

from experiments.galore_study import run_study
from research.data import MQARTaskConfig
from research.models import ModelConfig
from research.train import TrainConfig


def test_study_runs_variants_and_writes_records(tmp_path):
  cfg = TrainConfig(model=ModelConfig(vocab_size=64, layers=("attn",), d_model=32, num_heads=2, num_kv_heads=2),
                    task="mqar", plugins={"mqar": MQARTaskConfig(num_kv_pairs=2)}, seq_len=32, batch_size=8,
                    steps=3, warmup_steps=1, eval_every=3,
                    eval_batches=1, checkpoint_every=3, log_every=1)
  rows = run_study(cfg, tmp_path, ["adamw", "galore*4"])
  assert [r["variant"] for r in rows] == ["adamw", "galore*4"]
  assert rows[1]["learning_rate"] == 4 * cfg.learning_rate
  assert 0 < rows[1]["state_attn_mlp_bytes"] < rows[0]["state_attn_mlp_bytes"]
  assert rows[0]["eval_loss_vs_adamw"] == 0.0
  assert (tmp_path / "loss_curves.png").stat().st_size > 0
  assert json.loads((tmp_path / "study.json").read_text())["rows"][1]["optimizer"] == "galore"
