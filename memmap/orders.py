"""Buffer orders shared by the greedy baselines and the game.

``spatial`` (size desc, duration desc, id) and ``temporal`` (duration desc, size desc, id) are the two orders of XLA's
``GlobalDecreasingSizeBestFitHeap`` (openxla/xla ``xla/service/heap_simulator/heap_simulator.cc``); ``area``
sorts by size * duration; ``msa`` sorts by benefit / sqrt(size), XLA memory-space-assignment's "memory boundedness"
(``MemoryBoundednessBufferIntervalComparator``), then size desc, duration desc, start; ``chronological``
by start; ``input`` keeps the file's order.
"""

from __future__ import annotations

import numpy as np

from memmap.instance import Instance

ORDERS = ("spatial", "temporal", "area", "msa", "chronological", "input")


def buffer_order(inst: Instance, order: str) -> np.ndarray:
  """int[N]: the indices of ``inst``'s buffers in the order they are placed."""
  dur = inst.upper - inst.lower
  idx = np.arange(inst.n)
  keys = {
      "spatial": (idx, -dur, -inst.size),
      "temporal": (idx, -inst.size, -dur),
      "area": (idx, -dur, -inst.size, -inst.area),
      "msa": (idx, inst.lower, -dur, -inst.size, -inst.benefit / np.sqrt(inst.size)),
      "chronological": (idx, inst.upper, inst.lower),
      "input": (idx,),
  }
  if order not in keys:
    raise ValueError(f"unknown buffer order {order!r}; allowed: {', '.join(ORDERS)}.")
  return np.lexsort(keys[order])
