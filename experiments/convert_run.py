"""Convert a run folder written before plugins owned their configs: ``python -m experiments.convert_run DIR``.

Such a folder's ``config.json`` keeps every layer, optimizer and task setting as a flat core field (``attn_window``,
``mom_dispatch``, ``galore_rank``, ``mqar_kv_pairs``, ``b1`` ...). This rewrites it in today's shape (each chosen
plugin's config under its name), keeps the original as ``config.legacy.json``, and checks that the result is a
valid config. Parameters and optimizer state are unchanged by the new shape (``full_attn`` is now ``attn``, with the
same weights), so the run then resumes from its checkpoints as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from experiments import configs  # noqa: F401  (registers every plugin the converted config may name)
from research.cli import fail
from research.config import ConfigError, from_json, to_json
from research.train import TrainConfig
from research.train.resume import is_legacy

_CORE_MODEL = ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden", "rope_theta",
               "norm_eps", "tie_embeddings", "dtype", "aux_loss_weight")
_CORE_RUN = ("task", "seq_len", "batch_size", "grad_accum", "steps", "optimizer", "learning_rate", "warmup_steps",
             "grad_clip", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every", "seed")


def _mixer_configs(model: dict[str, Any], layers: list[str]) -> dict[str, dict[str, Any]]:
  """Each legacy mixer's settings, from the flat ``attn_*``, ``longgen_*``, ``gdn_*``, ``linear_*``, ``mom_*``."""
  impl = model.get("attn_implementation")
  window = {"window": model.get("attn_window", 8192)}
  sink = {"sink": model.get("attn_sink", 64), **window}
  blocks = {"block": model.get("attn_block", 64), "local_blocks": model.get("attn_local_blocks", 16),
            "stride": model.get("attn_stride", 8)}
  full = {"full_fraction": model.get("longgen_full_fraction", 1 / 3)}
  memory = {"expand_v": model.get("gdn_expand_v", 1), "conv_size": model.get("gdn_conv_size", 4),
            "chunk_size": model.get("linear_chunk_size", 64), "implementation": model.get("linear_attention_impl")}
  known = {
      "attn": {},  # the legacy attn layer always chose its own kernel
      "full_attn": {"implementation": impl},
      "swa": {**window, "implementation": impl},
      "sink_window": {**sink, "implementation": impl},
      "block_sparse": {**blocks, "implementation": impl},
      "longgen": {**sink, **full, "implementation": impl},
      "longgen_block": {**blocks, **full, "implementation": impl},
      "gdn": memory,
      "mom": {"memory": memory, "num_memories": model.get("mom_num_memories", 4), "top_k": model.get("mom_top_k", 2),
              "shared_memory": model.get("mom_shared_memory", True), "dispatch": model.get("mom_dispatch", "packed")},
  }
  configs_ = {}
  for name in dict.fromkeys(layers):
    if name not in known:
      raise ValueError(f"layer {name!r} is not one the legacy format had")
    configs_["attn" if name == "full_attn" else name] = known[name]
  return configs_


def _run_plugins(saved: dict[str, Any]) -> dict[str, Any]:
  """The legacy optimizer's and task's settings (b1, b2, weight_decay, galore_*, natural_galore_history, data,
  mqar_kv_pairs) under their plugins' names."""
  adam = {"b1": saved.get("b1", 0.9), "b2": saved.get("b2", 0.95), "weight_decay": saved.get("weight_decay", 0.1)}
  low_rank = {**adam, "rank": saved.get("galore_rank"), "update_proj_gap": saved.get("galore_update_proj_gap", 200)}
  galore = {**low_rank, "scale": saved.get("galore_scale", 0.25)}
  optimizers = {"adamw": adam, "sgd": {"momentum": adam["b1"]}, "optax_galore": low_rank, "galore": galore,
                "natural_galore": {**galore, "history": saved.get("natural_galore_history", 20)}}
  tasks = {"text": {"data": saved.get("data", [])}, "mqar": {"num_kv_pairs": saved.get("mqar_kv_pairs", 4)}}
  optimizer, task = saved.get("optimizer", "adamw"), saved.get("task", "text")
  if optimizer not in optimizers or task not in tasks:
    raise ValueError(f"optimizer {optimizer!r} / task {task!r} is not one the legacy format had")
  return {optimizer: optimizers[optimizer], task: tasks[task], "first_order": None}


def convert(saved: dict[str, Any]) -> dict[str, Any]:
  """A legacy ``config.json`` dict in today's shape (``research.config.to_json`` of a TrainConfig)."""
  model = saved["model"]
  layers = ["attn" if name == "full_attn" else name for name in model["layers"]]
  new_model = {**{k: model[k] for k in _CORE_MODEL if k in model}, "layers": layers,
               "mixers": _mixer_configs(model, model["layers"])}
  return {"model": new_model, **{k: saved[k] for k in _CORE_RUN if k in saved}, "regime": "first_order",
          "plugins": _run_plugins(saved)}


def convert_run(workdir: Path) -> TrainConfig:
  """Rewrite ``workdir/config.json`` in today's shape (the original kept as ``config.legacy.json``)."""
  path = workdir / "config.json"
  if not path.exists():
    raise ValueError(f"{path} does not exist")
  saved = json.loads(path.read_text())
  if not is_legacy(saved):
    raise ValueError(f"{path} is already in today's format")
  converted = convert(saved)
  cfg = from_json(TrainConfig, converted)  # raises ConfigError if the result is not a valid config
  (workdir / "config.legacy.json").write_text(path.read_text())
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(to_json(cfg), indent=2) + "\n")
  tmp.replace(path)
  return cfg


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", type=Path, help="the run folder holding a legacy config.json")
  args = parser.parse_args(argv)
  try:
    cfg = convert_run(args.workdir)
  except (ValueError, KeyError, ConfigError) as e:
    fail(f"{args.workdir}: {e}")
  print(f"converted {args.workdir / 'config.json'} (original kept as config.legacy.json): layers "
        f"{','.join(cfg.model.layers)}, optimizer {cfg.optimizer}, task {cfg.task}")


if __name__ == "__main__":
  main(sys.argv[1:])
