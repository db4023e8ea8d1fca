"""Greedy placement heuristics: first fit and best fit in a chosen buffer order.

Best fit is XLA's ``GlobalDecreasingSizeBestFitHeap`` rule (openxla/xla ``heap_simulator.cc``): among the free
address gaps left by the time-overlapping buffers already placed, take the smallest aligned gap that fits (ties: the
lowest offset); first fit takes the lowest offset that fits. With ``capacity`` set, a buffer that fits nowhere below
it is left in slow memory (XLA MSA's behaviour for alternate memory); without, it goes on top of the others, which
minimises nothing but always succeeds (the DSA "height" problem).
"""

from __future__ import annotations

import numpy as np

from memmap.instance import SLOW, Instance, adjacency
from memmap.orders import ORDERS, buffer_order

FITS = ("first", "best")
_NONE = np.iinfo(np.int64).max


def free_gaps(starts: np.ndarray, ends: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
  """The segments ``[lo, hi)`` between the address ranges ``[starts[i], ends[i])`` and up to ``limit``, as two
  int64 arrays in address order; ranges that overlap each other leave empty or negative segments (hi <= lo)."""
  k = np.argsort(starts)
  lo = np.empty(starts.size + 1, np.int64)
  lo[0] = 0
  np.maximum.accumulate(ends[k], out=lo[1:])
  return lo, np.append(starts[k], limit)


def place_one(lo: np.ndarray, hi: np.ndarray, size: int, alignment: int, fit: str) -> int:
  """The offset ``fit`` picks among free gaps ``[lo, hi)`` (in address order) for a buffer of ``size`` bytes, or
  ``SLOW`` if none fits: first fit = lowest aligned offset; best fit = smallest gap, then lowest offset."""
  start = lo if alignment == 1 else -(-lo // alignment) * alignment
  ok = start + size <= hi
  k = int(np.argmax(ok)) if fit == "first" else int(np.argmin(np.where(ok, hi - lo, _NONE)))
  return int(start[k]) if ok[k] else SLOW


def greedy(inst: Instance, order: str = "spatial", fit: str = "best", capacity: int | None = None) -> np.ndarray:
  """Places buffers one by one; returns int64[N] offsets (``SLOW`` where nothing fits below ``capacity``).

  Each buffer looks only at its time-overlapping partners (CSR lists from a sweep, ``memmap.instance.adjacency``),
  so memory is O(N + overlapping pairs) and a 100,000-buffer program takes seconds (``benchmarks/memmap_scale.py``).

  Args:
    inst: the buffer set.
    order: one of ``memmap.orders.ORDERS``.
    fit: "first" (lowest offset) or "best" (smallest gap, then lowest offset).
    capacity: the address limit; None places everything (height problem).
  """
  if fit not in FITS:
    raise ValueError(f"unknown fit {fit!r}; allowed: {', '.join(FITS)}.")
  limit = int(inst.size.sum()) if capacity is None else capacity
  indptr, nbrs = adjacency(inst)
  offsets = np.full(inst.n, SLOW, dtype=np.int64)
  size, a = inst.size, inst.alignment
  for i in buffer_order(inst, order).tolist():
    nb = nbrs[indptr[i]:indptr[i + 1]]
    nb = nb[offsets[nb] != SLOW]
    o = offsets[nb]
    lo, hi = free_gaps(o, o + size[nb], limit)
    offsets[i] = place_one(lo, hi, int(size[i]), a, fit)
  return offsets


def portfolio(inst: Instance, capacity: int | None = None) -> np.ndarray:
  """The lowest-height (or, with a capacity, highest-benefit) result over every order and fit."""
  results = [greedy(inst, o, f, capacity) for o in ORDERS for f in FITS]
  if capacity is None:
    return min(results, key=lambda off: int((off + inst.size).max()))
  return max(results, key=lambda off: float(inst.benefit[off != SLOW].sum()))
