"""MQAR study: softmax attention vs Gated DeltaNet vs Mixture-of-Memories at matched width.

``python -m experiments.mqar --config mqar_tiny --workdir runs/mqar --settings 64x4,64x16,128x16``

Task: Zoology multi-query associative recall ("Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927) from ``research.data.mqar``. Models: 2-layer decoders whose mixers are all ``attn``,
all ``gdn`` or all ``mom`` (MoM: "MoM: Linear Sequence Modeling with Mixture-of-Memories", arXiv 2502.13685;
4 memories, top-2, shared memory), same d_model/heads, so every GDN memory (and every MoM memory) has the same
state size H·K·V per layer. Each (model, T, kv-pairs) cell is one ``research.train.train_and_evaluate`` run in
``<workdir>/<model>_T<T>_D<D>`` (resumable). Writes ``study.json``, ``study.md`` (accuracy table) and
``accuracy_vs_kv_pairs.png`` (one panel per sequence length) into the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import PRESETS
from research.cli import UsageError, fail, parse_run_args
from research.train import TrainConfig, TrainError, train_and_evaluate

MODELS = {"attn": ("attn", "attn"), "gdn": ("gdn", "gdn"), "mom": ("mom", "mom")}


def parse_settings(spec: str) -> list[tuple[int, int]]:
  """``"64x4,128x16"`` -> [(64, 4), (128, 16)]: (sequence length T, key-value pairs D), with 4·D ≤ T."""
  settings = []
  for item in spec.split(","):
    try:
      t, d = (int(x) for x in item.lower().split("x"))
    except ValueError:
      raise UsageError(f"--settings: expected TxD pairs such as 64x4,128x16, got {item!r}") from None
    if 4 * d > t:
      raise UsageError(f"--settings {item}: MQAR needs 4·D <= T (D={d}, T={t})")
    settings.append((t, d))
  return settings


def run_study(base: TrainConfig, workdir: Path, models: list[str], settings: list[tuple[int, int]]) -> list[dict]:
  """Train/evaluate every (model, setting) cell; returns one result row per cell."""
  rows = []
  for t, d in settings:
    for name in models:
      cfg = dataclasses.replace(base, seq_len=t, mqar_kv_pairs=d,
                                model=dataclasses.replace(base.model, layers=MODELS[name]))
      summary = train_and_evaluate(cfg, workdir / f"{name}_T{t}_D{d}")
      rows.append({"model": name, "seq_len": t, "kv_pairs": d, "accuracy": summary["final_eval_accuracy"],
                   "eval_loss": summary["final_eval_loss"], "steps": cfg.steps, "d_model": cfg.model.d_model,
                   "seconds": summary["seconds_this_session"]})
      (workdir / "study.json").write_text(json.dumps(rows, indent=1) + "\n")
  return rows


def write_report(rows: list[dict], workdir: Path, base: TrainConfig) -> str:
  """Markdown table (accuracy per model and setting) and the accuracy-vs-kv-pairs plot."""
  models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
  settings = sorted({(r["seq_len"], r["kv_pairs"]) for r in rows})
  acc = {(r["model"], r["seq_len"], r["kv_pairs"]): r["accuracy"] for r in rows}
  lines = [f"| T | KV pairs | {' | '.join(models)} |", "|-|-|" + "-|" * len(models)]
  for t, d in settings:
    lines.append(f"| {t} | {d} | " + " | ".join(f"{acc[(m, t, d)]:.3f}" for m in models) + " |")
  table = "\n".join(lines)
  (workdir / "study.md").write_text(
      f"MQAR eval accuracy (scored value tokens); d_model={base.model.d_model}, heads={base.model.num_heads}, "
      f"vocab={base.model.vocab_size}, {base.steps} steps × batch {base.batch_size}, lr {base.learning_rate}\n\n"
      + table + "\n")
  lengths = sorted({t for t, _ in settings})
  fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.2), squeeze=False)
  for ax, t in zip(axes[0], lengths):
    for m in models:
      pts = sorted((d, acc[(m, tt, d)]) for tt, d in settings if tt == t and (m, tt, d) in acc)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set(title=f"T = {t}", xlabel="KV pairs", ylabel="eval accuracy", ylim=(0, 1.02))
    ax.set_xscale("log", base=2)
    ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "accuracy_vs_kv_pairs.png", dpi=120)
  plt.close(fig)
  return table


def main(argv: list[str] | None = None) -> list[dict]:
  def extra(parser):
    parser.add_argument("--workdir", default="runs/mqar", help="study folder")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--settings", default="64x4,64x16,128x16", help="TxD cells (seq len x kv pairs)")

  try:
    base, args = parse_run_args(argv, config_cls=TrainConfig, presets=PRESETS, default_preset="mqar_tiny",
                                description=__doc__.splitlines()[0], extra=extra)
    models = [m.strip() for m in args.models.split(",")]
    if unknown := [m for m in models if m not in MODELS]:
      raise UsageError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    settings = parse_settings(args.settings)
    workdir = Path(args.workdir)
    rows = run_study(base, workdir, models, settings)
  except (UsageError, TrainError) as e:
    fail(str(e))
  print(write_report(rows, workdir, base))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
