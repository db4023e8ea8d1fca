"""Block-sparse 1-pass attention for GPUs in Pallas (Triton lowering): forward, dK/dV and dQ kernels.

FlashAttention-2 ("FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv 2307.08691) restricted to the tiles a pattern makes visible. Tiles are enumerated arithmetically by the
pattern (``key_block_ranges`` for the forward and dQ kernels, ``query_block_ranges`` for dK/dV): a causal row
visits blocks [0, qb], a sink + window row its sink blocks then its window blocks, a LongGen block-sparse row
(S2-Attention, arXiv 2407.17678) its strided blocks r_h, r_h + s, ... then its local blocks. No index arrays or
scalar prefetch are needed (neither exists in the Triton lowering), and per-head strides cost nothing. Each
range is one loop compiled with or without the element mask, so FULL tiles pay no masking.

q [B, T, Hq, D], k/v [B, S, Hkv, D] with T, S multiples of the tiles and D a power of two in [16, 256] (the api
pads); returns (o [B, T, Hq, D], lse [B, T, Hq] float32, natural log). ``custom_vjp`` saves (q, k, v, o, lse);
the lse cotangent enters the backward as D - dlse, so segment merges stay differentiable. GQA: the forward and
dQ kernels read the KV head of each query head; dK/dV are computed per query head and summed over the group.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.attention.call import AttentionCall, Implementation, on_gpu
from layers.kernels.attention.fusemax import NEG
from layers.kernels.attention.patterns import BlockSparse, Pattern

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (queries x keys) of the three kernels, and Triton launch parameters.

  Defaults = the best of ``benchmarks/attention.py --sections tune`` on an H200 (bf16, D=128, dense causal 16K):
  forward 128x128 tiles, 8 warps, 3 stages (435 TFLOP/s); backward 64x64, 4 warps, 2 stages (fwd+bwd 392).
  """

  fwd_q: int = 128
  fwd_k: int = 128
  dkv_q: int = 64
  dkv_k: int = 64
  dq_q: int = 64
  dq_k: int = 64
  fwd_warps: int = 8
  bwd_warps: int = 4
  fwd_stages: int = 3
  bwd_stages: int = 2
  heavy_first: bool = False  # launch every head's longest tiles first (see _Grid); measured no faster on H200

  @classmethod
  def for_pattern(cls, pattern: Pattern) -> BlockSizes:
    """Defaults; BlockSparse kernels walk the pattern's own blocks, so every tile equals ``pattern.block``."""
    if isinstance(pattern, BlockSparse):
      b = pattern.block
      return cls(fwd_q=b, fwd_k=b, dkv_q=b, dkv_k=b, dq_q=b, dq_k=b, fwd_warps=4, bwd_warps=4)
    return cls()

  @property
  def tiles(self) -> tuple[int, ...]:
    return (self.fwd_q, self.fwd_k, self.dkv_q, self.dkv_k, self.dq_q, self.dq_k)

  @property
  def max_tile(self) -> int:
    return max(self.tiles)


@dataclasses.dataclass(frozen=True)
class _Static:
  pattern: Pattern
  scale: float
  kv_length: int  # keys at or beyond are padding
  blocks: BlockSizes
  interpret: bool


def _dot(a, b, a_axis: int, b_axis: int):
  """Contract a's ``a_axis`` with b's ``b_axis`` (2-D tiles), accumulating in float32."""
  return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), preferred_element_type=jnp.float32)


