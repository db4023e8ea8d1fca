"""MQAR study: softmax attention vs Gated DeltaNet vs Mixture-of-Memories at matched width.

``python -m experiments.mqar --config mqar_tiny --workdir runs/mqar --settings 64x4,64x16,128x16``

On a host with several GPUs, one process per GPU shares the workdir and takes its part of the grid with
``--shard K/N`` (``CUDA_VISIBLE_DEVICES=K python -m experiments.mqar ... --shard K/N``); cells are balanced by
their token count, and every process rewrites the report over all cells finished so far. ``--report-only``
writes the report over the finished cells of the grid without training any.

Task: Zoology multi-query associative recall ("Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927) from ``research.data.mqar``. Models: 2-layer decoders whose mixers are all ``attn``,
all ``gdn`` or all ``mom`` (MoM: "MoM: Linear Sequence Modeling with Mixture-of-Memories", arXiv 2502.13685;
4 memories, top-2, shared memory), same d_model/heads, so every GDN memory (and every MoM memory) has the same
state size H·K·V per layer. Each (model, T, kv-pairs) cell is one ``research.train.train_and_evaluate`` run in
``<workdir>/<model>_T<T>_D<D>[_seed<S>]`` (resumable; a finished cell is read back, not re-run). ``--seeds 0,1,2``
runs every cell once per seed (MQAR's learning transition depends on the seed); the table then shows the mean and
each seed's accuracy. Writes ``study.json``, ``study.md`` (accuracy table) and ``accuracy_vs_kv_pairs.png`` (one
panel per sequence length) into the workdir.
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

from experiments.train import parser
from research.cli import UsageError, fail
from research.train import TrainConfig, TrainError, config_changes, train_and_evaluate

MODELS = {"attn": ("attn", "attn"), "gdn": ("gdn", "gdn"), "mom": ("mom", "mom"),
          **{m: (m, m) for m in ("moneta", "yaad", "memora", "titans")}}  # Miras deep memories (layers.miras)


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


Cell = tuple[str, int, int, int]  # (model, sequence length T, key-value pairs D, seed)


def grid(models: list[str], settings: list[tuple[int, int]], seeds: tuple[int, ...]) -> list[Cell]:
  """Every (model, T, D, seed) cell of a study, setting by setting."""
  return [(name, t, d, seed) for t, d in settings for name in models for seed in seeds]


def cell_config(base: TrainConfig, cell: Cell) -> TrainConfig:
  """``base`` with the cell's mixers, sequence length, pair count and seed."""
  model, seq_len, kv_pairs, seed = cell
  task = dataclasses.replace(base.task_config, num_kv_pairs=kv_pairs)
  return dataclasses.replace(base, seq_len=seq_len, seed=seed, plugins={**base.plugins, "mqar": task},
                             model=dataclasses.replace(base.model, layers=MODELS[model]))


def cell_dir(workdir: Path, cell: Cell) -> Path:
  """Where one cell's run lives: ``<workdir>/<model>_T<T>_D<D>``, with ``_seed<S>`` for seeds other than 0."""
  model, seq_len, kv_pairs, seed = cell
  return workdir / (f"{model}_T{seq_len}_D{kv_pairs}" + (f"_seed{seed}" if seed else ""))


def finished_summary(cfg: TrainConfig, cell: Path) -> dict | None:
  """The cell's ``summary.json`` if it already finished ``cfg`` (same config up to ``RESUMABLE_CHANGES``, final
  step reached), else None."""
  summary_path, config_path = cell / "summary.json", cell / "config.json"
  if not (summary_path.exists() and config_path.exists()):
    return None
  summary = json.loads(summary_path.read_text())
  same_run = not config_changes(json.loads(config_path.read_text()), cfg)
  return summary if same_run and summary.get("final_step") == cfg.steps else None


