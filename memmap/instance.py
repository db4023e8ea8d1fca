"""Buffer sets for the mallocGame and the placement validator.

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning", arXiv 2305.07440: the compiler maps
each buffer (a tensor with a half-open live interval ``[lower, upper)`` and a size in bytes) to an offset in a
limited fast memory, or leaves it in slow memory. Two buffers conflict when their time intervals and their address
intervals both overlap; the validator follows google/minimalloc ``src/validator.cc``.

Shapes: an instance of N buffers holds ``lower, upper, size: int64[N]`` and ``benefit: float64[N]``; a placement is
``offsets: int64[N]`` with ``SLOW`` (-1) for a buffer left in slow memory.
"""

from __future__ import annotations

import bisect
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
    if n and sum(self.size.tolist()) >= 2**62:
      raise ValueError("the buffer sizes sum to 2**62 bytes or more; they would overflow int64 offsets.")
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


MAX_DENSE = 4096  # buffers; above, time_overlap (and the jittable game, memmap.env) refuse their N x N matrix


def time_overlap(inst: Instance) -> np.ndarray:
  """bool[N, N]: buffers i and j are live at a common time (half-open intervals); the diagonal is False.

  Dense, for small instances only (the jittable game and exhaustive search); everything that must scale uses
  :func:`overlap_pairs` or :func:`sweep`. Raises ValueError above ``MAX_DENSE`` buffers.
  """
  if inst.n > MAX_DENSE:
    raise ValueError(f"time_overlap builds an N x N matrix; {inst.n} buffers exceed its limit of {MAX_DENSE}.")
  ov = np.zeros((inst.n, inst.n), bool)
  i, j = overlap_pairs(inst)
  ov[i, j] = ov[j, i] = True
  return ov


