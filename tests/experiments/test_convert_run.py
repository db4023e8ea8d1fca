"""Run folders written before plugins owned their configs: refused with the command that converts them, then
converted (settings moved to their plugins) and resumed from their checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.configs import get_preset
from experiments.convert_run import convert, convert_run, main
from research.config import from_json, to_json
from research.train import TrainConfig, TrainError, train_and_evaluate

# config.json of a legacy run, as the legacy code wrote it (MoM, full_attn, LongGen and GDN layers; Natural GaLore
# with its own rank, history and b2; the MQAR task).
LEGACY = {
    "model": {"vocab_size": 8192, "layers": ["mom", "full_attn", "longgen", "gdn"], "d_model": 64, "num_heads": 2,
              "num_kv_heads": 2, "head_dim": None, "mlp_hidden": None, "rope_theta": 10000.0, "norm_eps": 1e-06,
              "tie_embeddings": True, "dtype": "float32", "aux_loss_weight": 0.01, "attn_sink": 4, "attn_window": 32,
              "attn_block": 64, "attn_local_blocks": 16, "attn_stride": 8, "attn_implementation": "blockwise",
              "longgen_full_fraction": 0.5, "mom_num_memories": 4, "mom_top_k": 1, "mom_shared_memory": True,
              "mom_dispatch": "sorted", "gdn_expand_v": 2, "gdn_conv_size": 4, "linear_chunk_size": 16,
              "linear_attention_impl": None},
    "task": "mqar", "data": [], "seq_len": 64, "batch_size": 64, "grad_accum": 1, "steps": 1500,
    "optimizer": "natural_galore", "learning_rate": 0.003, "warmup_steps": 100, "weight_decay": 0.1, "b1": 0.9,
    "b2": 0.99, "grad_clip": 1.0, "eval_every": 250, "eval_batches": 4, "checkpoint_every": 500,
    "keep_checkpoints": 3, "log_every": 50, "mqar_kv_pairs": 2, "galore_rank": 8, "galore_update_proj_gap": 200,
    "galore_scale": 0.25, "natural_galore_history": 5, "seed": 0}


def test_every_legacy_setting_lands_in_its_plugin():
  cfg = from_json(TrainConfig, convert(LEGACY))
  mixers = cfg.model.mixers
  assert cfg.model.layers == ("mom", "attn", "longgen", "gdn")
  assert (mixers["mom"].top_k, mixers["mom"].dispatch, mixers["mom"].memory.chunk_size,
          mixers["mom"].memory.expand_v) == (1, "sorted", 16, 2)
  assert mixers["gdn"] == mixers["mom"].memory
  assert mixers["attn"].implementation == "blockwise"  # full_attn used the sparse layers' kernel setting
  assert (mixers["longgen"].sink, mixers["longgen"].window, mixers["longgen"].full_fraction) == (4, 32, 0.5)
  opt = cfg.optimizer_config
  assert (cfg.optimizer, opt.rank, opt.history, opt.b2, opt.scale) == ("natural_galore", 8, 5, 0.99, 0.25)
  assert cfg.task_config.num_kv_pairs == 2 and cfg.regime == "first_order"
  assert (cfg.steps, cfg.learning_rate, cfg.checkpoint_every) == (1500, 0.003, 500)


def _small_run(workdir, steps):
  base = get_preset("tiny")
  cfg = dataclasses.replace(base, steps=steps, seq_len=32, batch_size=8, eval_batches=1, log_every=1,
                            checkpoint_every=1, model=dataclasses.replace(base.model, d_model=32, num_heads=2,
                                                                          num_kv_heads=2))
  return cfg, train_and_evaluate(cfg, workdir, log=lambda s: None)


def test_legacy_folder_is_refused_then_converted_and_resumed(tmp_path, capsys):
  cfg, _ = _small_run(tmp_path, steps=2)
  new_json = json.loads((tmp_path / "config.json").read_text())
  legacy = {**{k: v for k, v in new_json.items() if k not in ("plugins", "regime", "model")},
            "model": {k: v for k, v in new_json["model"].items() if k != "mixers"},
            "data": [], "b1": 0.9, "b2": 0.95, "weight_decay": 0.1, "mqar_kv_pairs": 4}
  (tmp_path / "config.json").write_text(json.dumps(legacy))
  longer = dataclasses.replace(cfg, steps=3)
  with pytest.raises(TrainError, match=f"convert its config.json with `python -m experiments.convert_run {tmp_path}`"):
    train_and_evaluate(longer, tmp_path, log=lambda s: None)
  main([str(tmp_path)])
  assert "converted" in capsys.readouterr().out
  assert json.loads((tmp_path / "config.legacy.json").read_text()) == legacy
  converted, want = json.loads((tmp_path / "config.json").read_text()), json.loads(json.dumps(to_json(cfg)))
  assert converted == want, (converted, want)
  logs = []
  summary = train_and_evaluate(longer, tmp_path, accept_changes=("steps",), log=logs.append)
  assert "resumed from checkpoint at step 2" in " ".join(logs) and summary["steps_this_session"] == 1
  with pytest.raises(ValueError, match="already in today's format"):
    convert_run(tmp_path)