def shard_cells(cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
  """Shard ``k`` of ``n``: longest-first greedy balance of the cells' sequence lengths (tokens per step ∝ T)."""
  k, n = shard
  loads, owner = [0] * n, {}
  for cell in sorted(cells, key=lambda c: -c[1]):
    owner[cell] = min(range(n), key=loads.__getitem__)
    loads[owner[cell]] += cell[1]
  return [c for c in cells if owner[c] == k]


def collect_rows(base: TrainConfig, workdir: Path, cells: list[Cell]) -> list[dict]:
  """One result row per finished cell of the grid."""
  rows = []
  for cell in cells:
    cfg = cell_config(base, cell)
    if summary := finished_summary(cfg, cell_dir(workdir, cell)):
      name, t, d, seed = cell
      rows.append({"model": name, "seq_len": t, "kv_pairs": d, "seed": seed,
                   "accuracy": summary["final_eval_accuracy"], "eval_loss": summary["final_eval_loss"],
                   "steps": cfg.steps, "d_model": cfg.model.d_model, "seconds": summary["seconds_this_session"],
                   "device": summary.get("device_kind")})
  return rows


def run_study(base: TrainConfig, workdir: Path, models: list[str], settings: list[tuple[int, int]],
              shard: tuple[int, int] = (0, 1), seeds: tuple[int, ...] = (0,),
              accept_changes: tuple[str, ...] = ()) -> list[dict]:
  """Train/evaluate this shard's unfinished cells, rewriting the report over every finished cell after each one;
  returns the rows of all finished cells of the grid. ``accept_changes`` lets existing cells continue under changed
  run settings (e.g. ``steps``: extend a study), as ``train_and_evaluate``'s."""
  cells = grid(models, settings, seeds)
  for cell in shard_cells(cells, shard):
    cfg, run_dir = cell_config(base, cell), cell_dir(workdir, cell)
    if finished_summary(cfg, run_dir) is None:
      train_and_evaluate(cfg, run_dir, accept_changes=accept_changes)
      write_report(collect_rows(base, workdir, cells), workdir, base)
  return collect_rows(base, workdir, cells)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
  """``write`` to a sibling temp file, then rename: processes sharing a workdir never see a half-written report."""
  tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
  write(tmp)
  tmp.replace(path)


def _accuracy_cell(values: list[float]) -> str:
  """One table entry: the accuracy, or over several seeds the mean and every seed's value (— if none)."""
  if not values:
    return "—"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{sum(values) / len(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})"


def write_report(rows: list[dict], workdir: Path, base: TrainConfig) -> str:
  """``study.json``, the markdown accuracy table (``study.md``; several seeds: mean (each seed), — marks
  unfinished cells) and the accuracy-vs-kv-pairs plot (mean line, one dot per seed); returns the table."""
  models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
  settings = sorted({(r["seq_len"], r["kv_pairs"]) for r in rows})
  acc: dict[tuple[str, int, int], list[float]] = {}
  for r in sorted(rows, key=lambda r: r.get("seed", 0)):
    acc.setdefault((r["model"], r["seq_len"], r["kv_pairs"]), []).append(r["accuracy"])
  lines = [f"| T | KV pairs | {' | '.join(models)} |", "|-|-|" + "-|" * len(models)]
  for t, d in settings:
    lines.append(f"| {t} | {d} | " + " | ".join(_accuracy_cell(acc.get((m, t, d), [])) for m in models) + " |")
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
      line, = ax.plot([d for d, _ in pts], [sum(v) / len(v) for _, v in pts], marker="o", label=m)
      if any(len(v) > 1 for _, v in pts):
        ax.scatter([d for d, v in pts for _ in v], [a for _, v in pts for a in v], s=10, color=line.get_color(),
                   alpha=0.5)
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


def parse_seeds(spec: str) -> tuple[int, ...]:
  """``"0,1,2"`` -> (0, 1, 2): distinct non-negative seeds."""
  try:
    seeds = tuple(int(x) for x in spec.split(","))
  except ValueError:
    raise UsageError(f"--seeds: expected a comma list of integers such as 0,1,2, got {spec!r}") from None
  if min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise UsageError(f"--seeds {spec}: seeds must be distinct and >= 0")
  return seeds


def main(argv: list[str] | None = None) -> list[dict]:
  def extra(parser):
    parser.add_argument("--workdir", default="runs/mqar", help="study folder")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--settings", default="64x4,64x16,128x16", help="TxD cells (seq len x kv pairs)")
    parser.add_argument("--shard", default="0/1", help="K/N: run only this process's part of the grid")
    parser.add_argument("--seeds", default=None, help="comma list of seeds per cell (default: --seed)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report over the grid's finished cells")
    parser.add_argument("--accept-change", action="append", default=[], metavar="KEY",
                        help="continue finished cells under a changed run setting, e.g. steps to extend the study")

  try:
    base, args = parser(description=__doc__.splitlines()[0], default_preset="mqar_tiny", extra=extra,
                        prog="python -m experiments.mqar", unselected_plugins=True).parse(argv)
    if base.task != "mqar":
      raise UsageError(f"the MQAR study needs --task mqar (the preset's task is {base.task!r})")
    models = [m.strip() for m in args.models.split(",")]
    if unknown := [m for m in models if m not in MODELS]:
      raise UsageError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    settings = parse_settings(args.settings)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else (base.seed,)
    if args.report_only:
      rows = collect_rows(base, workdir, grid(models, settings, seeds))
    else:
      rows = run_study(base, workdir, models, settings, parse_shard(args.shard), seeds, tuple(args.accept_change))
  except (UsageError, TrainError) as e:
    fail(str(e))
  print(write_report(rows, workdir, base))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
