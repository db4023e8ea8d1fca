"""Program time model for the benefit game, after XLA memory-space-assignment's cost analysis.

openxla/xla ``xla/service/memory_space_assignment/cost_analysis.cc`` (``GetInstructionElapsedDueToMemory``,
``GetAlternateMemoryBenefit``): op k takes ``elapsed_k = max(c_k, mem_k)`` with ``mem_k = fast_read/BW_fr +
fast_write/BW_fw + slow_bytes/BW_slow``; the program takes ``T = sum_k mult_k * elapsed_k``. Wang et al. (arXiv
2305.07440) reward the agent with the drop in this modelled time.

Decision (spec section 5): a unitless ``HardwareProfile`` with ``BW_slow = 1`` and fast bandwidth 4; compute
``c_k = flops_k / F`` with F putting the median op at the ridge point when everything is in slow memory.

Shapes: P ops, N buffers; ``reads, writes: float64[P, N]`` bytes; ``other: float64[P]`` always-slow bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  bw_slow: float = 1.0
  bw_fast_read: float = 4.0
  bw_fast_write: float = 4.0

  def __post_init__(self):
    if min(self.bw_slow, self.bw_fast_read, self.bw_fast_write) <= 0:
      raise ValueError(f"HardwareProfile bandwidths must be positive, got {self}.")


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """Per-op compute time, trip-count multiplier and buffer traffic."""
  compute: np.ndarray
  mult: np.ndarray
  reads: np.ndarray
  writes: np.ndarray
  other: np.ndarray
  hw: HardwareProfile = HardwareProfile()

  def __post_init__(self):
    p = np.asarray(self.compute).shape[0]
    for name, shape in (("mult", (p,)), ("other", (p,))):
      if np.asarray(getattr(self, name)).shape != shape:
        raise ValueError(f"Program.{name} must have shape {shape} (one entry per op).")
    if np.asarray(self.reads).shape != np.asarray(self.writes).shape or np.asarray(self.reads).shape[0] != p:
      raise ValueError("Program.reads and Program.writes must both be [ops, buffers].")

  @property
  def mem_slow(self) -> np.ndarray:
    """float[P]: each op's memory time with every buffer in slow memory."""
    return (self.reads.sum(1) + self.writes.sum(1) + self.other) / self.hw.bw_slow

  def saved_per_buffer(self) -> np.ndarray:
    """float[P, N]: memory time op k saves when buffer i is in fast memory."""
    hw = self.hw
    return (self.reads * (1 / hw.bw_slow - 1 / hw.bw_fast_read)
            + self.writes * (1 / hw.bw_slow - 1 / hw.bw_fast_write))

  def time(self, fast: np.ndarray) -> float:
    """T for a bool[N] fast-memory set."""
    mem = self.mem_slow - self.saved_per_buffer() @ np.asarray(fast, dtype=np.float64)
    return float((self.mult * np.maximum(self.compute, mem)).sum())

  @property
  def t_slow(self) -> float:
    return self.time(np.zeros(self.reads.shape[1], bool))

  def additive_benefit(self) -> np.ndarray:
    """float[N]: w_i, the time buffer i saves on its own (an upper bound on its share of the exact saving)."""
    return (self.mult[:, None] * self.saved_per_buffer()).sum(0)


def ridge_compute(flops: np.ndarray, mem_slow: np.ndarray) -> np.ndarray:
  """c_k = flops_k / F with F chosen so the median op sits at the ridge (c = mem) under all-slow placement."""
  flops = np.asarray(flops, dtype=np.float64)
  ratio = np.median(flops[flops > 0]) / max(np.median(mem_slow[flops > 0]), 1e-30) if (flops > 0).any() else 1.0
  return flops / max(ratio, 1e-30)
