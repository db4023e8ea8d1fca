"""Attention visibility patterns as data: dense (causal or not), sink + sliding window, LongGen block-sparse.

A pattern answers three questions, each written with ``jnp``/``np`` arithmetic only so that it works on numpy
arrays at trace time, on traced scalars inside ``lax.scan`` and inside Pallas kernels:

* ``allowed(i, j, h)``: may query position i see key position j in KV head h (broadcasting bool)?
* ``key_block_ranges(q_lo, q_hi, h, block_k, num_k_blocks, kv_length)``: arithmetic progressions
  ``(first, count, stride, masked)`` of key blocks that together cover, once each, every key visible to some
  query in ``[q_lo, q_hi]``, without index arrays. ``masked=False`` (static) promises every (query, key) pair of
  those blocks is visible, so kernels skip the element mask there (FULL tiles) and pay for it only on PARTIAL ones.
* ``query_block_ranges(k_lo, k_hi, h, block_q, num_q_blocks, kv_length)``: the same for the query blocks that see
  some key in ``[k_lo, k_hi]`` (the transposed enumeration the dK/dV backward pass needs).

Keys at or beyond ``kv_length`` are padding. Causal patterns never show them to a real query (j > i), so their
FULL claims may include padding seen only by padded query rows, whose results are discarded.

Query i, key j are absolute 0-indexed positions; h is the KV head (GQA query heads share their KV head's
pattern). LongGen: "A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial
Contexts" (Ge et al., arXiv 2410.01485); the block-sparse rule is S2-Attention's (arXiv 2407.17678, dkernel
``get_sparse_attn_mask`` with absolute vertical stride).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax


def _xp(*values):
  """numpy for host integers/arrays, jax.numpy as soon as any operand is a jax value (traced or not)."""
  return np if all(isinstance(v, (int, np.integer, np.ndarray, bool)) for v in values) else jnp


def _div(a, b: int):
  """a // b for a >= 0; ``lax.div`` on jax values because Triton lowers it directly (floor division needs sign)."""
  if _xp(a) is np:
    return a // b
  a = jnp.asarray(a)
  return lax.div(a, jnp.asarray(b, a.dtype))


def _split(first, end, full_lo, full_hi):
  """Blocks [first, end) as (masked prefix, FULL middle [full_lo, full_hi) clipped, masked suffix) ranges."""
  xp = _xp(first, end, full_lo, full_hi)
  lo = xp.minimum(xp.maximum(full_lo, first), end)
  hi = xp.minimum(xp.maximum(full_hi, lo), end)
  return [(first, lo - first, 1, True), (lo, hi - lo, 1, False), (hi, end - hi, 1, True)]


def _mod(a, b: int):
  """a % b for a >= 0 (``lax.rem`` on jax values, see ``_div``)."""
  if _xp(a) is np:
    return a % b
  a = jnp.asarray(a)
  return lax.rem(a, jnp.asarray(b, a.dtype))


@dataclasses.dataclass(frozen=True)
class Dense:
  """Every key (``causal=False``) or every key j <= i (``causal=True``)."""

  causal: bool = True

  @property
  def head_dependent(self) -> bool:
    return False

  def allowed(self, i, j, h=0):
    del h
    xp = _xp(i, j)
    return (j <= i) if self.causal else xp.ones(xp.broadcast_shapes(xp.shape(i), xp.shape(j)), bool)

  def key_block_ranges(self, q_lo, q_hi, h, block_k, num_k_blocks, kv_length):
    del h
    zero = 0 * q_lo
    if not self.causal:
      return _split(zero, zero + num_k_blocks, zero, zero + kv_length // block_k)
    end = _xp(q_hi).minimum(_div(q_hi, block_k) + 1, num_k_blocks)
    return _split(zero, end, zero, _div(q_lo + 1, block_k))

  def query_block_ranges(self, k_lo, k_hi, h, block_q, num_q_blocks, kv_length):
    del h
    if not self.causal:
      zero = 0 * k_lo
      return _split(zero, zero + num_q_blocks, zero, _xp(k_hi).where(k_hi >= kv_length, 0, num_q_blocks))
    return _split(_div(k_lo, block_q), num_q_blocks + 0 * k_lo, _div(k_hi + block_q - 1, block_q), num_q_blocks)

  def tile_any_all(self, q_lo, q_hi, k_lo, k_hi, h=0):
    """(some pair visible, every pair visible) for tiles [q_lo, q_hi] x [k_lo, k_hi] (inclusive ends)."""
    del h
    if not self.causal:
      ones = np.ones(np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo)), bool)
      return ones, ones
    return k_lo <= q_hi, k_hi <= q_lo


