"""One entry point for every placement method, with the numbers the CLI and the study report.

Methods: greedy heuristics (``first_fit`` / ``best_fit`` in size order, ``best_fit_area``, ``best_fit_temporal``,
``msa``: best fit in XLA-MSA's benefit/sqrt(size) order, ``portfolio``: the best of all orders and fits), ``cpsat``
(exact, time-limited) and ``agent`` (Gumbel MuZero search with a trained network).

Objectives: ``height`` places every buffer and minimises the peak (MiniMalloc's problem; it fits when the peak is
<= capacity); ``benefit`` respects the capacity and leaves what does not fit in slow memory, maximising benefit.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from memmap.baselines import cpsat
from memmap.baselines.heuristics import greedy, portfolio
from memmap.instance import SLOW, Instance, load_bound, validate
from memmap.orders import ORDERS

HEURISTICS = {"first_fit": ("spatial", "first"), "best_fit": ("spatial", "best"), "best_fit_area": ("area", "best"),
              "best_fit_temporal": ("temporal", "best"), "msa": ("msa", "best")}
METHODS = tuple(HEURISTICS) + ("portfolio", "cpsat", "agent")
OBJECTIVES = ("height", "benefit")


@dataclasses.dataclass(frozen=True)
class Solution:
  """A validated placement and its figures of merit (``status`` is CP-SAT's, else "heuristic"/"search")."""
  method: str
  objective: str
  offsets: np.ndarray
  peak: int
  capacity: int
  load_bound: int
  placed: int
  benefit_fraction: float
  status: str
  seconds: float

  @property
  def fits(self) -> bool:
    return self.offsets.size > 0 and self.peak <= self.capacity and self.placed == self.offsets.size

  @property
  def cost(self) -> float:
    """height: peak / capacity; benefit: the fraction of benefit left in slow memory."""
    return self.peak / self.capacity if self.objective == "height" else 1.0 - self.benefit_fraction

  def summary(self) -> str:
    head = f"method={self.method} objective={self.objective} n={len(self.offsets)}"
    if self.offsets.size == 0 or self.status in ("unknown", "infeasible", "model_invalid"):
      return f"{head} status={self.status} no placement found time={self.seconds:.2f}s"
    over = 100.0 * (self.peak / self.capacity - 1.0)
    return (f"{head} peak={self.peak} capacity={self.capacity} L={self.load_bound} fits={'yes' if self.fits else 'no'}"
            f" ({over:+.2f}% vs capacity) placed={self.placed}/{len(self.offsets)} cost={self.cost:.4f} "
            f"status={self.status} time={self.seconds:.2f}s")


@dataclasses.dataclass(frozen=True)
class AgentOptions:
  """Where the trained agent lives and how it searches (see ``memmap.agent.train.solve``): ``order`` is one buffer
  order or a tuple played one after the other (best kept); ``rollout_fits`` are the leaf rollout's heuristics;
  ``fortify`` keeps the best heuristic completion. The defaults are the configuration that matched or beat the best
  heuristic on all six MiniMalloc instances (docs/results.md); ``order=None`` plays the network's training order."""
  agent_dir: str | Path | None = None
  num_simulations: int = 64
  rollout_weight: float = 1.0
  order: str | tuple[str, ...] | None = ("spatial", "chronological")
  rollout_fits: tuple[str, ...] = ("first",)
  fortify: bool = True

  def __post_init__(self):
    orders = (self.order,) if isinstance(self.order, str) else self.order or ()
    bad = [o for o in orders if o not in ORDERS]
    if bad or self.order == ():
      raise ValueError(f"AgentOptions.order={self.order!r}: give one or more of {', '.join(ORDERS)}.")


def solve(inst: Instance, method: str, objective: str = "height", time_limit: float = 60.0,
          agent: AgentOptions = AgentOptions()) -> Solution:
  """Runs ``method`` and validates its placement (raises ``PlacementError`` on an invalid one)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}.")
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}.")
  cap = None if objective == "height" else inst.capacity
  status = "heuristic"
  t0 = time.perf_counter()
  if method in HEURISTICS:
    offsets = greedy(inst, *HEURISTICS[method], capacity=cap)
  elif method == "portfolio":
    offsets = portfolio(inst, capacity=cap)
  elif method == "cpsat":
    res = (cpsat.solve_height(inst, time_limit) if objective == "height"
           else cpsat.solve_benefit(inst, time_limit=time_limit))
    status = res.status
    offsets = res.offsets if res.offsets is not None else np.full(0, SLOW, np.int64)
  else:
    offsets, status = _agent(inst, objective, agent), "search"
  seconds = time.perf_counter() - t0
  if offsets.size == 0:
    return Solution(method, objective, offsets, 0, inst.capacity, load_bound(inst), 0, 0.0, status, seconds)
  peak = validate(inst, offsets, capacity=cap if cap is not None else np.iinfo(np.int64).max)
  placed = offsets != SLOW
  frac = float(inst.benefit[placed].sum() / max(inst.benefit.sum(), 1e-30))
  return Solution(method, objective, offsets, peak, inst.capacity, load_bound(inst), int(placed.sum()), frac, status,
                  seconds)


def _agent(inst: Instance, objective: str, opts: AgentOptions) -> np.ndarray:
  from memmap.agent.train import load_agent, solve as agent_solve  # jax/flax only when the agent is asked for
  if opts.agent_dir is None:
    raise ValueError("method 'agent' needs --agent-dir, the folder of a `python -m memmap train-agent` run.")
  net, cfg = load_agent(opts.agent_dir)
  if cfg.objective != objective:
    raise ValueError(f"the agent in {opts.agent_dir} was trained for objective {cfg.objective!r}, not {objective!r}.")
  return agent_solve(net, cfg, inst, opts.num_simulations, rollout_weight=opts.rollout_weight, order=opts.order,
                     rollout_fits=opts.rollout_fits, fortify=opts.fortify)
