"""``python -m memmap {solve, extract, train-agent}``: place buffers, extract them from XLA, train the agent.

Errors print one line (``memmap: error: ...``) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

from memmap import io_minimalloc, solvers


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise ValueError(message)


def _solve(args) -> None:
  inst, _ = io_minimalloc.read_csv(args.file, capacity=args.capacity)
  order = tuple(args.agent_order.split(",")) if args.agent_order != "trained" else None
  agent = solvers.AgentOptions(args.agent_dir, args.simulations, args.rollout_weight, order,
                               tuple(args.rollout_fits.split(",")), not args.no_fortify)
  sol = solvers.solve(inst, args.method, args.objective, args.time_limit, agent)
  print(f"{Path(args.file).name}: {sol.summary()}")
  if sol.offsets.size and args.out:
    io_minimalloc.write_csv(args.out, inst, sol.offsets)
    print(f"wrote {args.out}")
  if sol.offsets.size and args.plot:
    from memmap.plot import plot_placement
    plot_placement(inst, sol.offsets, args.plot, f"{Path(args.file).name} {args.method}: peak {sol.peak}")
    print(f"wrote {args.plot}")


def _lowered(args):
  import jax
  import jax.numpy as jnp
  if args.function:
    mod, _, name = args.function.partition(":")
    if not name:
      raise ValueError(f"--function {args.function!r} must look like 'package.module:function'.")
    fn = getattr(importlib.import_module(mod), name)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else []
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.dtype(args.dtype)) for s in shapes))
  from research.train import lower_train_step
  from research.train.presets import get_preset
  return lower_train_step(get_preset(args.config))


def _extract(args) -> None:
  from memmap.instance import load_bound
  from memmap.xla_extract import extract
  bufs = extract(_lowered(args), capacity_fraction=args.capacity_fraction)
  inst = bufs.instance
  print(f"{len(bufs.schedule)} scheduled ops, {inst.n} temp buffers, load bound L={load_bound(inst)}, "
        f"XLA temp height={bufs.xla_height}, capacity={inst.capacity}")
  for name, (ours, xla) in bufs.totals().items():
    print(f"  {name:9s} buffer-assignment {ours:>12d}  memory_analysis {xla:>12d}  {'ok' if ours == xla else 'MISMATCH'}")
  if args.out:
    io_minimalloc.write_csv(args.out, inst)
    io_minimalloc.write_csv(Path(args.out).with_suffix(".xla.csv"), inst, bufs.xla_offsets)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.xla.csv')} (XLA's layout)")


def _train(args) -> None:
  from memmap.agent.train import AgentConfig, train
  base = AgentConfig.tiny() if args.tiny else AgentConfig()
  overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(AgentConfig)}
               and v is not None}
  cfg = dataclasses.replace(base, **overrides)
  _, history = train(cfg, args.workdir)
  (Path(args.workdir) / "history.json").write_text(json.dumps(history, indent=1))
  _plot_history(history, Path(args.workdir) / "history.png")
  print(f"trained {cfg.iterations} iterations; checkpoints in {args.workdir}")


def _plot_history(history: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([h["iteration"] for h in history], [h["height_over_opt"] for h in history], label="self-play height / opt")
  ax.plot([h["iteration"] for h in history], [h["optimal"] for h in history], label="fraction optimal")
  ax.set_xlabel("iteration")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m memmap", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  s = sub.add_parser("solve", help="place the buffers of a MiniMalloc CSV file")
  s.add_argument("file")
  s.add_argument("--method", choices=solvers.METHODS, default="best_fit")
  s.add_argument("--objective", choices=solvers.OBJECTIVES, default="height")
  s.add_argument("--capacity", type=int, default=None, help="bytes; default from NAME.<capacity>.csv")
  s.add_argument("--time-limit", type=float, default=60.0, help="CP-SAT seconds")
  s.add_argument("--agent-dir", default=None, help="folder of a train-agent run")
  s.add_argument("--simulations", type=int, default=64, help="agent search simulations per move")
  s.add_argument("--rollout-weight", type=float, default=1.0,
                 help="agent leaf value = (1-w) * network value + w * heuristic rollout return")
  s.add_argument("--rollout-fits", default="first",
                 help="the leaf rollout's heuristics, comma list of best,first (the best completion counts)")
  s.add_argument("--agent-order", default="spatial,chronological",
                 help="buffer order(s) for the agent, a comma list: one episode each, the best is kept ('trained': "
                      "the network's training order)")
  s.add_argument("--no-fortify", action="store_true",
                 help="return the searched episode alone, without keeping the best best/first-fit completion")
  s.add_argument("--out", default=None, help="solution CSV (id,lower,upper,size,offset)")
  s.add_argument("--plot", default=None, help="PNG of the placement")
  s.set_defaults(run=_solve)
  e = sub.add_parser("extract", help="dump the temp buffers of a compiled train step (or any jitted function)")
  e.add_argument("--config", default="tiny", help="preset of the train step (research.train.presets)")
  e.add_argument("--function", default=None, help="'module:function' to jit instead of a train step")
  e.add_argument("--shapes", default="", help="argument shapes for --function, e.g. 64x128,128x256")
  e.add_argument("--dtype", default="float32")
  e.add_argument("--capacity-fraction", type=float, default=1.0, help="capacity = this * XLA's temp height")
  e.add_argument("--out", default=None, help="CSV of the buffers (XLA's layout goes to OUT.xla.csv)")
  e.set_defaults(run=_extract)
  t = sub.add_parser("train-agent", help="self-play training of the Gumbel MuZero agent")
  t.add_argument("--workdir", default="runs/memmap_agent")
  t.add_argument("--tiny", action="store_true", help="the seconds-long CPU config")
  for name in ("iterations", "n_min", "n_max", "batch_envs", "num_simulations", "seed", "pack_width", "pack_height"):
    t.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
  t.add_argument("--order", default=None, help="buffer order of the game (memmap.orders.ORDERS)")
  t.set_defaults(run=_train)
  return p


def main(argv: list[str] | None = None) -> int:
  try:
    args = build_parser().parse_args(argv)
    args.run(args)
  except (ValueError, FileNotFoundError, RuntimeError, ImportError, AttributeError, KeyError, OSError) as e:
    print(f"memmap: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 2
  return 0