def _key_loop(st: _Static, q_lo, q_hi, h, block_k, num_keys, body, carry):
  """Run ``body(kb, masked, carry)`` over every key block the pattern makes visible to queries [q_lo, q_hi]."""
  ranges = st.pattern.key_block_ranges(q_lo, q_hi, h, block_k, num_keys // block_k, st.kv_length)
  for first, count, stride, masked in ranges:
    step = lambda n, c, first=first, stride=stride, masked=masked: body(first + n * stride, masked, c)
    carry = lax.fori_loop(0, count, step, carry)
  return carry


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Launch grid over (tile i, batch b, query head h) and the order its programs start in.

  CUDA starts programs with the first grid axis fastest. ``heavy_first`` puts the tile axis last, so every head's
  tile 0 starts before any head's tile 1, and numbers query tiles from the end: the longest loops (the last query
  tiles of causal rows, the first key tiles of dK/dV, sink blocks) start first and no long program is left to
  run alone at the end. Otherwise tiles of one head run consecutively in natural order, which keeps a head's K/V
  in L2: on an H200 (dense causal 16K) heavy-first ran the forward at 409 vs 445 TFLOP/s and forward+backward at
  397 vs 392, so natural order is the default.
  """

  tiles: int
  batch: int
  heads: int
  heavy_first: bool
  reverse: bool  # number tiles from the end (query-tile grids)

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.heads, self.batch, self.tiles) if self.heavy_first else (self.tiles, self.batch, self.heads)

  def logical(self, p0, p1, p2):
    """Program ids -> (tile, batch, query head)."""
    if not self.heavy_first:
      return p0, p1, p2
    return (self.tiles - 1 - p2 if self.reverse else p2), p1, p0

  def spec(self, block_shape, index_map) -> pl.BlockSpec:
    return pl.BlockSpec(block_shape, lambda *ids: index_map(*self.logical(*ids)))

  def program(self, group: int):
    """(tile, KV head) of the running program."""
    i, _, h = self.logical(pl.program_id(0), pl.program_id(1), pl.program_id(2))
    return i, h // group


def _mask(st: _Static, q_pos, k_pos, h):
  return st.pattern.allowed(q_pos[:, None], k_pos[None, :], h) & (k_pos < st.kv_length)[None, :]


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static, grid: _Grid, group: int):
  bq, bk = st.blocks.fwd_q, st.blocks.fwd_k
  qi, h = grid.program(group)
  q = q_ref[...]
  q_pos = qi * bq + jnp.arange(bq)
  scale2 = st.scale * LOG2E

  def body(kb, masked, carry):
    acc, m, l = carry
    start = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    s = _dot(q, k, 1, 1) * scale2
    if masked:
      s = jnp.where(_mask(st, q_pos, start + jnp.arange(bk), h), s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[pl.ds(start, bk), :]
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, l * correction + jnp.sum(p, axis=1)

  init = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _key_loop(st, qi * bq, qi * bq + bq - 1, h, bk, k_ref.shape[0], body, init)
  seen = m > NEG / 2
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) / LOG2E, -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static, grid: _Grid, group: int):
  bq, bk = st.blocks.dq_q, st.blocks.dq_k
  qi, h = grid.program(group)
  q, do = q_ref[...], do_ref[...]
  lse2, delta = lse_ref[...] * LOG2E, delta_ref[...]
  q_pos = qi * bq + jnp.arange(bq)
  scale2 = st.scale * LOG2E

  def body(kb, masked, dq):
    start = pl.multiple_of(kb * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    s = _dot(q, k, 1, 1) * scale2 - lse2[:, None]
    if masked:
      s = jnp.where(_mask(st, q_pos, start + jnp.arange(bk), h), s, -jnp.inf)
    p = jnp.exp2(s)
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  dq = _key_loop(st, qi * bq, qi * bq + bq - 1, h, bk, k_ref.shape[0], body,
                 jnp.zeros((bq, q.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: _Static, grid: _Grid,
                group: int):
  bq, bk = st.blocks.dkv_q, st.blocks.dkv_k
  ki, h = grid.program(group)
  k, v = k_ref[...], v_ref[...]
  k_pos = ki * bk + jnp.arange(bk)
  scale2 = st.scale * LOG2E

  def body(qb, masked, carry):
    dk, dv = carry
    start = pl.multiple_of(qb * bq, bq)
    q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
    lse2, delta = lse_ref[pl.ds(start, bq)] * LOG2E, delta_ref[pl.ds(start, bq)]
    s = _dot(q, k, 1, 1) * scale2 - lse2[:, None]
    if masked:
      s = jnp.where(_mask(st, start + jnp.arange(bq), k_pos, h), s, -jnp.inf)
    p = jnp.exp2(s)
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    dp = _dot(do, v, 1, 1)
    ds = (p * (dp - delta[:, None])).astype(q.dtype)
    return dk + _dot(ds, q, 0, 0), dv

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  carry = (zeros, zeros)
  ranges = st.pattern.query_block_ranges(ki * bk, ki * bk + bk - 1, h, bq, q_ref.shape[0] // bq, st.kv_length)
  for first, count, stride, masked in ranges:
    step = lambda n, c, first=first, stride=stride, masked=masked: body(first + n * stride, masked, c)
    carry = lax.fori_loop(0, count, step, carry)
  dk, dv = carry
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(warps, stages):
  return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _q_grid(st: _Static, n: int, b: int, hq: int) -> _Grid:
  return _Grid(n, b, hq, st.blocks.heavy_first, reverse=True)


def _forward(st: _Static, q, k, v):
  b, t, hq, d = q.shape
  s, group = k.shape[1], hq // k.shape[2]
  bq = st.blocks.fwd_q
  grid = _q_grid(st, t // bq, b, hq)
  q_tile = grid.spec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
  kv_full = grid.spec((None, s, None, d), lambda i, b_, h: (b_, 0, h // group, 0))
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, grid=grid, group=group),
      grid=grid.shape,
      in_specs=[q_tile, kv_full, kv_full],
      out_specs=[q_tile, grid.spec((None, None, bq), lambda i, b_, h: (b_, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
      compiler_params=_params(st.blocks.fwd_warps, st.blocks.fwd_stages),
      interpret=st.interpret, name="block_sparse_attention_fwd",
  )(q, k, v)
  return o, lse


def _backward(st: _Static, residuals, cotangents):
  q, k, v, o, lse = residuals
  do, dlse = cotangents
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  blocks = st.blocks
  # D - dlse: the lse cotangent shifts the per-row correction of dS = P∘(dP - D).
  delta = (jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
           - jnp.swapaxes(dlse.astype(jnp.float32), 1, 2))
  lse_rows = jnp.swapaxes(lse, 1, 2)

  grid = _q_grid(st, t // blocks.dq_q, b, hq)
  q_tile = grid.spec((None, blocks.dq_q, None, d), lambda i, b_, h: (b_, i, h, 0))
  kv_full = grid.spec((None, s, None, d), lambda i, b_, h: (b_, 0, h // group, 0))
  rows_tile = grid.spec((None, None, blocks.dq_q), lambda i, b_, h: (b_, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, grid=grid, group=group),
      grid=grid.shape,
      in_specs=[q_tile, kv_full, kv_full, q_tile, rows_tile, rows_tile],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(blocks.bwd_warps, blocks.bwd_stages),
      interpret=st.interpret, name="block_sparse_attention_dq",
  )(q, k, v, do, lse_rows, delta)

  # Key tiles in natural order: the first ones (causal, sink) have the longest loops.
  grid = _Grid(s // blocks.dkv_k, b, hq, blocks.heavy_first, reverse=False)
  q_full = grid.spec((None, t, None, d), lambda i, b_, h: (b_, 0, h, 0))
  rows_full = grid.spec((None, None, t), lambda i, b_, h: (b_, h, 0))
  kv_tile = grid.spec((None, blocks.dkv_k, None, d), lambda i, b_, h: (b_, i, h // group, 0))
  out_tile = grid.spec((None, blocks.dkv_k, None, d), lambda i, b_, h: (b_, i, h, 0))
  dkv_shape = jax.ShapeDtypeStruct((b, s, hq, d), k.dtype if group == 1 else jnp.float32)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, grid=grid, group=group),
      grid=grid.shape,
      in_specs=[q_full, kv_tile, kv_tile, q_full, rows_full, rows_full],
      out_specs=[out_tile, out_tile],
      out_shape=[dkv_shape, dkv_shape],
      compiler_params=_params(blocks.bwd_warps, blocks.bwd_stages),
      interpret=st.interpret, name="block_sparse_attention_dkv",
  )(q, k, v, do, lse_rows, delta)
  return dq, *_sum_group(dk, dv, k, v, group)


def _sum_group(dk, dv, k, v, group):
  """Per-query-head dK/dV [B, S, Hq, D] -> per-KV-head [B, S, Hkv, D] (a no-op without GQA)."""
  if group == 1:
    return dk, dv
  b, s, hkv, d = k.shape
  return (dk.reshape(b, s, hkv, group, d).sum(3).astype(k.dtype),
          dv.reshape(b, s, hkv, group, d).sum(3).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st, q, k, v):
  o, lse = _forward(st, q, k, v)
  return o, jnp.swapaxes(lse, 1, 2)


def _attend_fwd(st, q, k, v):
  o, lse = _forward(st, q, k, v)
  lse = jnp.swapaxes(lse, 1, 2)
  return (o, lse), (q, k, v, o, lse)


_attend.defvjp(_attend_fwd, _backward)


def check_supported(q, k, v, pattern: Pattern, blocks: BlockSizes) -> str | None:
  """Why this kernel cannot run these shapes (after the api's padding), or None if it can."""
  d = q.shape[-1]
  if d != k.shape[-1] or d != v.shape[-1]:
    return f"needs equal q/k/v head dims (got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]})"
  if d < 16 or d > 256 or d & (d - 1):
    return f"needs a power-of-two head dim in [16, 256] (got {d})"
  if q.shape[2] % k.shape[2]:
    return f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})"
  if isinstance(pattern, BlockSparse) and set(blocks.tiles) != {pattern.block}:
    return f"BlockSparse needs every tile equal to its block ({pattern.block}), got {blocks}"
  if isinstance(pattern, BlockSparse) and pattern.block < 16:
    return f"BlockSparse blocks below 16 do not fit tensor-core tiles (got {pattern.block})"
  return None