def overlap_pairs(inst: Instance, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(i, j) int64[P]: every unordered pair of buffers (among ``idx``, default all) live at a common time, once.

  Sweep by start time: after sorting by ``lower``, buffer q overlaps an earlier-starting p exactly when
  ``lower[q] < upper[p]``, so p's partners are a contiguous run found by binary search. O(N log N + P).
  """
  idx = np.arange(inst.n) if idx is None else np.asarray(idx, dtype=np.int64)
  lower, upper = inst.lower[idx], inst.upper[idx]
  order = np.argsort(lower, kind="stable")
  lo_sorted = lower[order]
  end = np.searchsorted(lo_sorted, upper[order], side="left")
  count = np.maximum(end - np.arange(idx.size) - 1, 0)
  first = np.repeat(np.arange(idx.size), count)
  offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
  second = first + 1 + offsets
  return idx[order[first]], idx[order[second]]


def adjacency(inst: Instance) -> tuple[np.ndarray, np.ndarray]:
  """CSR time-overlap lists from :func:`overlap_pairs`: buffer i's partners are ``nbrs[indptr[i]:indptr[i + 1]]``
  (int64[N + 1], int32[2P]); memory O(N + P) instead of the N x N matrix."""
  i, j = overlap_pairs(inst)
  src = np.concatenate([i, j]).astype(np.int32)
  dst = np.concatenate([j, i]).astype(np.int32)
  del i, j
  order = np.argsort(src, kind="stable")
  indptr = np.zeros(inst.n + 1, np.int64)
  np.cumsum(np.bincount(src, minlength=inst.n), out=indptr[1:])
  return indptr, dst[order]


def load_bound(inst: Instance) -> int:
  """L = max over time of the bytes live at once: a lower bound on any placement's height (a sweep, O(N log N))."""
  if inst.n == 0:
    return 0
  times = np.concatenate([inst.lower, inst.upper])
  delta = np.concatenate([inst.size, -inst.size])
  order = np.lexsort((delta, times))  # at equal times, frees (negative) before allocations: half-open intervals
  return int(np.cumsum(delta[order]).max())


def compress_times(inst: Instance) -> Instance:
  """Rank-compresses interval endpoints to 0..T-1; preserves every overlap (MiniMalloc's 2**20 ticks -> <=175)."""
  points = np.unique(np.concatenate([inst.lower, inst.upper]))
  return inst.replace(lower=np.searchsorted(points, inst.lower), upper=np.searchsorted(points, inst.upper))


@dataclasses.dataclass(frozen=True, eq=False)
class Sweep:
  """The sections of an instance (google/minimalloc ``src/sweeper.cc``): the maximal sets of buffers live at one
  moment, in time order. Buffer i takes part in the sections ``[sec_lo[i], sec_hi[i])``; two buffers overlap in
  time exactly when they share a section. ``partitions`` are the connected time ranges (buffers, lo, hi)."""
  sections: list[list[int]]
  sec_lo: list[int]
  sec_hi: list[int]
  overlaps: list[list[int]]
  partitions: list[tuple[list[int], int, int]]

  @property
  def num_sections(self) -> int:
    return len(self.sections)

  def cuts(self) -> list[int]:
    """int[S-1]: how many buffers take part in both section s and s + 1."""
    cuts = [0] * max(self.num_sections - 1, 0)
    for lo, hi in zip(self.sec_lo, self.sec_hi):
      for s in range(lo, hi - 1):
        cuts[s] += 1
    return cuts


def sweep(inst: Instance) -> Sweep:
  """Sections, per-buffer section ranges, time-overlap lists and partitions by one sweep over the endpoints."""
  n = inst.n
  events = sorted([(int(inst.upper[i]), 0, i) for i in range(n)] + [(int(inst.lower[i]), 1, i) for i in range(n)])
  sections, live, grew = [], {}, False
  sec_lo, sec_hi = [0] * n, [0] * n
  for _, kind, i in events:
    if kind == 0:  # a buffer ends: the live set just before it was maximal if it grew since the last section
      if grew:
        sections.append(sorted(live))
        grew = False
      del live[i]
      sec_hi[i] = len(sections)
    else:
      live[i] = None
      sec_lo[i] = len(sections)
      grew = True
  overlaps = []
  for i in range(n):
    near = set()
    for s in range(sec_lo[i], sec_hi[i]):
      near.update(sections[s])
    near.discard(i)
    overlaps.append(sorted(near))
  partitions, start = [], 0
  reach = 0
  by_section = sorted(range(n), key=lambda i: sec_lo[i])
  members = []
  for i in by_section:
    if members and sec_lo[i] >= reach:
      partitions.append((members, start, reach))
      members, start = [], sec_lo[i]
    members.append(i)
    reach = max(reach, sec_hi[i])
  if members:
    partitions.append((members, start, reach))
  return Sweep(sections, sec_lo, sec_hi, overlaps, partitions)


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
  o, z = offsets[placed], inst.size[placed]
  for bad, what in ((o < 0, "has a negative offset"), (o % inst.alignment != 0,
                    f"has an offset that is not a multiple of the alignment {inst.alignment}"),
                    (o + z > capacity, f"exceeds the capacity {capacity}")):
    if bad.any():
      i = placed[int(np.argmax(bad))]
      raise PlacementError(f"buffer {inst.ids[i]!r} at [{offsets[i]}, {offsets[i] + inst.size[i]}) {what}.")
  clash = first_clash(inst, offsets, placed)
  if clash is not None:
    i, j = clash
    raise PlacementError(
        f"buffers {inst.ids[i]!r} (time [{inst.lower[i]}, {inst.upper[i]}), address [{offsets[i]}, "
        f"{offsets[i] + inst.size[i]})) and {inst.ids[j]!r} (time [{inst.lower[j]}, {inst.upper[j]}), address "
        f"[{offsets[j]}, {offsets[j] + inst.size[j]})) overlap in time and address.")
  return int((o + z).max()) if placed.size else 0


def first_clash(inst: Instance, offsets: np.ndarray, idx: np.ndarray) -> tuple[int, int] | None:
  """Two buffers among ``idx`` that overlap in time and address, or None: a sweep over time keeping the live
  address ranges sorted (they are disjoint until a clash, so a new range can only hit its two neighbours).
  O(N log N + N * live) with list insertion, no N x N matrix."""
  idx = np.asarray(idx, dtype=np.int64)
  times = np.concatenate([inst.upper[idx], inst.lower[idx]])
  kinds = np.concatenate([np.zeros(idx.size, np.int64), np.ones(idx.size, np.int64)])  # frees first (half-open)
  who = np.concatenate([idx, idx])
  order = np.lexsort((who, kinds, times))
  starts, owners = [], []
  off, size = offsets.tolist(), inst.size.tolist()
  for kind, i in zip(kinds[order].tolist(), who[order].tolist()):
    o = off[i]
    if kind == 0:
      p = bisect.bisect_left(starts, o)
      while owners[p] != i:
        p += 1
      del starts[p], owners[p]
      continue
    p = bisect.bisect_right(starts, o)
    if p > 0 and off[owners[p - 1]] + size[owners[p - 1]] > o:
      return owners[p - 1], i
    if p < len(starts) and starts[p] < o + size[i]:
      return owners[p], i
    starts.insert(p, o)
    owners.insert(p, i)
  return None
