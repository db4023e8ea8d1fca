"""Buffer sets for the mallocGame and the placement validator.

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning", arXiv 2305.07440: the compiler maps
each buffer (a tensor with a half-open live interval ``[lower, upper)`` and a size in bytes) to an offset in a
limited fast memory, or leaves it in slow memory. Two buffers conflict when their time intervals and their address
intervals both overlap; the validator follows google/minimalloc ``src/validator.cc``.

Shapes: an instance of N buffers holds ``lower, upper, size: int64[N]`` and ``benefit: float64[N]``; a placement is
``offsets: int64[N]`` with ``SLOW`` (-1) for a buffer left in slow memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SLOW = -1


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
  """N buffers, a fast-memory capacity (bytes) and an offset alignment (bytes).

  ``benefit[i]`` is what keeping buffer i in fast memory is worth (access bytes times the bandwidth difference, see
  ``cost_model``); MiniMalloc files carry no accesses, so it defaults to the rectangle area ``size * (upper - lower)``.
  """
  ids: tuple[str, ...]
  lower: np.ndarray
  upper: np.ndarray
  size: np.ndarray
  capacity: int
  alignment: int = 1
  benefit: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.ids)
    for name in ("lower", "upper", "size"):
      arr = np.asarray(getattr(self, name), dtype=np.int64)
      if arr.shape != (n,):
        raise ValueError(f"Instance.{name} has shape {arr.shape}; expected ({n},), one entry per id.")
      object.__setattr__(self, name, arr)
    if len(set(self.ids)) != n:
      raise ValueError("Instance.ids must be unique; found a repeated buffer id.")
    if n and (self.lower < 0).any():
      raise ValueError("Instance.lower must be >= 0.")
    bad = np.flatnonzero(self.upper <= self.lower)
    if bad.size:
      i = bad[0]
      raise ValueError(f"buffer {self.ids[i]!r} has empty live interval [{self.lower[i]}, {self.upper[i]}); need "
                       "lower < upper (half-open).")
    if n and (self.size <= 0).any():
      raise ValueError(f"buffer {self.ids[int(np.argmin(self.size))]!r} has size <= 0; sizes must be positive.")
    if self.capacity <= 0 or self.alignment <= 0:
      raise ValueError(f"capacity ({self.capacity}) and alignment ({self.alignment}) must be positive integers.")
    benefit = self.area if self.benefit is None else np.asarray(self.benefit, dtype=np.float64)
    if benefit.shape != (n,):
      raise ValueError(f"Instance.benefit has shape {benefit.shape}; expected ({n},).")
    object.__setattr__(self, "benefit", benefit)

  @property
  def n(self) -> int:
    return len(self.ids)

  @property
  def area(self) -> np.ndarray:
    return (self.size * (self.upper - self.lower)).astype(np.float64)

  def replace(self, **changes) -> Instance:
    return dataclasses.replace(self, **changes)


def time_overlap(inst: Instance) -> np.ndarray:
  """bool[N, N]: buffers i and j are live at a common time (half-open intervals); the diagonal is False."""
  ov = (inst.lower[:, None] < inst.upper[None, :]) & (inst.lower[None, :] < inst.upper[:, None])
  np.fill_diagonal(ov, False)
  return ov


def load_bound(inst: Instance) -> int:
  """L = max over time of the bytes live at once: a lower bound on any placement's height."""
  if inst.n == 0:
    return 0
  times = np.unique(inst.lower)
  live = (inst.lower[None, :] <= times[:, None]) & (times[:, None] < inst.upper[None, :])
  return int((live * inst.size[None, :]).sum(axis=1).max())


def compress_times(inst: Instance) -> Instance:
  """Rank-compresses interval endpoints to 0..T-1; preserves every overlap (MiniMalloc's 2**20 ticks -> <=175)."""
  points = np.unique(np.concatenate([inst.lower, inst.upper]))
  return inst.replace(lower=np.searchsorted(points, inst.lower), upper=np.searchsorted(points, inst.upper))


class PlacementError(ValueError):
  """A placement breaks capacity, alignment, or puts two live buffers at overlapping addresses."""


def validate(inst: Instance, offsets: np.ndarray, capacity: int | None = None) -> int:
  """Checks a placement and returns its height ``max(offset + size)`` over placed buffers (0 if none).

  Args:
    inst: the buffer set.
    offsets: int[N], the offset of each buffer or ``SLOW`` (-1).
    capacity: the address limit to check; defaults to ``inst.capacity``.

  Raises:
    PlacementError: naming the offending buffer (or the two conflicting buffers).
  """
  capacity = inst.capacity if capacity is None else capacity
  offsets = np.asarray(offsets, dtype=np.int64)
  if offsets.shape != (inst.n,):
    raise PlacementError(f"placement has {offsets.shape} offsets for {inst.n} buffers.")
  placed = np.flatnonzero(offsets != SLOW)
  for i in placed:
    o, z = offsets[i], inst.size[i]
    if o < 0:
      raise PlacementError(f"buffer {inst.ids[i]!r} has negative offset {o}.")
    if o % inst.alignment:
      raise PlacementError(f"buffer {inst.ids[i]!r} offset {o} is not a multiple of the alignment {inst.alignment}.")
    if o + z > capacity:
      raise PlacementError(f"buffer {inst.ids[i]!r} at [{o}, {o + z}) exceeds the capacity {capacity}.")
  lo, up, z, o = inst.lower[placed], inst.upper[placed], inst.size[placed], offsets[placed]
  clash = ((lo[:, None] < up[None, :]) & (lo[None, :] < up[:, None])
           & (o[:, None] < o[None, :] + z[None, :]) & (o[None, :] < o[:, None] + z[:, None]))
  np.fill_diagonal(clash, False)
  if clash.any():
    a, b = np.argwhere(clash)[0]
    i, j = placed[a], placed[b]
    raise PlacementError(
        f"buffers {inst.ids[i]!r} (time [{inst.lower[i]}, {inst.upper[i]}), address [{offsets[i]}, "
        f"{offsets[i] + inst.size[i]})) and {inst.ids[j]!r} (time [{inst.lower[j]}, {inst.upper[j]}), address "
        f"[{offsets[j]}, {offsets[j] + inst.size[j]})) overlap in time and address.")
  return int((o + z).max()) if placed.size else 0
