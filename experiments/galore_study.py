"""GaLore study: the same LM, data and steps under AdamW, optax.contrib.galore, ours and Natural GaLore.

``python -m experiments.galore_study --config tiny --workdir runs/galore_study``

Each variant is a full ``research.train.train_and_evaluate`` run in ``<workdir>/<variant>`` (resumable); a variant
is a registered optimizer name, optionally ``name*k`` for k times the config's learning rate (the paper tunes
GaLore's rate separately: lr 0.01 with α = 0.25 against Adam's best ~1e-3; Zhao et al., arXiv:2403.03507,
App. C.1). Afterwards it writes ``loss_curves.png`` (train and eval loss of every variant), ``study.json`` and
``study.md`` (final eval loss and its gap to AdamW, optimizer-state bytes of the attention/MLP matrices and of
everything, train-step time from the runs' own throughput records).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.train import parser  # noqa: E402
from optim.memory import state_bytes_by_group  # noqa: E402
from research.cli import UsageError, fail  # noqa: E402
from research.config import ConfigError, to_json  # noqa: E402
from research.data import CorpusError  # noqa: E402
from research.metrics import read_metrics  # noqa: E402
from research.models import DecoderLM  # noqa: E402
from research.train import TrainConfig, TrainError, make_optimizer, train_and_evaluate  # noqa: E402

DEFAULT_VARIANTS = "adamw,optax_galore,galore,galore*4,natural_galore"


def parse_variant(spec: str, cfg: TrainConfig) -> tuple[str, TrainConfig]:
  """``'galore*4'`` -> ("galore*4", cfg with optimizer galore and 4× the learning rate)."""
  name, _, factor = spec.partition("*")
  try:
    scale = float(factor) if factor else 1.0
  except ValueError:
    raise UsageError(f"variant {spec!r}: expected NAME or NAME*FACTOR with a number FACTOR") from None
  try:
    return spec, dataclasses.replace(cfg, optimizer=name, learning_rate=cfg.learning_rate * scale)
  except ConfigError as e:
    raise UsageError(f"variant {spec!r}: {e}") from None


def optimizer_state_bytes(cfg: TrainConfig) -> dict[str, dict[str, int]]:
  """State bytes per group of ``cfg``'s optimizer over its model's parameters, from abstract shapes."""
  model = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return state_bytes_by_group(jax.eval_shape(make_optimizer(cfg).init, params), params)


def step_seconds(records: list[dict[str, Any]], tokens_per_step: int) -> float | None:
  """Median train-step time from the runs' throughput records (the first, compile-bound, one dropped)."""
  speeds = [r["tokens_per_s"] for r in records if r["split"] == "speed"][1:]
  return tokens_per_step / statistics.median(speeds) if speeds else None


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (name, records) in enumerate(runs.items()):
    color = f"C{i}"
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
    window = 10
    smooth = [(train[j][0], statistics.fmean(v for _, v in train[max(0, j - window + 1):j + 1]))
              for j in range(len(train))]
    ax.plot(*zip(*smooth, strict=True), color=color, alpha=0.8, label=f"{name} train (mean of {window})")
    if evals:
      ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{name} eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| variant | lr | final eval loss | vs AdamW | state attn/mlp (MiB) | state total (MiB) | step (ms) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    gap = "" if r["eval_loss_vs_adamw"] is None else f"{100 * r['eval_loss_vs_adamw']:+.2f}%"
    ms = "" if r["step_seconds"] is None else f"{1e3 * r['step_seconds']:.1f}"
    lines.append(f"| {r['variant']} | {r['learning_rate']:g} | {r['final_eval_loss']:.4f} | {gap} | "
                 f"{r['state_attn_mlp_bytes'] / 2**20:.3f} | {r['state_total_bytes'] / 2**20:.3f} | {ms} |")
  return "\n".join(lines)


def run_study(cfg: TrainConfig, workdir: Path, variants: list[str]) -> list[dict[str, Any]]:
  workdir.mkdir(parents=True, exist_ok=True)
  rows, runs = [], {}
  for spec in variants:
    name, variant_cfg = parse_variant(spec, cfg)
    summary = train_and_evaluate(variant_cfg, workdir / name.replace("*", "x"))
    records = read_metrics(workdir / name.replace("*", "x") / "metrics.jsonl")
    runs[name] = records
    groups = optimizer_state_bytes(variant_cfg)
    rows.append({"variant": name, "optimizer": variant_cfg.optimizer, "learning_rate": variant_cfg.learning_rate,
                 "final_eval_loss": summary["final_eval_loss"], "final_train_loss": summary["final_train_loss"],
                 "state_attn_mlp_bytes": groups.get("attn/mlp", {}).get("total", 0),
                 "state_total_bytes": sum(g["total"] for g in groups.values()), "state_bytes_by_group": groups,
                 "step_seconds": step_seconds(records, variant_cfg.tokens_per_step),
                 "devices": summary["devices"]})
  adamw = next((r["final_eval_loss"] for r in rows if r["variant"] == "adamw"), None)
  for r in rows:
    r["eval_loss_vs_adamw"] = None if adamw is None else r["final_eval_loss"] / adamw - 1
  plot_curves(runs, workdir / "loss_curves.png",
              f"{cfg.task} LM d={cfg.model.d_model} x{len(cfg.model.layers)}, {cfg.steps} steps")
  (workdir / "study.json").write_text(json.dumps({"config": to_json(cfg), "rows": rows}, indent=2) + "\n")
  table = markdown_table(rows)
  (workdir / "study.md").write_text(table + "\n")
  print(table)
  return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  def extra(parser):
    parser.add_argument("--workdir", default=None, help="study folder (default: runs/galore_study_<config>)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated registered optimizers, NAME*K for K times the learning rate")

  try:
    cfg, args = parser(description=__doc__.splitlines()[0], default_preset="tiny", extra=extra,
                       prog="python -m experiments.galore_study", unselected_plugins=True).parse(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
      parse_variant(v, cfg)
    return run_study(cfg, Path(args.workdir or f"runs/galore_study_{args.config}"), variants)
  except (UsageError, TrainError, CorpusError) as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
