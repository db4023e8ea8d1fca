"""MQAR study: softmax attention vs Gated DeltaNet vs Mixture-of-Memories at matched width.

``python -m experiments.mqar --config mqar_tiny --workdir runs/mqar --settings 64x4,64x16,128x16``

On a host with several GPUs, one process per GPU shares the workdir and takes its part of the grid with
``--shard K/N`` (``CUDA_VISIBLE_DEVICES=K python -m experiments.mqar ... --shard K/N``); cells are balanced by
their token count, and every process rewrites the report over all cells finished so far.

Task: Zoology multi-query associative recall ("Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927) from ``research.data.mqar``. Models: 2-layer decoders whose mixers are all ``attn``,
all ``gdn`` or all ``mom`` (MoM: "MoM: Linear Sequence Modeling with Mixture-of-Memories", arXiv 2502.13685;
4 memories, top-2, shared memory), same d_model/heads, so every GDN memory (and every MoM memory) has the same
state size H·K·V per layer. Each (model, T, kv-pairs) cell is one ``research.train.train_and_evaluate`` run in
``<workdir>/<model>_T<T>_D<D>`` (resumable; a finished cell is read back, not re-run). Writes ``study.json``,
``study.md`` (accuracy table) and ``accuracy_vs_kv_pairs.png`` (one panel per sequence length) into the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.configs import PRESETS
from research.cli import UsageError, fail, parse_run_args
from research.train import TrainConfig, TrainError, config_changes, train_and_evaluate

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


def cell_config(base: TrainConfig, model: str, seq_len: int, kv_pairs: int) -> TrainConfig:
  """``base`` with the cell's mixers, sequence length and pair count."""
  return dataclasses.replace(base, seq_len=seq_len, mqar_kv_pairs=kv_pairs,
                             model=dataclasses.replace(base.model, layers=MODELS[model]))


def cell_dir(workdir: Path, model: str, seq_len: int, kv_pairs: int) -> Path:
  """Where one cell's run lives: ``<workdir>/<model>_T<T>_D<D>``."""
  return workdir / f"{model}_T{seq_len}_D{kv_pairs}"


def finished_summary(cfg: TrainConfig, cell: Path) -> dict | None:
  """The cell's ``summary.json`` if it already finished ``cfg`` (same config up to ``RESUMABLE_CHANGES``, final
  step reached), else None."""
  summary_path, config_path = cell / "summary.json", cell / "config.json"
  if not (summary_path.exists() and config_path.exists()):
    return None
  summary = json.loads(summary_path.read_text())
  same_run = not config_changes(json.loads(config_path.read_text()), cfg)
  return summary if same_run and summary.get("final_step") == cfg.steps else None


def shard_cells(cells: list[tuple[str, int, int]], shard: tuple[int, int]) -> list[tuple[str, int, int]]:
  """Shard ``k`` of ``n``: longest-first greedy balance of the cells' sequence lengths (tokens per step ∝ T)."""
  k, n = shard
  loads, owner = [0] * n, {}
  for cell in sorted(cells, key=lambda c: -c[1]):
    owner[cell] = min(range(n), key=loads.__getitem__)
    loads[owner[cell]] += cell[1]
  return [c for c in cells if owner[c] == k]


def collect_rows(base: TrainConfig, workdir: Path, cells: list[tuple[str, int, int]]) -> list[dict]:
  """One result row per finished cell of the grid."""
  rows = []
  for name, t, d in cells:
    cfg = cell_config(base, name, t, d)
    if summary := finished_summary(cfg, cell_dir(workdir, name, t, d)):
      rows.append({"model": name, "seq_len": t, "kv_pairs": d, "accuracy": summary["final_eval_accuracy"],
                   "eval_loss": summary["final_eval_loss"], "steps": cfg.steps, "d_model": cfg.model.d_model,
                   "seconds": summary["seconds_this_session"], "device": summary.get("device_kind")})
  return rows


