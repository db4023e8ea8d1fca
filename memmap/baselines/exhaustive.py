"""Exhaustive search for tiny instances (n <= ~7): the oracle the CP-SAT and agent tests compare against.

Completeness: push every buffer of an optimal placement down until it rests on 0 or on the top edge of a
time-overlapping buffer (this never raises the height); placing buffers in increasing offset order then makes each
buffer's resting support already placed, so trying every next buffer at every such candidate offset finds an optimum.
"""

from __future__ import annotations

import itertools

import numpy as np

from memmap.instance import SLOW, Instance, time_overlap


def min_height(inst: Instance, limit: int | None = None) -> tuple[int, np.ndarray] | None:
  """(height, offsets) of a lowest placement with height <= limit (default: unbounded), or None if none fits."""
  ov = time_overlap(inst)
  z, a, n = inst.size, inst.alignment, inst.n
  best = [int(z.sum()) + 1 if limit is None else limit + 1, None]
  off = np.full(n, SLOW, dtype=np.int64)

  def dfs(placed: int, height: int):
    if height >= best[0]:
      return
    if placed == n:
      best[0], best[1] = height, off.copy()
      return
    for i in np.flatnonzero(off == SLOW):
      nb = np.flatnonzero(ov[i] & (off != SLOW))
      for c in sorted({0} | {-(-int(off[j] + z[j]) // a) * a for j in nb}):
        if all(c + z[i] <= off[j] or off[j] + z[j] <= c for j in nb):
          off[i] = c
          dfs(placed + 1, max(height, c + int(z[i])))
          off[i] = SLOW

  dfs(0, 0)
  return None if best[1] is None else (best[0], best[1])


def max_benefit(inst: Instance, capacity: int | None = None) -> tuple[float, np.ndarray]:
  """(benefit, offsets) of a highest-benefit subset that fits under ``capacity`` (default ``inst.capacity``)."""
  cap = inst.capacity if capacity is None else capacity
  best = (0.0, np.full(inst.n, SLOW, dtype=np.int64))
  for k in range(inst.n, 0, -1):
    for subset in itertools.combinations(range(inst.n), k):
      idx = np.array(subset)
      value = float(inst.benefit[idx].sum())
      if value <= best[0]:
        continue
      sub = Instance(ids=tuple(inst.ids[i] for i in idx), lower=inst.lower[idx], upper=inst.upper[idx],
                     size=inst.size[idx], capacity=cap, alignment=inst.alignment)
      found = min_height(sub, cap)
      if found is not None:
        off = np.full(inst.n, SLOW, dtype=np.int64)
        off[idx] = found[1]
        best = (value, off)
  return best
