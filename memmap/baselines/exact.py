"""Exact buffer placement at a given capacity, after MiniMalloc's search.

Moffitt, "MiniMalloc: A Lightweight Memory Allocator for Hardware-Accelerated Machine Learning", ASPLOS 2023
(doi 10.1145/3623278.3624752); google/minimalloc ``src/solver.cc`` is the reference this re-derives. The question is
the decision problem of dynamic storage allocation: can every buffer get an offset with ``offset + size <= C`` such
that no two buffers that are live at a common time share an address? The answer is *feasible* (with a placement),
*infeasible* (proved by exhausting the search) or *unknown* (the time limit came first).

The search places buffers one at a time in **canonical** order: every buffer sits at its *minimum offset*, the top of
the highest placed buffer it overlaps in time (aligned up), and buffers are placed in non-decreasing offset order
(ties broken by a static preorder). Any feasible placement can be pushed down into this form without raising any
buffer, so searching only canonical placements loses nothing (the paper's Theorem 1). At each node the children are
the unplaced buffers sorted by (minimum offset, preorder rank); a child is skipped when

* **canonical**: its (offset, rank) is below the last placed one's (that order was already searched);
* **dominance**: its offset is at or above ``min_j (minoff_j + size_j)`` over unplaced j: buffer j would fit
  entirely in the gap left below it, so a placement with j there dominates;
* **hatless**: after a child whose buffer overlaps no unplaced buffer has failed, its siblings fail too (placing it
  changed nothing for anyone else).

After a placement, **spatial and temporal inference** prune the node: the time axis is cut into *sections* (the
maximal sets of buffers live at one moment, from a sweep line); in each section, the unplaced buffers must stack
above the section's floor (the top of its highest placed buffer, the lowest minimum offset of its unplaced buffers,
and the current offset: placements never go down), so ``floor + sum of unplaced sizes > C`` proves the node
infeasible. **Dynamic decomposition**: when no unplaced buffer crosses the boundary between two sections any more,
the two sides are independent subproblems and are solved one after the other, without backtracking across them.
Several static preorders (MiniMalloc's "WAT", "TAW", "TWA": lifetime width, area, section total) run round-robin
with a node limit that doubles each round, which finds feasible placements of the hard instances much sooner than
any single order.

Shapes: N buffers, S sections, all int64 numpy arrays. Per buffer ``size, minoff, offset, rank: [N]``, its section
range ``[sec_lo, sec_hi)`` and its time-overlapping buffers (CSR ``ov_ptr [N+1], ov_idx [2P]``); per section
``floor, total: [S]``, its members (CSR) and ``cuts [S]`` (buffers spanning s and s + 1).

Decision (compiled form): the search was written in Python first (a class over lists). ``cProfile`` on MiniMalloc A
showed 139 nodes/s, 90 % of the time in the per-node bookkeeping loops (the section floors' minimum over their
unplaced members: ~10^5 list operations per node); rewritten over arrays it still costs ~100 us per node, and
MiniMalloc's instances need 10^4-10^6 nodes. So the node function ``_search`` is compiled with numba when it is
installed (the optional extra ``solvers``): the same source, 12-75 thousand nodes/s on a 2-core CPU, and every
instance but E fits in seconds. Without numba the identical code runs interpreted (tests compare the two node for
node). Compilation takes a few seconds per process: numba cannot reload a cached self-recursive function.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types

import numpy as np

from memmap.instance import Instance, Sweep, sweep

STATUSES = ("feasible", "infeasible", "unknown")
PREORDERS = ("WAT", "TAW", "TWA")

_OK, _NOT_FOUND, _ABORTED = 0, 1, 2  # what a search node returns


@dataclasses.dataclass(frozen=True)
class ExactResult:
  """``status`` one of :data:`STATUSES`; ``offsets`` int64[N] when feasible, else None; search statistics."""
  status: str
  offsets: np.ndarray | None
  nodes: int
  seconds: float


def _preorder_keys(inst: Instance, sw: Sweep, code: str) -> list[tuple]:
  """MiniMalloc's static preorder: descending by each letter (W lifetime width, A area, T the largest section
  total the buffer takes part in, Z size, L start), then by index."""
  totals = [0] * sw.num_sections
  for i in range(inst.n):
    for s in range(sw.sec_lo[i], sw.sec_hi[i]):
      totals[s] += int(inst.size[i])
  width = (inst.upper - inst.lower).tolist()
  size = inst.size.tolist()
  lower = inst.lower.tolist()
  keys = []
  for i in range(inst.n):
    section_total = max(totals[sw.sec_lo[i]:sw.sec_hi[i]])
    value = {"W": width[i], "A": width[i] * size[i], "T": section_total, "Z": size[i], "L": lower[i]}
    keys.append(tuple(-value[c] for c in code) + (i,))
  return keys


def _search(part, lo, hi, last_offset, last_rank, g, st, counters):
  """One node of the depth-first search over canonical placements of the unplaced buffers in ``part`` (their
  sections lie in ``[lo, hi)``); returns _OK (``st``'s solution holds them), _NOT_FOUND or _ABORTED (node budget
  ``counters[1]`` spent). Every change to ``st`` is undone before returning. Plain Python over numpy arrays, and
  compiled unchanged by numba when it is installed."""
  size, sec_lo, sec_hi, ov_ptr, ov_idx, mem_ptr, mem_idx, rank, consts = g
  offset, minoff, floor, total, cuts, solution = st
  align, capacity, n = consts[0], consts[1], consts[2]
  if counters[1] <= 0:
    return _ABORTED
  counters[1] -= 1
  counters[0] += 1
  m = 0
  for i in part:
    if offset[i] < 0:
      m += 1
  if m == 0:
    return _OK
  ids = np.empty(m, np.int64)
  keys = np.empty(m, np.int64)
  min_height = capacity + 1
  k = 0
  for i in part:
    if offset[i] < 0:
      ids[k] = i
      keys[k] = minoff[i] * n + rank[i]
      k += 1
      min_height = min(min_height, minoff[i] + size[i])
  order = np.argsort(keys)
  num_sections = floor.shape[0]
  for t in range(m):
    i = ids[order[t]]
    o, r = minoff[i], rank[i]
    if o >= min_height:
      break  # dominance: from here on every child leaves a gap below that some unplaced buffer fits into
    if o < last_offset or (o == last_offset and r < last_rank):
      continue  # canonical: this order of the same placements was searched already
    top = o + size[i]
    if top > capacity:
      continue
    offset[i] = o
    # Spatial inference: unplaced buffers overlapping i in time now start at or above its (aligned) top.
    raised = np.empty(ov_ptr[i + 1] - ov_ptr[i], np.int64)
    was = np.empty(ov_ptr[i + 1] - ov_ptr[i], np.int64)
    num_raised = 0
    hatless = True
    for q in range(ov_ptr[i], ov_ptr[i + 1]):
      j = ov_idx[q]
      if offset[j] >= 0:
        continue
      hatless = False
      if minoff[j] < top:
        raised[num_raised] = j
        was[num_raised] = minoff[j]
        num_raised += 1
        minoff[j] = (top + align - 1) // align * align
    # Temporal inference: section floors (placed tops, and the lowest minimum offset of the unplaced members).
    saved_floor = floor.copy()
    for s in range(sec_lo[i], sec_hi[i]):
      floor[s] = top
      total[s] -= size[i]
    if num_raised:
      affected = np.zeros(num_sections, np.bool_)
      for q in range(num_raised):
        for s in range(sec_lo[raised[q]], sec_hi[raised[q]]):
          affected[s] = True
      for s in range(lo, hi):
        if affected[s]:
          low = capacity + 1
          for q in range(mem_ptr[s], mem_ptr[s + 1]):
            j = mem_idx[q]
            if offset[j] < 0 and minoff[j] < low:
              low = minoff[j]
          if low <= capacity and floor[s] < low:
            floor[s] = low
    feasible = True
    for s in range(lo, hi):
      if max(o, floor[s]) + total[s] > capacity:
        feasible = False
        break
    status = _NOT_FOUND
    if feasible:
      solution[i] = o
      # Dynamic decomposition: boundaries no unplaced buffer crosses any more split the rest into independent parts.
      points = np.empty(hi - lo + 1, np.int64)
      points[0] = lo
      num_points = 1
      for s in range(sec_lo[i], sec_hi[i] - 1):
        cuts[s] -= 1
        if cuts[s] == 0 and lo <= s < hi - 1:
          points[num_points] = s + 1
          num_points += 1
      if num_points == 1:
        status = _search(part, lo, hi, o, r, g, st, counters)
      else:
        points[num_points] = hi
        status = _OK
        for c in range(num_points):
          a, b = points[c], points[c + 1]
          sub = np.empty(m, np.int64)
          size_sub = 0
          for j in part:
            if offset[j] < 0 and sec_lo[j] < b and a < sec_hi[j]:
              sub[size_sub] = j
              size_sub += 1
          if size_sub:
            status = _search(sub[:size_sub].copy(), a, b, 0, -1, g, st, counters)
            if status != _OK:
              break
      for s in range(sec_lo[i], sec_hi[i] - 1):
        cuts[s] += 1
    floor[:] = saved_floor
    for s in range(sec_lo[i], sec_hi[i]):
      total[s] += size[i]
    for q in range(num_raised):
      minoff[raised[q]] = was[q]
    offset[i] = -1
    if status != _NOT_FOUND:
      return status
    if hatless:
      break  # i changed nothing for any other buffer, so its siblings fail the same way
  return _NOT_FOUND


def _interpreted():
  """``_search`` as plain Python whose recursive calls stay interpreted (the same code object with its own
  globals): the reference the compiled kernel is tested against, and the fallback without numba."""
  fn = types.FunctionType(_search.__code__, dict(globals()), "_search", _search.__defaults__)
  fn.__globals__["_search"] = fn
  return fn


_python_search = _interpreted()
try:  # the extra "solvers" brings numba; the module global is rebound, so the recursion calls the compiled kernel
  import numba
  # nogil: the agent runs two searches at once. No cache=True: numba 0.68 crashes reloading a cached recursive function.
  _search = numba.njit(nogil=True)(_search)
except ImportError:
  _search = _python_search


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  ptr = np.zeros(len(lists) + 1, np.int64)
  np.cumsum([len(x) for x in lists], out=ptr[1:])
  flat = np.fromiter((v for x in lists for v in x), np.int64, count=int(ptr[-1]))
  return ptr, flat


def warm_up() -> float:
  """Compiles the kernel (a few seconds with numba, once per process) on a one-buffer problem; returns seconds."""
  t0 = time.perf_counter()
  solve(Instance(ids=("x",), lower=[0], upper=[1], size=[1], capacity=1), time_limit=3600)
  return time.perf_counter() - t0


def solve(inst: Instance, capacity: int | None = None, time_limit: float = 60.0,
          preorders: tuple[str, ...] = PREORDERS, compiled: bool = True, stop=None) -> ExactResult:
  """Decides whether ``inst`` fits in ``capacity`` bytes (default ``inst.capacity``) within ``time_limit`` seconds.

  Args:
    inst: N buffers (gaps are not modelled: each buffer is live over its whole interval).
    capacity: the address limit C.
    time_limit: wall-clock seconds; at the limit the answer is "unknown". The first call in a process also
      compiles the kernel (numba, a few seconds), within this limit.
    preorders: static preorder codes run round-robin (letters of ``W A T Z L``, see ``_preorder_keys``).
    compiled: use the numba kernel when numba is installed (False: the same code interpreted, for tests).
    stop: an optional ``threading.Event``; once set, the search gives up ("unknown") before its next run.

  Returns:
    An :class:`ExactResult`; a feasible one carries offsets with ``offset + size <= C`` (callers check them with
    ``memmap.instance.validate``).
  """
  t0 = time.perf_counter()
  deadline = t0 + time_limit
  cap = inst.capacity if capacity is None else int(capacity)
  if cap <= 0:
    raise ValueError(f"capacity must be a positive number of bytes (got {cap}).")
  if not preorders or any(set(code) - set("WATZL") for code in preorders):
    raise ValueError(f"preorders must be codes over the letters W, A, T, Z, L (got {preorders!r}).")
  if inst.n == 0:
    return ExactResult("feasible", np.zeros(0, np.int64), 0, time.perf_counter() - t0)
  sw = sweep(inst)
  ov_ptr, ov_idx = _csr(sw.overlaps)
  mem_ptr, mem_idx = _csr(sw.sections)
  ranks = []
  for code in preorders:
    order = sorted(range(inst.n), key=_preorder_keys(inst, sw, code).__getitem__)
    rank = np.empty(inst.n, np.int64)
    rank[order] = np.arange(inst.n)
    ranks.append(rank)
  total = np.zeros(sw.num_sections, np.int64)
  for i in range(inst.n):
    total[sw.sec_lo[i]:sw.sec_hi[i]] += inst.size[i]
  st = (np.full(inst.n, -1, np.int64), np.zeros(inst.n, np.int64), np.zeros(sw.num_sections, np.int64), total,
        np.asarray(sw.cuts() + [0], np.int64), np.full(inst.n, -1, np.int64))
  consts = np.array([inst.alignment, cap, inst.n], np.int64)
  geometry = [inst.size.astype(np.int64), np.asarray(sw.sec_lo, np.int64), np.asarray(sw.sec_hi, np.int64), ov_ptr,
              ov_idx, mem_ptr, mem_idx]
  parts = [(np.asarray(b, np.int64), lo, hi) for b, lo, hi in sw.partitions]
  kernel = _search if compiled else _python_search
  sys.setrecursionlimit(max(sys.getrecursionlimit(), 8 * inst.n + 1000))
  counters = np.zeros(2, np.int64)
  limit, rate = inst.n, None
  while True:
    limit *= 2
    for rank in ranks:
      g = (*geometry, rank, consts)
      for buffers, lo, hi in parts:
        if (total[lo:hi] > cap).any():
          return ExactResult("infeasible", None, int(counters[0]), time.perf_counter() - t0)
      status, left = _OK, deadline - time.perf_counter()
      if left <= 0 or (stop is not None and stop.is_set()):
        return ExactResult("unknown", None, int(counters[0]), time.perf_counter() - t0)
      # The kernel cannot read a clock, so each run gets the nodes the measured rate allows before the deadline; a
      # single preorder restarts with doubling limits too, so the rate is measured before any long run.
      budget = limit
      if rate is not None:
        budget = min(budget, max(int(rate * left), 1))
      counters[1] = budget
      start, before = time.perf_counter(), int(counters[0])
      for buffers, lo, hi in parts:
        status = kernel(buffers, lo, hi, 0, -1, g, st, counters)
        if status != _OK:
          break
      spent = time.perf_counter() - start
      if int(counters[0]) - before > 1000 and spent > 0.05:
        rate = (int(counters[0]) - before) / spent
      if status == _OK:
        off = st[5].copy()
        return ExactResult("feasible", off, int(counters[0]), time.perf_counter() - t0)
      if status == _NOT_FOUND:
        return ExactResult("infeasible", None, int(counters[0]), time.perf_counter() - t0)
      if time.perf_counter() >= deadline:
        return ExactResult("unknown", None, int(counters[0]), time.perf_counter() - t0)
