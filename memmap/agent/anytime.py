"""The default agent: an anytime, network-free search of the canonical placement game under a deadline.

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning" (arXiv 2305.07440) play buffer placement
as a single-player game searched with MuZero; MiniMalloc (Moffitt, ASPLOS 2023, doi 10.1145/3623278.3624752) shows
which game to play: the *canonical* one, where a move chooses which unplaced buffer goes next at its minimum offset,
and whose inference proves most moves hopeless. This agent plays that game with

* **actions** = the unplaced buffers, each at its minimum offset (the lowest address above every placed buffer it
  overlaps in time);
* **masking** by the exact solver's inference (``memmap.baselines.exact``): moves that break canonical order, leave
  a gap some unplaced buffer fits (dominance), or leave a section whose floor plus unplaced bytes exceeds the target
  height are never expanded;
* **policy priors** = three static preorders (lifetime width, area, section total), each a complete ranking of the
  moves, searched depth first with restarts whose node limit doubles (the round robin of ``exact.solve``);
* **a target height** that only goes down, searched by two threads at once (the numba kernel releases the GIL,
  like SuperMalloc's two C++ threads on two cores): one spends the whole time on the load bound L (a fit there is
  optimal); the other bisects between L and the best height found, each probe with a share of the time left and
  stopping once the first thread has succeeded. An unproved probe counts as a failure, so the best placement is
  always one that was found and validated.

The first incumbent is the best of the greedy heuristics (``portfolio``: six buffer orders, best and first fit), or
the better of that and a Gumbel MuZero episode when a trained network is given (``memmap.solvers``), so the agent
is never worse than them. It returns its best placement by the deadline (the exact kernel's first compilation, a
few seconds, counts against it).

Shapes: ``inst`` of N buffers -> offsets int64[N], every one placed (height game).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import numpy as np

from memmap.baselines import exact
from memmap.baselines.heuristics import portfolio
from memmap.instance import Instance, load_bound, validate

BIG = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class Probe:
  """One target height tried: the exact search's answer there and the seconds it took."""
  target: int
  status: str
  seconds: float


def _bisect(inst: Instance, best: np.ndarray, low: int, deadline: float, share: float, stop: threading.Event,
            probes: list[Probe]) -> np.ndarray:
  """Lowers the height of ``best`` by probing targets between ``low`` and its height until the deadline."""
  height = validate(inst, best, capacity=BIG)
  while height > low and not stop.is_set():
    left = deadline - time.perf_counter()
    if left <= 0.05:
      break
    target = (low + height - 1) // 2
    limit = left if target == height - 1 else max(min(left, 1.0), left * share)
    res = exact.solve(inst, capacity=target, time_limit=limit, stop=stop)
    probes.append(Probe(target, res.status, res.seconds))
    if res.status == "feasible":
      best, height = res.offsets, validate(inst, res.offsets, capacity=target)
    else:  # infeasible, or not found in this probe's time: look higher
      low = target + 1
  return best


def solve(inst: Instance, time_limit: float = 60.0, incumbent: np.ndarray | None = None,
          share: float = 0.5) -> tuple[np.ndarray, list[Probe]]:
  """Lowest-height placement found within ``time_limit`` seconds; returns (offsets, the probes made).

  Args:
    inst: the buffers (the capacity is ignored: the height is minimised).
    time_limit: wall-clock seconds for the whole call.
    incumbent: a placement to start from (e.g. the network agent's); the heuristic portfolio is always tried too.
    share: the share of the time left each bisection probe may use.
  """
  t0 = time.perf_counter()
  deadline = t0 + 0.97 * time_limit  # the kernels stop on node budgets estimated from their speed: leave a margin
  candidates = [portfolio(inst)] + ([] if incumbent is None else [np.asarray(incumbent, np.int64)])
  best = min(candidates, key=lambda off: validate(inst, off, capacity=BIG))
  low = load_bound(inst)  # every height below this is infeasible
  if validate(inst, best, capacity=BIG) == low:
    return best, []
  exact.warm_up()  # compile first (once per process), so both threads search for the time actually left
  stop = threading.Event()
  probes: list[Probe] = []

  def at_load_bound():
    res = exact.solve(inst, capacity=low, time_limit=max(deadline - time.perf_counter(), 0.0))
    probes.append(Probe(low, res.status, res.seconds))
    if res.status == "feasible":
      stop.set()
    return res

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    optimal = pool.submit(at_load_bound)
    bisected = pool.submit(_bisect, inst, best, low + 1, deadline, share, stop, probes)
    res, best = optimal.result(), bisected.result()
  if res.status == "feasible":
    best = res.offsets
  return best, probes
