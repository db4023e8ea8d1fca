"""mallocGame study: every placement method on the MiniMalloc "challenging" set and on memlab's own train steps.

MiniMalloc A-F (google/minimalloc ``benchmarks/challenging``, Apache-2.0): perfect packings, optimum peak exactly
1,048,576 bytes. Extracted sets: the ``preallocated-temp`` buffers of ``research.train.lower_train_step`` for each
named config (CPU backend), compared with XLA's own temp layout. Per method: peak (height objective) vs optimum /
load bound, fit, solve time; for extracted sets also the modelled program time T/T_slow at half of XLA's temp size.
``cpsat_hinted`` / ``cpsat_fit_hinted`` start CP-SAT from the agent's layout (list them after ``agent``).

  PYTHONPATH=. python benchmarks/memmap_study.py --agent-dir runs/memmap_agent --out docs/memmap/study.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import time
from pathlib import Path

import jax
import numpy as np

from memmap.baselines import cpsat
from memmap.instance import SLOW, load_bound, validate
from memmap.io_minimalloc import read_csv
from memmap.plot import plot_placement
from memmap.solvers import HEURISTICS, AgentOptions, Solution, solve

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "minimalloc"
OPT = 1048576


def _row(sol, opt):
  return {"method": sol.method, "status": sol.status, "peak": sol.peak, "fits": bool(sol.fits),
          "over_opt_pct": 100.0 * (sol.peak / opt - 1.0) if sol.peak else None, "seconds": round(sol.seconds, 3)}


def _variants(method: str, args) -> list[tuple[str, AgentOptions | None]]:
  """(label, agent options) for each run of ``method``. An agent variant is
  'simulations:rollout_weight:orders[:fits=F1,F2][:plain]': orders and leaf-rollout fits are comma lists (default
  fits: best), and the search is fortified unless 'plain' is given."""
  if method != "agent":
    return [(method, None)]
  out = []
  for v in args.agent_variants:
    sims, weight, orders, *extra = v.split(":")
    fits = [e.removeprefix("fits=") for e in extra if e.startswith("fits=")]
    if len(fits) > 1 or set(extra) - {"plain", *(f"fits={f}" for f in fits)}:
      raise ValueError(f"agent variant {v!r}: expected 'simulations:rollout_weight:orders[:fits=F1,F2][:plain]'.")
    fits = tuple(fits[0].split(",")) if fits else ("best",)
    fortify = "plain" not in extra
    label = (f"agent[{orders.replace(',', '+')},w={weight},{sims}sims"
             f"{'' if fits == ('best',) else ',leaf=' + '+'.join(fits)}{',fortified' if fortify else ''}]")
    out.append((label, AgentOptions(args.agent_dir, int(sims), float(weight), tuple(orders.split(",")), fits,
                                    fortify)))
  return out


# CP-SAT height-model variants run by this script: (offsets bounded by the capacity, hinted with the agent's layout).
CPSAT_VARIANTS = {"cpsat_fit": (True, False), "cpsat_hinted": (False, True), "cpsat_fit_hinted": (True, True)}


def _cpsat(inst, method: str, time_limit: float, agent_offsets: np.ndarray | None) -> Solution:
  """``cpsat_fit*``: feasibility at the capacity (offsets bounded by C), as in MiniMalloc's comparison;
  ``*_hinted``: started from the best agent layout found on this instance earlier in the same run."""
  at_capacity, hinted = CPSAT_VARIANTS[method]
  if hinted and agent_offsets is None:
    raise ValueError(f"method {method!r} needs an agent run before it (list 'agent' first in --methods).")
  res = cpsat.solve_height(inst, time_limit=time_limit, upper_bound=inst.capacity if at_capacity else None,
                           hint=agent_offsets if hinted else None)
  off = res.offsets if res.offsets is not None else np.full(0, SLOW, np.int64)
  peak = validate(inst, off, capacity=inst.capacity if at_capacity else np.iinfo(np.int64).max) if off.size else 0
  return Solution(method, "height", off, peak, inst.capacity, load_bound(inst), off.size, float(off.size > 0),
                  res.status, res.seconds)


def minimalloc(methods, args, plots: Path) -> list[dict]:
  rows = []
  for name in args.instances:
    inst, _ = read_csv(DATA / f"{name}.1048576.csv")
    agent_best = None
    for method in methods:
      for label, opts in _variants(method, args):
        if method in CPSAT_VARIANTS:
          sol = _cpsat(inst, method, args.time_limit, None if agent_best is None else agent_best.offsets)
        else:
          sol = solve(inst, method, "height", args.time_limit, opts or AgentOptions())
        if method == "agent" and (agent_best is None or sol.peak < agent_best.peak):
          agent_best = sol
        row = {"instance": name, "n": inst.n, "L": load_bound(inst), **_row(sol, OPT), "method": label + args.tag}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if sol.offsets.size and method in ("best_fit", "cpsat", "agent") and name in args.plot:
          plot_placement(inst, sol.offsets, plots / f"{name}_{re.sub(r'[^A-Za-z0-9.=-]+', '_', label).strip('_')}.png",
                         f"MiniMalloc {name} {label}: peak {sol.peak} ({row['over_opt_pct']:+.1f}% over opt)")
  return rows


def extracted(methods, args, plots: Path) -> list[dict]:
  from experiments.configs import get_preset
  from research.train import lower_train_step
  from memmap.xla_extract import extract
  rows = []
  for cname in args.configs:
    cfg = get_preset(cname.split("+")[0])
    if "+" in cname:  # e.g. tiny+mom: the tiny run with every mixer replaced
      mixer = cname.split("+")[1]
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layers=(mixer,) * len(cfg.model.layers)))
    t0 = time.perf_counter()
    bufs = extract(lower_train_step(cfg))
    inst = bufs.instance
    lb = load_bound(inst)
    base = {"config": cname, "n": inst.n, "distinct_times": int(np.unique(np.r_[inst.lower, inst.upper]).size),
            "L": lb, "xla_temp": bufs.xla_height, "extract_s": round(time.perf_counter() - t0, 2),
            "totals_match": all(a == b for a, b in bufs.totals().values())}
    rows.append({**base, "method": "xla", "peak": bufs.xla_height, "over_L_pct": 100.0 * (bufs.xla_height / lb - 1)})
    print(json.dumps(rows[-1]), flush=True)
    plot_placement(inst.replace(capacity=bufs.xla_height), bufs.xla_offsets, plots / f"{cname}_xla.png",
                   f"{cname} train step: XLA temp layout, {bufs.xla_height} B (L={lb})")
    half = inst.replace(capacity=bufs.xla_height // 2)
    for method, opts in [v for m in methods if m not in CPSAT_VARIANTS for v in _variants(m, args)]:
      sol = solve(inst, method.split("[")[0], "height", args.time_limit, opts or AgentOptions())
      row = {**base, "method": method, "status": sol.status, "peak": sol.peak,
             "over_L_pct": 100.0 * (sol.peak / lb - 1) if sol.peak else None, "seconds": round(sol.seconds, 3)}
      if opts is None:
        ben = solve(half, method, "benefit", args.time_limit)
        fast = ben.offsets != SLOW if ben.offsets.size else np.zeros(inst.n, bool)
        if ben.offsets.size:
          validate(half, ben.offsets)
        row["T_over_Tslow_at_half"] = bufs.program.time(fast) / bufs.program.t_slow if ben.offsets.size else None
        row["benefit_status"], row["benefit_seconds"] = ben.status, round(ben.seconds, 3)
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def report(paths: list[str]) -> str:
  """Markdown tables (peak over optimum per instance x method; extracted sets) from one or more study JSONs."""
  mm, ex = [], []
  for path in paths:
    data = json.loads(Path(path).read_text())
    mm += data["minimalloc"]
    ex += data["extracted"]
  insts = sorted({r["instance"] for r in mm})
  methods = list(dict.fromkeys(r["method"] for r in mm))
  cell = {(r["instance"], r["method"]): r for r in mm}
  lines = ["| method | " + " | ".join(f"{i} % over opt (s)" for i in insts) + " | fits |",
           "|---|" + "---|" * (len(insts) + 1)]
  for m in methods:
    cells, fits = [], 0
    for i in insts:
      r = cell.get((i, m))
      if r is None:
        cells.append("")
        continue
      fits += r["fits"]
      val = "no solution" if r["over_opt_pct"] is None else f"{r['over_opt_pct']:+.2f}"
      status = f" {r['status']}" if r["status"] not in ("heuristic", "search") else ""
      cells.append(f"{val} ({r['seconds']:.1f}){status}")
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {fits}/{len(insts)} |")
  lines += ["", "| config | N | distinct times | method | peak B (% over L) | solve s | T/T_slow at C = XLA temp / 2 |",
            "|---|---|---|---|---|---|---|"]
  for r in ex:
    t, over = r.get("T_over_Tslow_at_half"), r["over_L_pct"]
    peak = f"{r['peak']} ({over:+.3f}%)" if over is not None else f"no solution ({r['status']})"
    lines.append(f"| {r['config']} | {r['n']} | {r['distinct_times']} | {r['method']} | {peak} | "
                 f"{r.get('seconds', r.get('extract_s'))} | {'' if t is None else f'{t:.4f}'} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--report", nargs="*", default=None, help="print markdown tables of these study JSONs and exit")
  p.add_argument("--instances", nargs="*", default=list("ABCDEF"))
  p.add_argument("--configs", nargs="*", default=["tiny", "mqar_tiny"])
  p.add_argument("--methods", nargs="*", default=list(HEURISTICS) + ["portfolio", "cpsat", "cpsat_fit", "agent"])
  p.add_argument("--time-limit", type=float, default=60.0)
  p.add_argument("--agent-variants", nargs="*", default=["16:1:spatial,chronological:fits=first"],
                 help="simulations:rollout_weight:orders[:fits=F1,F2][:plain] per agent run (comma lists; fits: "
                      "the leaf rollout's heuristics; plain: no fortification)")
  p.add_argument("--agent-dir", default=None)
  p.add_argument("--tag", default="", help="appended to every MiniMalloc row's method label (e.g. a rerun)")
  p.add_argument("--plot", nargs="*", default=["A", "F"])
  p.add_argument("--out", default="docs/memmap/study.json")
  args = p.parse_args()
  if args.report is not None:
    print(report(args.report))
    return
  methods = [m for m in args.methods if m != "agent" or args.agent_dir]
  plots = Path(args.out).parent
  plots.mkdir(parents=True, exist_ok=True)
  env = {"backend": jax.default_backend(), "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
         "time_limit_s": args.time_limit, "cpsat_workers": 2}
  result = {"env": env, "minimalloc": minimalloc(methods, args, plots), "extracted": extracted(methods, args, plots)}
  Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