@dataclasses.dataclass(frozen=True)
class SinkWindow:
  """Causal attention to the first ``sink`` keys and to the last ``window`` keys (the current one included).

  ``allowed(i, j) = j <= i and (j < sink or i - j < window)``; row i sees ``min(i + 1, sink + window)`` keys.
  """

  sink: int = 64
  window: int = 8192

  def __post_init__(self):
    if self.sink < 0 or self.window < 1:
      raise ValueError(f"SinkWindow needs sink >= 0 and window >= 1 (got sink={self.sink}, window={self.window})")

  @property
  def head_dependent(self) -> bool:
    return False

  def allowed(self, i, j, h=0):
    del h
    return (j <= i) & ((j < self.sink) | (i - j < self.window))

  def key_block_ranges(self, q_lo, q_hi, h, block_k, num_k_blocks, kv_length):
    del h, kv_length
    xp = _xp(q_lo, q_hi)
    win_first = _div(xp.maximum(q_lo - self.window + 1, 0), block_k)
    win_end = xp.maximum(xp.minimum(_div(q_hi, block_k) + 1, num_k_blocks), win_first)
    causal_full = _div(q_lo + 1, block_k)  # blocks entirely at or before q_lo
    # Sink blocks the window range does not already cover: disjoint, so no block is visited twice.
    sink_end = xp.maximum(xp.minimum(-(-self.sink // block_k), win_first), 0)
    sink = _split(0 * win_first, sink_end, 0 * win_first, xp.minimum(self.sink // block_k, causal_full))
    window_full = _div(xp.maximum(q_hi - self.window + 1, 0) + block_k - 1, block_k)
    return sink + _split(win_first, win_end, window_full, causal_full)

  def query_block_ranges(self, k_lo, k_hi, h, block_q, num_q_blocks, kv_length):
    del h, kv_length
    xp = _xp(k_lo, k_hi)
    first = _div(k_lo, block_q)
    end = xp.where(k_lo < self.sink, num_q_blocks,
                   xp.minimum(_div(k_hi + self.window - 1, block_q) + 1, num_q_blocks))
    full_hi = xp.where(k_hi < self.sink, num_q_blocks, _div(xp.maximum(k_lo, self.sink) + self.window, block_q))
    return _split(first, xp.maximum(end, first), _div(k_hi + block_q - 1, block_q), full_hi)

  def tile_any_all(self, q_lo, q_hi, k_lo, k_hi, h=0):
    del h
    # The tile holds pairs with every difference i - j in [q_lo - k_hi, q_hi - k_lo].
    any_ = (k_lo <= q_hi) & ((k_lo < self.sink) | (np.maximum(q_lo - k_hi, 0) < self.window))
    all_ = (k_hi <= q_lo) & ((k_hi < self.sink) | (q_hi - np.maximum(k_lo, self.sink) < self.window))
    return any_, all_


@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """LongGen / S2-Attention blockwise pattern: ``local_blocks`` recent blocks plus every ``stride``-th block.

  With ``qb = i // block``, ``kb = j // block`` and KV head h, key j is visible iff ``j <= i`` and
  (``qb - kb < local_blocks`` or ``(kb + h * step + offset) % stride == 0``). ``step`` defaults to
  ``max(1, stride // num_q_heads)`` (dkernel), ``homo_head`` gives every head h = 0, and the last
  ``num_dense_heads`` KV heads are dense causal. The stride is absolute, so a block invisible to query t stays
  invisible to every later query: evicting it from a KV cache is exact.
  """

  block: int = 64
  local_blocks: int = 16
  stride: int = 8
  step: int | None = None
  offset: int = 0
  homo_head: bool = False
  num_dense_heads: int = 0
  num_q_heads: int = 1
  num_kv_heads: int = 1

  def __post_init__(self):
    problems = []
    for name in ("block", "local_blocks", "stride", "num_q_heads", "num_kv_heads"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
    if self.offset < 0:
      problems.append(f"offset must be >= 0 (got {self.offset})")
    if self.step is not None and self.step < 0:
      problems.append(f"step must be >= 0 or None (got {self.step})")
    if self.num_dense_heads < 0:
      problems.append(f"num_dense_heads must be >= 0 (got {self.num_dense_heads})")
    if problems:
      raise ValueError("BlockSparse: " + "; ".join(problems))

  @property
  def head_dependent(self) -> bool:
    return self.num_dense_heads > 0 or not (self.homo_head or self.resolved_step % self.stride == 0)

  @property
  def resolved_step(self) -> int:
    return self.step if self.step is not None else max(1, self.stride // self.num_q_heads)

  def _residue(self, h):
    """r_h: key blocks kb = r_h (mod stride) are the strided blocks of head h."""
    hh = 0 * h if self.homo_head else h
    return _mod(self.stride - _mod(hh * self.resolved_step + self.offset, self.stride), self.stride)

  def _dense_head(self, h):
    return h >= self.num_kv_heads - self.num_dense_heads

  def allowed(self, i, j, h=0):
    qb, kb = _div(i, self.block), _div(j, self.block)
    on_stride = _mod(kb + self.stride - self._residue(h), self.stride) == 0
    visible = (qb - kb < self.local_blocks) | on_stride | self._dense_head(h)
    return (j <= i) & visible

  def _check_tile(self, tile):
    if tile != self.block:
      raise ValueError(f"BlockSparse kernels use tiles equal to the pattern block ({self.block}), got {tile}")

  def key_block_ranges(self, q_lo, q_hi, h, block_k, num_k_blocks, kv_length):
    del kv_length
    self._check_tile(block_k)
    xp = _xp(q_lo, h)
    qb = _div(q_hi, block_k)
    dense = self._dense_head(h)
    local_first = xp.where(dense, 0, xp.maximum(qb - self.local_blocks + 1, 0))
    r = self._residue(h)
    behind = qb - self.local_blocks - r  # strided blocks r, r + stride, ... <= qb - local_blocks
    strided = xp.where(dense | (behind < 0), 0, _div(xp.maximum(behind, 0), self.stride) + 1)
    last = xp.minimum(qb, num_k_blocks - 1)
    # Strided and off-diagonal local blocks lie strictly before the query block: FULL. The diagonal is PARTIAL.
    return [(r, strided, self.stride, False), (local_first, xp.maximum(last - local_first, 0), 1, False),
            (last, 1 + 0 * last, 1, True)]

  def query_block_ranges(self, k_lo, k_hi, h, block_q, num_q_blocks, kv_length):
    del k_hi, kv_length
    self._check_tile(block_q)
    xp = _xp(k_lo, h)
    kb = _div(k_lo, block_q)
    always = self._dense_head(h) | (_mod(kb + self.stride - self._residue(h), self.stride) == 0)
    last = xp.where(always, num_q_blocks - 1, xp.minimum(kb + self.local_blocks - 1, num_q_blocks - 1))
    return [(kb, 1 + 0 * kb, 1, True), (kb + 1, xp.maximum(last - kb, 0), 1, False)]

  def block_grid(self, num_blocks: int, h):
    """Pattern-block classes [len(h), num_blocks, num_blocks]: 0 empty, 1 partial (diagonal), 2 full."""
    qb = np.arange(num_blocks)[None, :, None]
    kb = np.arange(num_blocks)[None, None, :]
    hh = np.asarray(h)[:, None, None]
    visible = (qb - kb < self.local_blocks) | ((kb - self._residue(hh)) % self.stride == 0) | self._dense_head(hh)
    classes = np.where((kb < qb) & visible, 2, 0)
    return np.where(kb == qb, 1 if self.block > 1 else 2, classes).astype(np.int8)


Pattern = Dense | SinkWindow | BlockSparse


def head_pattern_count(pattern: Pattern, num_kv_heads: int) -> int:
  """How many distinct per-head masks to materialise: 1 when every KV head has the same pattern."""
  return num_kv_heads if pattern.head_dependent else 1
