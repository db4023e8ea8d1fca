"""ZO-SPSA study: one-byte zeroth-order fine-tuning against first-order AdamW from the same starting checkpoint.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.zo_study --init-from runs/tiny
--workdir runs/zo_study --steps 300``

MeZO (Malladi et al., arXiv 2305.17333) with the Just One Byte exchange (Zelikman et al., arXiv 2306.10015). Every
variant is a ``research.train.train_and_evaluate`` run of the ``tiny_zo`` preset in ``<workdir>/<variant>``
(resumable), on the same data (16 sequences per step) from the same ``--init-from`` checkpoint:

* ``adamw``: backprop + AdamW, data parallel over the 8 devices (``--adamw-lr``);
* ``zo<N>x<S>-<codec>``: ``--regime zo_spsa`` on N workers with S directions each, e.g. ``zo8x1-log8``; the default
  variants keep N·S = 8 directions per step ("equal samples"), so N = 1, 2, 8 differ only in how the directions
  and the examples are spread over workers, and ``f32`` vs ``log8`` only in the code.

Writes ``loss_curves.png``, ``study.json`` and ``study.md``: final eval loss, XLA's peak memory of each step (per
device, from the run's ``memory.json``) next to a forward pass of the same model on the same per-device batch, and
the bytes each worker sends per step (ZO: S codes; AdamW: a ring all-reduce of the float32 gradient).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from experiments.galore_study import plot_curves, step_seconds
from experiments.train import parser
from research.cli import UsageError, fail
from research.config import to_json
from research.data import CorpusError
from research.memory import compiled_memory
from research.metrics import read_metrics
from research.train import TrainConfig, TrainError, build_model, train_and_evaluate
from research.train.steps import lm_loss

DEFAULT_VARIANTS = "adamw,zo8x1-log8,zo8x1-f32,zo2x4-log8,zo1x8-log8"
_ZO = re.compile(r"^zo(\d+)x(\d+)-(log8|job9|f32)$")


def variant_config(spec: str, cfg: TrainConfig, adamw_lr: float) -> TrainConfig:
  """The run config of variant ``spec`` (module docstring) derived from the ``tiny_zo``-shaped ``cfg``."""
  if spec == "adamw":
    return dataclasses.replace(cfg, regime="first_order", optimizer="adamw", learning_rate=adamw_lr, grad_clip=1.0)
  match = _ZO.match(spec)
  if not match:
    raise UsageError(f"variant {spec!r}: expected adamw or zo<N>x<S>-<codec> such as zo8x1-log8")
  workers, samples, codec = int(match[1]), int(match[2]), match[3]
  plugins = dict(cfg.plugins)
  plugins["zo_spsa"] = dataclasses.replace(plugins["zo_spsa"], workers=workers, codec=codec)
  plugins["mezo_sgd"] = dataclasses.replace(plugins["mezo_sgd"], num_samples=samples)
  return dataclasses.replace(cfg, plugins=plugins)


def forward_peak_bytes(cfg: TrainConfig, batch: int) -> int:
  """XLA's peak estimate of ``lm_loss`` on one device for ``batch`` sequences (the inference baseline)."""
  model = build_model(cfg, abstract=True)
  tokens = jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32)
  compiled = jax.jit(lambda p, b: lm_loss(model.merge(p), b, cfg.model.aux_loss_weight)).lower(
      model.params, {"inputs": tokens, "labels": tokens}).compile()
  return compiled_memory(compiled)["peak_estimate_bytes"]


