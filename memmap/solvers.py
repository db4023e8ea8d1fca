"""One entry point for every placement method, with the numbers the CLI and the study report.

Methods: greedy heuristics (``first_fit`` / ``best_fit`` in size order, ``best_fit_area``, ``best_fit_temporal``,
``msa``: best fit in XLA-MSA's benefit/sqrt(size) order, ``portfolio``: the best of all orders and fits), ``cpsat``
(CP-SAT, time-limited), ``exact`` (MiniMalloc's search at the capacity: feasible, infeasible or unknown), ``agent``
(the anytime search of ``memmap.agent.anytime``, seeded with a Gumbel MuZero episode when ``agent_dir`` names a
trained network) and ``omnimalloc:<name>`` (every allocator of omnimalloc, ``memmap.baselines.omni``).

Objectives: ``height`` places every buffer and minimises the peak (MiniMalloc's problem; it fits when the peak is
<= capacity); ``benefit`` respects the capacity and leaves what does not fit in slow memory, maximising benefit.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from memmap.baselines import cpsat, exact, omni
from memmap.baselines.heuristics import FITS, greedy, portfolio
from memmap.instance import SLOW, Instance, load_bound, validate
from memmap.orders import ORDERS
from research.config import Config, Problem, option

HEURISTICS = {"first_fit": ("spatial", "first"), "best_fit": ("spatial", "best"), "best_fit_area": ("area", "best"),
              "best_fit_temporal": ("temporal", "best"), "msa": ("msa", "best")}
OMNI_METHODS = tuple(f"omnimalloc:{name}" for name in omni.ALLOCATORS)
METHODS = tuple(HEURISTICS) + ("portfolio", "cpsat", "exact", "agent") + OMNI_METHODS
OBJECTIVES = ("height", "benefit")
NO_PLACEMENT = ("unknown", "infeasible", "model_invalid")


@dataclasses.dataclass(frozen=True)
class Solution:
  """A validated placement and its figures of merit (``status`` is CP-SAT's or the exact solver's, else
  "heuristic" / "search"); ``n`` buffers, ``offsets`` empty when no placement was found."""
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
  n: int = 0

  @property
  def fits(self) -> bool:
    return self.offsets.size > 0 and self.peak <= self.capacity and self.placed == self.offsets.size

  @property
  def cost(self) -> float:
    """height: peak / capacity; benefit: the fraction of benefit left in slow memory."""
    return self.peak / self.capacity if self.objective == "height" else 1.0 - self.benefit_fraction

  def summary(self) -> str:
    head = f"method={self.method} objective={self.objective} n={self.n}"
    if self.offsets.size == 0 or self.status in ("unknown", "infeasible", "model_invalid"):
      return f"{head} status={self.status} no placement found time={self.seconds:.2f}s"
    over = 100.0 * (self.peak / self.capacity - 1.0)
    return (f"{head} peak={self.peak} capacity={self.capacity} L={self.load_bound} fits={'yes' if self.fits else 'no'}"
            f" ({over:+.2f}% vs capacity) placed={self.placed}/{len(self.offsets)} cost={self.cost:.4f} "
            f"status={self.status} time={self.seconds:.2f}s")


@dataclasses.dataclass(frozen=True)
class AgentOptions(Config):
  """How ``--method agent`` searches. Without ``agent_dir`` it is the network-free anytime search
  (``memmap.agent.anytime``); with it, a Gumbel MuZero episode of that network seeds it (``memmap.agent.train.solve``,
  which runs to its end before the deadline is looked at).

  Attributes:
    agent_dir: folder of a `python -m memmap train-agent` run (None: no network).
    simulations: Gumbel MuZero simulations per move (with agent_dir).
    rollout_weight: leaf value = (1 - w) * network value + w * heuristic rollout return (with agent_dir).
    agent_orders: buffer orders the network's episodes play, one episode each, the best kept (with agent_dir).
    rollout_fits: heuristics of the leaf rollouts, the best completion counts (with agent_dir).
    fortify: keep the best best-fit / first-fit completion along the network's episode (with agent_dir).
  """
  agent_dir: str | None = option(None)
  simulations: int = option(64, minimum=1)
  rollout_weight: float = option(1.0, minimum=0.0, maximum=1.0)
  agent_orders: tuple[str, ...] = option(("spatial", "chronological"))
  rollout_fits: tuple[str, ...] = option(("first",))
  fortify: bool = option(True)

  def check(self):
    if not self.agent_orders or set(self.agent_orders) - set(ORDERS):
      yield Problem("agent_orders", f"must be one or more of {', '.join(ORDERS)} (got {','.join(self.agent_orders)})")
    if not self.rollout_fits or set(self.rollout_fits) - set(FITS):
      yield Problem("rollout_fits", f"must be one or more of {', '.join(FITS)} (got {','.join(self.rollout_fits)})")


def solve(inst: Instance, method: str, objective: str = "height", time_limit: float = 60.0,
          agent: AgentOptions = AgentOptions()) -> Solution:
  """Runs ``method`` and validates its placement (raises ``PlacementError`` on an invalid one).

  ``exact`` decides the height game at ``inst.capacity`` (status feasible / infeasible / unknown); ``agent`` and
  ``omnimalloc:*`` play the height game only.
  """
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
  elif method.startswith("omnimalloc:") or method == "exact" or method == "agent":
    if objective != "height":
      raise ValueError(f"method {method!r} plays the height game only (got objective {objective!r}).")
    if method == "exact":
      res = exact.solve(inst, time_limit=time_limit)
      offsets = res.offsets if res.offsets is not None else np.full(0, SLOW, np.int64)
      status, cap = res.status, inst.capacity
    elif method == "agent":
      offsets, status = _agent(inst, time_limit, agent), "search"
    else:
      offsets = omni.solve(inst, method.split(":", 1)[1], time_limit)
  elif method == "cpsat":
    res = (cpsat.solve_height(inst, time_limit) if objective == "height"
           else cpsat.solve_benefit(inst, time_limit=time_limit))
    status = res.status
    offsets = res.offsets if res.offsets is not None else np.full(0, SLOW, np.int64)
  seconds = time.perf_counter() - t0
  if offsets.size == 0:
    return Solution(method, objective, offsets, 0, inst.capacity, load_bound(inst), 0, 0.0, status, seconds, inst.n)
  peak = validate(inst, offsets, capacity=cap if cap is not None else np.iinfo(np.int64).max)
  placed = offsets != SLOW
  frac = float(inst.benefit[placed].sum() / max(inst.benefit.sum(), 1e-30))
  return Solution(method, objective, offsets, peak, inst.capacity, load_bound(inst), int(placed.sum()), frac, status,
                  seconds, inst.n)


def _agent(inst: Instance, time_limit: float, opts: AgentOptions) -> np.ndarray:
  from memmap.agent import anytime
  t0 = time.perf_counter()
  seed = None
  if opts.agent_dir is not None:
    from memmap.agent.train import load_agent, solve as agent_solve  # jax and flax only when a network is used
    net, cfg = load_agent(opts.agent_dir)
    if cfg.objective != "height":
      raise ValueError(f"the agent in {opts.agent_dir} was trained for objective {cfg.objective!r}, not 'height'.")
    seed = agent_solve(net, cfg, inst, opts.simulations, rollout_weight=opts.rollout_weight,
                       order=opts.agent_orders, rollout_fits=opts.rollout_fits, fortify=opts.fortify)
  offsets, _ = anytime.solve(inst, max(time_limit - (time.perf_counter() - t0), 0.0), incumbent=seed)
  return offsets
