"""DiLoCo study: data parallelism vs DiLoCo vs Streaming DiLoCo on the same LM, data and steps (equal tokens).

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.diloco_study --config tiny_diloco
--workdir runs/diloco_study``

Papers: "DiLoCo: Distributed Low-Communication Training of Language Models" (arXiv:2311.08105); "Streaming DiLoCo
with overlapping communication: Towards a Distributed Free Lunch" (arXiv:2501.18512), whose Table 5 compares DP,
DiLoCo and 4-bit streaming at H ∈ {30, 100} and Table 1 claims 400x fewer bytes than bf16 DP at equal loss.

A variant is ``dp`` (the ``first_order`` regime over every device) or ``h<H>-p<P>-t<τ>-a<α>-<wire>`` (the ``diloco``
regime with the preset's replica count), e.g. ``h30-p3-t1-a0.5-e3m0``. Each variant is a full
``research.train.train_and_evaluate`` run in ``<workdir>/<variant>`` (a finished one is only re-evaluated).
Afterwards the study writes ``eval_loss.png`` (eval loss vs step of every variant, and final eval loss vs bytes
each replica sent), ``study.json`` and ``study.md``: final eval loss, its gap to DP, bytes per replica in total and
at the peak sync, and the reduction against DP in float32 (what ``first_order`` sends) and in bf16 (the paper's
baseline), with the verdict on "within 2% of DP with >= 100x fewer bytes (>= 400x with a 4-bit Δ)".
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.train import parser  # noqa: E402
from optim.diloco import DiLoCoConfig  # noqa: E402
from research.cli import UsageError, fail  # noqa: E402
from research.config import ConfigError, to_json  # noqa: E402
from research.data import CorpusError  # noqa: E402
from research.metrics import read_metrics  # noqa: E402
from research.train import TrainConfig, TrainError, train_and_evaluate  # noqa: E402

DEFAULT_VARIANTS = ("dp,h30-p1-t0-a0-fp32,h100-p1-t0-a0-fp32,h30-p3-t0-a0-fp32,h30-p3-t1-a0.5-fp32,"
                    "h30-p3-t1-a0.5-bf16,h30-p3-t0-a0-e3m0,h30-p3-t0-a0.5-e3m0,h30-p3-t1-a0-e3m0,"
                    "h30-p3-t1-a0.5-e3m0,h100-p2-t1-a0.5-e3m0")
_SPEC = re.compile(r"h(?P<h>\d+)-p(?P<p>\d+)-t(?P<t>\d+)-a(?P<a>[0-9.]+)-(?P<wire>\w+)$")
FOUR_BIT = ("e2m1", "e3m0")


def parse_variant(spec: str, cfg: TrainConfig) -> TrainConfig:
  """``'dp'`` or ``'h30-p3-t1-a0.5-e3m0'`` -> the run config of that variant (``UsageError`` if malformed)."""
  if spec == "dp":
    return dataclasses.replace(cfg, regime="first_order")
  match = _SPEC.match(spec)
  if match is None:
    raise UsageError(f"variant {spec!r}: expected dp or h<H>-p<P>-t<tau>-a<alpha>-<wire>, e.g. h30-p3-t1-a0.5-e3m0")
  base = cfg.plugins.get("diloco") or DiLoCoConfig()
  try:
    diloco = dataclasses.replace(base, sync_every=int(match["h"]), fragments=int(match["p"]),
                                 overlap_steps=int(match["t"]), alpha=float(match["a"]), wire=match["wire"])
    return dataclasses.replace(cfg, regime="diloco", plugins={**cfg.plugins, "diloco": diloco})
  except (ConfigError, ValueError) as e:
    raise UsageError(f"variant {spec!r}: {e}") from None


def plot(rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
  fig, (curves, scatter) = plt.subplots(1, 2, figsize=(13, 5))
  for i, row in enumerate(rows):
    evals = [(r["step"], r["loss"]) for r in runs[row["variant"]] if r["split"] == "eval"]
    style = "-" if row["variant"] == "dp" else ("--" if row["wire"] in FOUR_BIT else ":")
    color = plt.cm.tab20(i % 20)
    curves.plot(*zip(*evals, strict=True), style, marker="o", ms=3, color=color, label=row["variant"])
    scatter.scatter(row["bytes_per_replica"], row["final_eval_loss"], color=color)
    scatter.annotate(row["variant"], (row["bytes_per_replica"], row["final_eval_loss"]), fontsize=7)
  curves.set(xlabel="step", ylabel="eval loss (nats/token)", title=title)
  scatter.set(xscale="log", xlabel="bytes sent per replica (total)", ylabel="final eval loss",
              title="final eval loss vs communication")
  curves.legend(fontsize=7)
  for ax in (curves, scatter):
    ax.grid(alpha=0.3)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| variant | H | P | τ | α | Δ on the wire | final eval loss | vs DP | bytes/replica | peak/sync | "
           "fewer than DP fp32 | fewer than DP bf16 | within 2% and >= target |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    gap = "" if r["eval_loss_vs_dp"] is None else f"{100 * r['eval_loss_vs_dp']:+.2f}%"
    if r["variant"] == "dp":
      lines.append(f"| dp | 1 | | | | fp32 gradients | {r['final_eval_loss']:.4f} | | "
                   f"{_mib(r['bytes_per_replica'])} | {_mib(r['peak_bytes_per_sync'])} | (baseline) | | |")
      continue
    verdict = "yes" if r["meets_claim"] else "no"
    lines.append(f"| {r['variant']} | {r['sync_every']} | {r['fragments']} | {r['overlap_steps']} | {r['alpha']:g} | "
                 f"{r['wire']} | {r['final_eval_loss']:.4f} | {gap} | {_mib(r['bytes_per_replica'])} | "
                 f"{_mib(r['peak_bytes_per_sync'])} | {r['reduction_vs_dp_fp32']:.0f}x | "
                 f"{r['reduction_vs_dp_bf16']:.0f}x | {verdict} (target {r['target_reduction']}x vs bf16) |")
  return "\n".join(lines)


def _mib(num_bytes: float) -> str:
  return f"{num_bytes / 2 ** 20:.2f} MiB"


def run_study(cfg: TrainConfig, workdir: Path, variants: list[str]) -> list[dict[str, Any]]:
  workdir.mkdir(parents=True, exist_ok=True)
  rows, runs, dp_bytes = [], {}, None
  for spec in variants:
    variant_cfg = parse_variant(spec, cfg)
    summary = train_and_evaluate(variant_cfg, workdir / spec)
    runs[spec] = read_metrics(workdir / spec / "metrics.jsonl")
    row = {"variant": spec, "final_eval_loss": summary["final_eval_loss"],
           "final_train_loss": summary["final_train_loss"], "steps": variant_cfg.steps,
           "seconds_this_session": summary["seconds_this_session"]}
    if spec != "dp":
      d = summary["diloco"]
      dp_bytes = summary["data_parallel_bytes_per_replica_total"]
      row.update(sync_every=d["sync_every"], fragments=d["fragments"], overlap_steps=d["overlap_steps"],
                 alpha=d["alpha"], wire=d["wire"], replicas=d["replicas"],
                 bytes_per_replica=summary["bytes_per_replica_total"], peak_bytes_per_sync=d["peak_bytes_per_sync"],
                 dp_bytes_fp32=dp_bytes, dp_bytes_bf16=summary["data_parallel_bf16_bytes_per_replica_total"])
    rows.append(row)
  dp = next((r for r in rows if r["variant"] == "dp"), None)
  for r in rows:
    r["eval_loss_vs_dp"] = None if dp is None or r is dp else r["final_eval_loss"] / dp["final_eval_loss"] - 1
    if r["variant"] == "dp":  # what first_order sends over the same replica groups: float32 gradients every step
      r.update(wire="fp32", bytes_per_replica=dp_bytes or 0, peak_bytes_per_sync=(dp_bytes or 0) / r["steps"])
      continue
    r["reduction_vs_dp_fp32"] = r["dp_bytes_fp32"] / r["bytes_per_replica"]
    r["reduction_vs_dp_bf16"] = r["dp_bytes_bf16"] / r["bytes_per_replica"]
    r["target_reduction"] = 400 if r["wire"] in FOUR_BIT else 100
    r["meets_claim"] = bool(r["eval_loss_vs_dp"] is not None and r["eval_loss_vs_dp"] <= 0.02
                            and r["reduction_vs_dp_bf16"] >= r["target_reduction"])
  print(write_report(cfg, workdir, rows, runs))
  return rows


def write_report(cfg: TrainConfig, workdir: Path, rows: list[dict[str, Any]], runs: dict[str, list]) -> str:
  """``eval_loss.png``, ``study.json`` and ``study.md`` (the table and the verdict); returns the markdown."""
  plot(rows, runs, workdir / "eval_loss.png",
       f"{cfg.task} LM d={cfg.model.d_model} x{len(cfg.model.layers)}, {cfg.steps} steps, equal tokens")
  met = [r["variant"] for r in rows if r.get("meets_claim")]
  verdict = (f"within 2% of DP with the target reduction: {', '.join(met)}" if met else
             "no variant is within 2% of DP's eval loss with >= 100x (>= 400x at 4 bits) fewer bytes than bf16 DP")
  (workdir / "study.json").write_text(json.dumps({"config": to_json(cfg), "rows": rows, "verdict": verdict},
                                                 indent=2) + "\n")
  report = f"{markdown_table(rows)}\n\n{verdict}\n"
  (workdir / "study.md").write_text(report)
  return report


def parse_variants(text: str, cfg: TrainConfig) -> list[str]:
  """The comma-separated variant names of ``text``, each checked against ``cfg`` (``UsageError`` otherwise)."""
  variants = [v.strip() for v in text.split(",") if v.strip()]
  for spec in variants:
    parse_variant(spec, cfg)
  return variants


def _flags(p) -> None:
  p.add_argument("--workdir", default=None, help="study folder (default: runs/diloco_study_<config>)")
  p.add_argument("--variants", default=DEFAULT_VARIANTS,
                 help="comma-separated: dp, or h<H>-p<P>-t<tau>-a<alpha>-<wire> (e.g. h30-p3-t1-a0.5-e3m0)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  cli = parser(description=__doc__.splitlines()[0], default_preset="tiny_diloco", extra=_flags,
               prog="python -m experiments.diloco_study", unselected_plugins=True)
  try:
    cfg, args = cli.parse(argv)
    workdir = Path(args.workdir or f"runs/diloco_study_{args.config}")
    return run_study(cfg, workdir, parse_variants(args.variants, cfg))
  except (UsageError, TrainError, CorpusError) as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
