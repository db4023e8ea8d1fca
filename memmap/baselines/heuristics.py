"""Greedy placement heuristics: first fit and best fit in a chosen buffer order.

Best fit is XLA's ``GlobalDecreasingSizeBestFitHeap`` rule (openxla/xla ``heap_simulator.cc``): among the free
address gaps left by the time-overlapping buffers already placed, take the smallest aligned gap that fits (ties: the
lowest offset); first fit takes the lowest offset that fits. With ``capacity`` set, a buffer that fits nowhere below
it is left in slow memory (XLA MSA's behaviour for alternate memory); without, it goes on top of the others, which
minimises nothing but always succeeds (the DSA "height" problem).
"""

from __future__ import annotations

import numpy as np

from memmap.instance import SLOW, Instance, time_overlap
from memmap.orders import ORDERS, buffer_order

FITS = ("first", "best")


def free_gaps(starts: np.ndarray, ends: np.ndarray, limit: int) -> list[tuple[int, int]]:
  """Maximal free segments ``[a, b)`` of ``[0, limit)`` not covered by any ``[starts[i], ends[i])``."""
  gaps, top = [], 0
  for s, e in sorted(zip(starts.tolist(), ends.tolist())):
    if s > top:
      gaps.append((top, s))
    top = max(top, e)
  if top < limit:
    gaps.append((top, limit))
  return gaps


def greedy(inst: Instance, order: str = "spatial", fit: str = "best", capacity: int | None = None) -> np.ndarray:
  """Places buffers one by one; returns int64[N] offsets (``SLOW`` where nothing fits below ``capacity``).

  Args:
    inst: the buffer set.
    order: one of ``memmap.orders.ORDERS``.
    fit: "first" (lowest offset) or "best" (smallest gap, then lowest offset).
    capacity: the address limit; None places everything (height problem).
  """
  if fit not in FITS:
    raise ValueError(f"unknown fit {fit!r}; allowed: {', '.join(FITS)}.")
  limit = int(inst.size.sum()) if capacity is None else capacity
  overlap = time_overlap(inst)
  offsets = np.full(inst.n, SLOW, dtype=np.int64)
  a = inst.alignment
  for i in buffer_order(inst, order):
    nb = np.flatnonzero(overlap[i] & (offsets != SLOW))
    best = None
    for lo, hi in free_gaps(offsets[nb], offsets[nb] + inst.size[nb], limit):
      start = -(-lo // a) * a
      if start + inst.size[i] > hi:
        continue
      key = (start,) if fit == "first" else (hi - lo, start)
      if best is None or key < best[0]:
        best = (key, start)
    if best is not None:
      offsets[i] = best[1]
  return offsets


def portfolio(inst: Instance, capacity: int | None = None) -> np.ndarray:
  """The lowest-height (or, with a capacity, highest-benefit) result over every order and fit."""
  results = [greedy(inst, o, f, capacity) for o in ORDERS for f in FITS]
  if capacity is None:
    return min(results, key=lambda off: int((off + inst.size).max()))
  return max(results, key=lambda off: float(inst.benefit[off != SLOW].sum()))