def _row(spec: str, cfg: TrainConfig, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
  records = read_metrics(run_dir / "metrics.jsonl")
  memory = json.loads((run_dir / "memory.json").read_text())["compiled"]
  params = sum(int(x.size) for x in jax.tree.leaves(build_model(cfg, abstract=True).params))
  if cfg.regime == "zo_spsa":
    workers = cfg.plugins["zo_spsa"].workers or len(jax.devices())
    per_device, sent = cfg.batch_size // workers, summary["bytes_per_worker_per_step"]
    ledger_bytes = (run_dir / "zo" / "ledger.bin").stat().st_size
  else:
    workers = len(jax.devices())
    per_device, sent = cfg.batch_size // workers, 2 * (workers - 1) / workers * 4 * params  # ring all-reduce
    ledger_bytes = None
  evals = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
  return {"variant": spec, "regime": cfg.regime, "workers": workers, "sequences_per_device": per_device,
          "learning_rate": cfg.learning_rate, "final_eval_loss": summary["final_eval_loss"],
          "eval_curve": evals, "final_train_loss": summary["final_train_loss"],
          "step_peak_bytes": memory["peak_estimate_bytes"], "step_temp_bytes": memory["temp_size_in_bytes"],
          "forward_peak_bytes": forward_peak_bytes(cfg, per_device), "bytes_sent_per_worker_per_step": sent,
          "ledger_bytes": ledger_bytes, "params": params,
          "step_seconds": step_seconds(records, cfg.tokens_per_step), "param_sha256": summary.get("param_sha256")}


def markdown_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| variant | workers x seqs | lr | final eval loss | step peak (MiB/device) | forward peak | ratio | "
           "bytes sent / worker / step | step (ms) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ms = "" if r["step_seconds"] is None else f"{1e3 * r['step_seconds']:.0f}"
    sent = r["bytes_sent_per_worker_per_step"]
    lines.append(f"| {r['variant']} | {r['workers']} x {r['sequences_per_device']} | {r['learning_rate']:g} | "
                 f"{r['final_eval_loss']:.4f} | {r['step_peak_bytes'] / 2**20:.2f} | "
                 f"{r['forward_peak_bytes'] / 2**20:.2f} | {r['step_peak_bytes'] / r['forward_peak_bytes']:.2f}x | "
                 f"{sent:,.0f} | {ms} |")
  return "\n".join(lines)


def write_report(workdir: Path, cfg: TrainConfig, rows: list[dict[str, Any]], runs: dict[str, list]) -> str:
  """``study.json`` (config, starting eval loss, rows), ``study.md`` and ``loss_curves.png``; returns the table."""
  source = Path(cfg.init_from) / "summary.json" if cfg.init_from else None
  start = json.loads(source.read_text())["final_eval_loss"] if source and source.exists() else None
  heading = (f"Fine-tuning from {cfg.init_from} (eval loss {start:.4f} at the start), {cfg.steps} steps of "
             f"{cfg.batch_size} x {cfg.seq_len} tokens" if start is not None else f"{cfg.steps} steps from scratch")
  table = markdown_table(rows)
  (workdir / "study.md").write_text(f"{heading}\n\n{table}\n")
  (workdir / "study.json").write_text(json.dumps({"config": to_json(cfg), "start_eval_loss": start, "rows": rows},
                                                 indent=2) + "\n")
  plot_curves(runs, workdir / "loss_curves.png", f"d={cfg.model.d_model} x{len(cfg.model.layers)}: {heading}")
  return f"{heading}\n{table}"


def run_study(cfg: TrainConfig, workdir: Path, variants: list[str], adamw_lr: float) -> list[dict[str, Any]]:
  """Train every variant in ``workdir/<variant>`` (resuming finished or partial runs) and write the report."""
  workdir.mkdir(parents=True, exist_ok=True)
  rows, runs = [], {}
  for spec in variants:
    variant_cfg = variant_config(spec, cfg, adamw_lr)
    summary = train_and_evaluate(variant_cfg, workdir / spec)
    runs[spec] = read_metrics(workdir / spec / "metrics.jsonl")
    rows.append(_row(spec, variant_cfg, workdir / spec, summary))
  print(write_report(workdir, cfg, rows, runs))
  return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  def extra(p):
    p.add_argument("--workdir", default="runs/zo_study", help="study folder")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated: adamw, zo<N>x<S>-<codec>")
    p.add_argument("--adamw-lr", type=float, default=3e-4, help="learning rate of the adamw variant")

  try:
    cfg, args = parser(description=__doc__.splitlines()[0], default_preset="tiny_zo", extra=extra,
                       prog="python -m experiments.zo_study", unselected_plugins=True).parse(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
      variant_config(v, cfg, args.adamw_lr)
    return run_study(cfg, Path(args.workdir), variants, args.adamw_lr)
  except (UsageError, TrainError, CorpusError) as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
