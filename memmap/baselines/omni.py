"""omnimalloc's allocators as baselines (``--method omnimalloc:<name>``; optional extra ``memlab[baselines]``).

Peddinghaus, omnimalloc 1.0.0 (github.com/fpedd/omnimalloc, Apache-2.0): static memory allocators behind one API,
including SuperMalloc (a portfolio branch and bound over MiniMalloc-style partitions, C++). Lifetimes are half-open
``[start, end)`` as ours, so an instance maps one to one; alignment is honoured by placing sizes rounded up to the
alignment in units of it. Every placement comes back through ``memmap.instance.validate`` in ``memmap.solvers``.

Shapes: ``inst`` of N buffers -> offsets int64[N].
"""

from __future__ import annotations

import inspect

import numpy as np

from memmap.instance import Instance

# omnimalloc 1.0.0's ``available_allocators()``, fixed here so the command line lists them without importing it.
# ``minimalloc`` wraps google/minimalloc's Python module, which is not on PyPI: it fails with omnimalloc's own message.
ALLOCATORS = ("best_fit", "greedy", "greedy_by_duration", "greedy_by_conflict", "greedy_by_conflict_size",
              "greedy_by_start", "greedy_by_area", "greedy_by_size", "greedy_by_all", "genetic", "simulated_annealing",
              "hill_climb", "minimalloc", "naive", "omni", "random", "supermalloc", "tabu_search", "telamalloc")
INSTALL = "pip install 'memlab[baselines]' (omnimalloc 1.0.0)"


def available() -> bool:
  try:
    import omnimalloc  # noqa: F401
  except ImportError:
    return False
  return True


def solve(inst: Instance, name: str, time_limit: float = 60.0) -> np.ndarray:
  """Runs omnimalloc allocator ``name`` (height problem: everything placed) and returns int64[N] byte offsets.

  ``time_limit`` is passed as ``timeout`` to the allocators that take one (supermalloc, the local searches,
  telamalloc); the others run to completion.
  """
  if name not in ALLOCATORS:
    raise ValueError(f"unknown omnimalloc allocator {name!r}; allowed: {', '.join(ALLOCATORS)}.")
  try:
    import omnimalloc as om
    from omnimalloc.allocators import BaseAllocator
  except ImportError:
    raise ImportError(f"--method omnimalloc:{name} needs omnimalloc: {INSTALL}.") from None
  if inst.n == 0:
    return np.zeros(0, np.int64)
  a = inst.alignment
  units = -(-inst.size // a)
  allocs = tuple(om.Allocation(id=i, size=int(units[i]), start=int(inst.lower[i]), end=int(inst.upper[i]))
                 for i in range(inst.n))
  cls = BaseAllocator.get(name)
  kwargs = {"timeout": float(time_limit)} if "timeout" in inspect.signature(cls.__init__).parameters else {}
  placed = om.allocate(allocs, allocator=cls(**kwargs))
  offsets = np.empty(inst.n, np.int64)
  for alloc in placed:
    offsets[alloc.id] = alloc.offset * a
  return offsets