def pallas_attention(q, k, v, pattern: Pattern, *, scale: float | None = None, kv_length: int | None = None,
                     blocks: BlockSizes | None = None, interpret: bool = False):
  """(o [B, T, Hq, D], lse [B, T, Hq]) for T = S multiples of ``blocks.max_tile`` (keys >= kv_length masked)."""
  blocks = blocks or BlockSizes.for_pattern(pattern)
  problem = check_supported(q, k, v, pattern, blocks)
  if problem is None and (q.shape[1] != k.shape[1] or q.shape[1] % blocks.max_tile):
    problem = f"needs T = S, a multiple of {blocks.max_tile} (got T={q.shape[1]}, S={k.shape[1]})"
  if problem:
    raise ValueError(f"pallas_gpu attention: {problem}")
  st = _Static(pattern=pattern, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
               kv_length=k.shape[1] if kv_length is None else int(kv_length), blocks=blocks, interpret=interpret)
  return _attend(st, q, k, v)


def _unsupported(c: AttentionCall) -> str | None:
  if not on_gpu():
    return "needs a GPU backend (CPU tests call pallas_gpu.pallas_attention(..., interpret=True))"
  if not c.aligned:
    return "needs T = S and q_offset = 0"
  return check_supported(c.q, c.k, c.v, c.pattern, c.blocks or BlockSizes.for_pattern(c.pattern))


def _attend_call(c: AttentionCall):
  """Sequences are right-padded to the largest tile; padded keys are masked by ``kv_length``."""
  blocks = c.blocks or BlockSizes.for_pattern(c.pattern)
  n = c.q.shape[1]
  padded = -(-n // blocks.max_tile) * blocks.max_tile
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
  o, lse = pallas_attention(pad(c.q), pad(c.k), pad(c.v), c.pattern, scale=c.scale, kv_length=n, blocks=blocks)
  return o[:, :n], lse[:, :n]


IMPLEMENTATION = Implementation("pallas_gpu", _unsupported, _attend_call)