def run_study(base: TrainConfig, workdir: Path, models: list[str], settings: list[tuple[int, int]],
              shard: tuple[int, int] = (0, 1)) -> list[dict]:
  """Train/evaluate this shard's unfinished cells, rewriting the report over every finished cell after each one;
  returns the rows of all finished cells of the grid."""
  cells = [(name, t, d) for t, d in settings for name in models]
  for name, t, d in shard_cells(cells, shard):
    cfg = cell_config(base, name, t, d)
    cell = cell_dir(workdir, name, t, d)
    if finished_summary(cfg, cell) is None:
      train_and_evaluate(cfg, cell)
      write_report(collect_rows(base, workdir, cells), workdir, base)
  return collect_rows(base, workdir, cells)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
  """``write`` to a sibling temp file, then rename: processes sharing a workdir never see a half-written report."""
  tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
  write(tmp)
  tmp.replace(path)


def write_report(rows: list[dict], workdir: Path, base: TrainConfig) -> str:
  """``study.json``, the markdown accuracy table (``study.md``; — marks unfinished cells) and the
  accuracy-vs-kv-pairs plot; returns the table."""
  models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
  settings = sorted({(r["seq_len"], r["kv_pairs"]) for r in rows})
  acc = {(r["model"], r["seq_len"], r["kv_pairs"]): r["accuracy"] for r in rows}
  lines = [f"| T | KV pairs | {' | '.join(models)} |", "|-|-|" + "-|" * len(models)]
  for t, d in settings:
    lines.append(f"| {t} | {d} | " + " | ".join(f"{acc[(m, t, d)]:.3f}" if (m, t, d) in acc else "—"
                                               for m in models) + " |")
  table = "\n".join(lines)
  _write_atomic(workdir / "study.json", lambda p: p.write_text(json.dumps(rows, indent=1) + "\n"))
  _write_atomic(workdir / "study.md", lambda p: p.write_text(
      f"MQAR eval accuracy (scored value tokens); d_model={base.model.d_model}, heads={base.model.num_heads}, "
      f"vocab={base.model.vocab_size}, {base.steps} steps × batch {base.batch_size}, lr {base.learning_rate}\n\n"
      + table + "\n"))
  lengths = sorted({t for t, _ in settings})
  fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(4 * max(len(lengths), 1), 3.2), squeeze=False)
  for ax, t in zip(axes[0], lengths):
    for m in models:
      pts = sorted((d, acc[(m, tt, d)]) for tt, d in settings if tt == t and (m, tt, d) in acc)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set(title=f"T = {t}", xlabel="KV pairs", ylabel="eval accuracy", ylim=(0, 1.02))
    ax.set_xscale("log", base=2)
    ax.legend()
  fig.tight_layout()
  _write_atomic(workdir / "accuracy_vs_kv_pairs.png", lambda p: fig.savefig(p, dpi=120, format="png"))
  plt.close(fig)
  return table


def parse_shard(spec: str) -> tuple[int, int]:
  """``"1/4"`` -> (1, 4), with 0 <= K < N."""
  try:
    k, n = (int(x) for x in spec.split("/"))
  except ValueError:
    raise UsageError(f"--shard: expected K/N such as 0/4, got {spec!r}") from None
  if not 0 <= k < n:
    raise UsageError(f"--shard {spec}: need 0 <= K < N")
  return k, n


def main(argv: list[str] | None = None) -> list[dict]:
  def extra(parser):
    parser.add_argument("--workdir", default="runs/mqar", help="study folder")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--settings", default="64x4,64x16,128x16", help="TxD cells (seq len x kv pairs)")
    parser.add_argument("--shard", default="0/1", help="K/N: run only this process's part of the grid")

  try:
    base, args = parse_run_args(argv, config_cls=TrainConfig, presets=PRESETS, default_preset="mqar_tiny",
                                description=__doc__.splitlines()[0], extra=extra)
    models = [m.strip() for m in args.models.split(",")]
    if unknown := [m for m in models if m not in MODELS]:
      raise UsageError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    settings = parse_settings(args.settings)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = run_study(base, workdir, models, settings, parse_shard(args.shard))
  except (UsageError, TrainError) as e:
    fail(str(e))
  print(write_report(rows, workdir, base))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
