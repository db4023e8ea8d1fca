"""``python -m memmap {solve, extract, train-agent}``: place buffers, extract them from XLA, train the agent.

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning" (arXiv 2305.07440). The command line is
generated from one frozen config per subcommand by ``research.cli.CommandParser``: every field is a flag listed by
``--help`` with its default and allowed values (the agent's settings are the nested ``AgentOptions`` /
``AgentConfig``). Bad input prints one line ``error: ...`` and exits with status 2, with no traceback; a solve
that returns no placement (infeasible, or nothing found in the time limit) prints its summary and exits with 1.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

from memmap import io_minimalloc, solvers
from memmap.agent.config import AgentConfig
from research.cli import CommandParser, UsageError, fail
from research.config import Config, Problem, option

DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32", "bool")
_SHAPE = re.compile(r"^\d+(x\d+)*$")


@dataclasses.dataclass(frozen=True)
class SolveConfig(Config):
  """Place the buffers of a MiniMalloc CSV file.

  Attributes:
    file: MiniMalloc CSV (id,lower,upper,size); its capacity comes from a name NAME.<capacity>.csv.
    method: placement method (omnimalloc:* need the extra memlab[baselines]).
    objective: height places every buffer and minimises the peak; benefit fills the capacity, the rest stays slow.
    capacity: fast-memory bytes (default: from the file name, else the sum of sizes).
    time_limit: seconds for cpsat, exact, agent and the omnimalloc allocators that take a budget.
    agent: the agent's settings (--method agent).
    out: solution CSV to write (id,lower,upper,size,offset).
    plot: PNG of the placement to write.
  """
  file: str = option(positional=True)
  method: str = option("best_fit", choices=solvers.METHODS)
  objective: str = option("height", choices=solvers.OBJECTIVES)
  capacity: int | None = option(None, minimum=1, maximum=io_minimalloc.MAX_VALUE)
  time_limit: float = option(60.0)
  agent: solvers.AgentOptions = dataclasses.field(default_factory=solvers.AgentOptions)
  out: str | None = option(None)
  plot: str | None = option(None)

  def check(self):
    if self.time_limit <= 0:
      yield Problem("time_limit", f"must be a positive number of seconds (got {self.time_limit})")


@dataclasses.dataclass(frozen=True)
class ExtractConfig(Config):
  """Dump the temp buffers of a compiled train step (or of any jitted function) as a MiniMalloc CSV.

  Attributes:
    config: preset of the train step (research.train.presets), e.g. tiny or mqar_tiny.
    function: 'package.module:function' to jit instead of a train step.
    shapes: argument shapes for --function, one per argument, e.g. 64x128,128x256.
    dtype: dtype of the --function arguments.
    capacity_fraction: capacity written to the CSV = this * XLA's temp height (in (0, 1e6]).
    out: CSV of the buffers to write (XLA's own layout goes to OUT.xla.csv).
  """
  config: str = option("tiny")
  function: str | None = option(None)
  shapes: tuple[str, ...] = option(())
  dtype: str = option("float32", choices=DTYPES)
  capacity_fraction: float = option(1.0, maximum=1e6)
  out: str | None = option(None)

  def check(self):
    if self.capacity_fraction <= 0:
      yield Problem("capacity_fraction", f"must be > 0 (got {self.capacity_fraction})")
    if self.function is not None and not re.match(r"^[\w.]+:\w+$", self.function):
      yield Problem("function", f"must look like 'package.module:function' (got {self.function!r})")
    bad = [s for s in self.shapes if not _SHAPE.match(s)]
    if bad:
      yield Problem("shapes", f"must be dimensions joined by x, e.g. 64x128 (got {bad[0]!r})")
    if self.shapes and self.function is None:
      yield Problem("shapes", "applies only with --function")


@dataclasses.dataclass(frozen=True)
class TrainAgentConfig(Config):
  """Self-play training of the Gumbel MuZero network on generated instances (MiniMalloc is evaluation-only).

  Attributes:
    workdir: run folder (checkpoints, agent_config.json, history.json and history.png).
    agent: game, search and self-play settings.
  """
  workdir: str = option("runs/memmap_agent")
  agent: AgentConfig = dataclasses.field(default_factory=AgentConfig)


COMMANDS = {"solve": (SolveConfig, "place the buffers of a MiniMalloc CSV file"),
            "extract": (ExtractConfig, "dump the temp buffers of a compiled train step (or any jitted function)"),
            "train-agent": (TrainAgentConfig, "self-play training of the Gumbel MuZero agent")}


def _solve(cfg: SolveConfig) -> int:
  inst, _ = io_minimalloc.read_csv(cfg.file, capacity=cfg.capacity)
  if inst.n == 0:
    raise ValueError(f"{cfg.file} holds no buffers.")
  sol = solvers.solve(inst, cfg.method, cfg.objective, cfg.time_limit, cfg.agent)
  print(f"{Path(cfg.file).name}: {sol.summary()}")
  if sol.offsets.size == 0:
    return 1
  if cfg.out:
    io_minimalloc.write_csv(cfg.out, inst, sol.offsets)
    print(f"wrote {cfg.out}")
  if cfg.plot:
    from memmap.plot import plot_placement
    plot_placement(inst, sol.offsets, cfg.plot, f"{Path(cfg.file).name} {cfg.method}: peak {sol.peak}")
    print(f"wrote {cfg.plot}")
  return 0


def _lowered(cfg: ExtractConfig):
  import jax
  import jax.numpy as jnp
  if cfg.function is None:
    from research.train import lower_train_step
    from research.train.presets import get_preset
    try:
      preset = get_preset(cfg.config)
    except KeyError as e:
      raise ValueError(f"--config: {str(e).strip(chr(39))}") from None
    return lower_train_step(preset)
  module, _, name = cfg.function.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"--function {cfg.function}: {e}") from None
  shapes = [tuple(int(d) for d in s.split("x")) for s in cfg.shapes]
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    params = None
  if params is not None:
    need = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    most = None if any(p.kind == p.VAR_POSITIONAL for p in params) else sum(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if len(shapes) < len(need) or (most is not None and len(shapes) > most):
      raise ValueError(f"--shapes gives {len(shapes)} argument(s) but {cfg.function} takes "
                       f"{len(need) if most == len(need) else f'{len(need)} to {most}'}")
  args = [jax.ShapeDtypeStruct(s, jnp.dtype(cfg.dtype)) for s in shapes]
  try:
    return jax.jit(fn).lower(*args)
  except (TypeError, ValueError) as e:  # shapes that do not fit together (a matmul of 3x4 by 5x6, ...)
    raise ValueError(f"--function {cfg.function} does not trace with --shapes {','.join(cfg.shapes)}: "
                     f"{str(e).splitlines()[0]}") from None


def _extract(cfg: ExtractConfig) -> int:
  from memmap.instance import load_bound
  from memmap.xla_extract import extract
  bufs = extract(_lowered(cfg), capacity_fraction=cfg.capacity_fraction)
  inst = bufs.instance
  print(f"{len(bufs.schedule)} scheduled ops, {inst.n} temp buffers, load bound L={load_bound(inst)}, "
        f"XLA temp height={bufs.xla_height}, capacity={inst.capacity}")
  for name, (ours, xla) in bufs.totals().items():
    verdict = "ok" if ours == xla else "MISMATCH"
    print(f"  {name:9s} buffer-assignment {ours:>12d}  memory_analysis {xla:>12d}  {verdict}")
  if cfg.out:
    io_minimalloc.write_csv(cfg.out, inst)
    io_minimalloc.write_csv(Path(cfg.out).with_suffix(".xla.csv"), inst, bufs.xla_offsets)
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.xla.csv')} (XLA's layout)")
  return 0


def _train(cfg: TrainAgentConfig) -> int:
  from memmap.agent.train import train
  _, history = train(cfg.agent, cfg.workdir)
  (Path(cfg.workdir) / "history.json").write_text(json.dumps(history, indent=1))
  _plot_history(history, Path(cfg.workdir) / "history.png")
  print(f"trained {cfg.agent.iterations} iterations; checkpoints in {cfg.workdir}")
  return 0


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


RUN = {"solve": _solve, "extract": _extract, "train-agent": _train}


def parser() -> CommandParser:
  return CommandParser(COMMANDS, prog="python -m memmap",
                       description="place buffers in a small fast memory, extract them from XLA, train the agent")


def main(argv: list[str] | None = None) -> int:
  """Runs one subcommand; returns its exit status (0 done, 1 no placement); bad input exits 2 via ``fail``."""
  try:
    command, cfg = parser().parse(argv)
    return RUN[command](cfg)
  except UsageError as e:
    fail(str(e))
  except (ValueError, OSError, RuntimeError, ImportError) as e:  # bad files, unknown presets, missing extras
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
  sys.exit(main())
