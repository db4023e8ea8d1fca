"""Synthetic buffer sets for self-play training and tests.

``guillotine``: a W (time) x H (address) rectangle cut recursively into n pieces, each piece a buffer; the pieces
tile the rectangle, so the optimum height is exactly H (a perfect packing, like MiniMalloc's "challenging" set).
``random``: exponential lifetimes and sizes in {1..16} x 64 bytes; loose, the optimum is usually the load bound.
"""

from __future__ import annotations

import numpy as np

from memmap.instance import Instance


def guillotine(n: int, rng: np.random.Generator, width: int = 64, height: int = 64) -> Instance:
  """n buffers tiling [0, width) x [0, height); ``capacity = height`` is achievable and optimal."""
  if not 1 <= n <= width * height:
    raise ValueError(f"guillotine needs 1 <= n <= width*height = {width * height}, got n={n}.")
  pieces = [(0, width, 0, height)]
  while len(pieces) < n:
    areas = np.array([(t1 - t0) * (a1 - a0) * ((t1 - t0 > 1) or (a1 - a0 > 1)) for t0, t1, a0, a1 in pieces], float)
    t0, t1, a0, a1 = pieces.pop(int(rng.choice(len(pieces), p=areas / areas.sum())))
    cut_time = (t1 - t0 > 1) and ((a1 - a0 == 1) or rng.random() < 0.5)
    if cut_time:
      c = int(rng.integers(t0 + 1, t1))
      pieces += [(t0, c, a0, a1), (c, t1, a0, a1)]
    else:
      c = int(rng.integers(a0 + 1, a1))
      pieces += [(t0, t1, a0, c), (t0, t1, c, a1)]
  lower, upper, lo_a, hi_a = (np.array(x, dtype=np.int64) for x in zip(*pieces))
  return Instance(ids=tuple(f"b{i}" for i in range(n)), lower=lower, upper=upper, size=hi_a - lo_a, capacity=height)


def random_instance(n: int, rng: np.random.Generator, horizon: int = 100, capacity: int | None = None,
                    mean_life: float | None = None) -> Instance:
  """n buffers with exponential lifetimes (mean ``mean_life``, default horizon/8) and sizes in {1..16} * 64 bytes.

  ``random_instance(100_000, rng, horizon=100_000, mean_life=64)`` is program-like: one buffer defined per step,
  about 64 live at a time (``benchmarks/memmap_scale.py``)."""
  lower = rng.integers(0, horizon, n)
  life = horizon / 8 if mean_life is None else mean_life
  upper = np.minimum(lower + 1 + rng.exponential(life, n).astype(np.int64), horizon + 1)
  size = rng.integers(1, 17, n) * 64
  return Instance(ids=tuple(f"b{i}" for i in range(n)), lower=lower, upper=upper, size=size,
                  capacity=int(size.sum()) if capacity is None else capacity)
