"""Blockwise 1-pass attention in plain XLA: a ``lax.scan`` over visible key tiles with a recomputing ``custom_vjp``.

The forward pass is FuseMax's 1-pass cascade (C5, arXiv 2406.10491) = FlashAttention-2's forward ("FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691) run for all query tiles at once:
scan step n visits, for every (KV head, query tile), its n-th non-empty key tile from the pattern's block map
(``masks.visit_lists``), so EMPTY tiles cost neither FLOPs nor memory. Only (o, lse) are saved; the backward pass
recomputes P = exp(s·QKᵀ - lse) tile by tile (5 einsums) and scatter-adds dK, dV into their key tiles. Memory is
O(B·H·T·(F + block_k)), linear in sequence length, on CPU, GPU and TPU alike.

q [B, T, Hq, E], k [B, S, Hkv, E], v [B, S, Hkv, F] -> (o [B, T, Hq, F] in q's dtype, lse [B, T, Hq] float32,
float64 for float64 inputs).
lse is differentiable: its cotangent enters as dS = P∘(dP - (D - dlse)), so segment merges can be trained.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels.attention.call import AttentionCall, Implementation
from layers.kernels.attention.fusemax import NEG
from layers.kernels.attention.masks import block_classes, visit_lists
from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow


@dataclasses.dataclass(frozen=True)
class _Plan:
  pattern: Pattern
  scale: float
  q_offset: int
  block_q: int
  block_k: int
  num_queries: int
  num_keys: int
  num_kv_heads: int

  @property
  def nq(self) -> int:
    return -(-self.num_queries // self.block_q)

  @property
  def nk(self) -> int:
    return -(-self.num_keys // self.block_k)


@functools.lru_cache(maxsize=64)
def _visits(plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
  classes = block_classes(plan.pattern, plan.nq * plan.block_q, plan.nk * plan.block_k, plan.block_q,
                          plan.block_k, plan.num_kv_heads, plan.q_offset, kv_length=plan.num_keys)
  index, valid = visit_lists(classes)
  # Scan over n: [n_max, Hp, nq].
  return np.moveaxis(index, -1, 0), np.moveaxis(valid, -1, 0)


def _tiles(plan: _Plan, q, k, v):
  """Padded, tiled operands: q [B, Hkv, G, nq, bq, E]; k [B, Hkv, nk, bk, E]; v [B, Hkv, nk, bk, F]."""
  b, t, hq, e = q.shape
  hkv = k.shape[2]
  q = jnp.pad(q, ((0, 0), (0, plan.nq * plan.block_q - t), (0, 0), (0, 0)))
  q = q.reshape(b, plan.nq, plan.block_q, hkv, hq // hkv, e).transpose(0, 3, 4, 1, 2, 5)
  pad_k = ((0, 0), (0, plan.nk * plan.block_k - k.shape[1]), (0, 0), (0, 0))
  kv_tiles = lambda x: jnp.pad(x, pad_k).reshape(b, plan.nk, plan.block_k, hkv, -1).transpose(0, 3, 1, 2, 4)
  return q, kv_tiles(k), kv_tiles(v)


def _untile_q(plan: _Plan, x):
  """[B, Hkv, G, nq, bq, ...] -> [B, T, Hkv·G, ...]."""
  b, hkv, g = x.shape[:3]
  x = jnp.moveaxis(x.reshape(b, hkv, g, plan.nq * plan.block_q, *x.shape[5:]), 3, 1)
  return x[:, :plan.num_queries].reshape(b, plan.num_queries, hkv * g, *x.shape[4:])


def _to_q_tiles(plan: _Plan, x, hkv):
  """[B, T, Hq, ...] -> [B, Hkv, G, nq, bq, ...] (inverse of ``_untile_q``; pads with zeros)."""
  b, t, hq = x.shape[:3]
  x = jnp.pad(x, ((0, 0), (0, plan.nq * plan.block_q - t)) + ((0, 0),) * (x.ndim - 2))
  x = x.reshape(b, plan.nq, plan.block_q, hkv, hq // hkv, *x.shape[3:])
  return x.transpose(0, 3, 4, 1, 2, *range(5, x.ndim))


def _step_tiles(plan: _Plan, kt, vt, index_n, valid_n):
  """Gather the n-th visited key tile per (KV head, query tile) and its element mask [1, Hkv, 1, nq, bq, bk]."""
  hkv = kt.shape[1]
  heads = np.arange(hkv)[:, None]
  kb = jnp.broadcast_to(index_n, (hkv, plan.nq))
  kblk, vblk = kt[:, heads, kb], vt[:, heads, kb]  # [B, Hkv, nq, bk, E|F]
  i = plan.q_offset + (np.arange(plan.nq)[:, None] * plan.block_q + np.arange(plan.block_q))[:, :, None]
  j = (index_n * plan.block_k)[:, :, None, None] + np.arange(plan.block_k)
  h = np.arange(index_n.shape[0])[:, None, None, None]
  mask = plan.pattern.allowed(i, j, h) & (j < plan.num_keys) & valid_n[:, :, None, None]
  return kblk, vblk, mask[None, :, None]


def _logits(plan: _Plan, qt, kblk, mask, acc_dtype):
  s = jnp.einsum("bhgqpe,bhqce->bhgqpc", qt, kblk, preferred_element_type=acc_dtype) * plan.scale
  return jnp.where(mask, s, NEG)


def _forward(plan: _Plan, q, k, v):
  qt, kt, vt = _tiles(plan, q, k, v)
  index, valid = _visits(plan)
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

  def step(carry, xs):
    m, l, acc = carry
    kblk, vblk, mask = _step_tiles(plan, kt, vt, *xs)
    s = _logits(plan, qt, kblk, mask, acc_dtype)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    pv = jnp.einsum("bhgqpc,bhqcf->bhgqpf", p.astype(v.dtype), vblk, preferred_element_type=acc_dtype)
    return (m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv), None

  shape = qt.shape[:-1]
  init = (jnp.full(shape, -jnp.inf, acc_dtype), jnp.zeros(shape, acc_dtype),
          jnp.zeros(shape + (v.shape[-1],), acc_dtype))
  (m, l, acc), _ = lax.scan(step, init, (jnp.asarray(index), jnp.asarray(valid)))
  seen = m > NEG / 2  # a row that met any visible key has a real logit as running max
  o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  return _untile_q(plan, o).astype(q.dtype), _untile_q(plan, lse)


def _backward(plan: _Plan, residuals, cotangents):
  q, k, v, o, lse = residuals
  do, dlse = cotangents
  hkv = k.shape[2]
  qt, kt, vt = _tiles(plan, q, k, v)
  index, valid = _visits(plan)
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
  delta = jnp.sum(do.astype(acc_dtype) * o.astype(acc_dtype), axis=-1) - dlse.astype(acc_dtype)
  do_t = _to_q_tiles(plan, do, hkv)
  lse_t, delta_t = _to_q_tiles(plan, lse.astype(acc_dtype), hkv), _to_q_tiles(plan, delta, hkv)
  heads = np.arange(hkv)[:, None]

  def step(carry, xs):
    dq, dk, dv = carry
    kblk, vblk, mask = _step_tiles(plan, kt, vt, *xs)
    s = _logits(plan, qt, kblk, mask, acc_dtype)
    p = jnp.exp(jnp.where(mask, s - lse_t[..., None], -jnp.inf))
    dv_tile = jnp.einsum("bhgqpc,bhgqpf->bhqcf", p.astype(do.dtype), do_t, preferred_element_type=acc_dtype)
    dp = jnp.einsum("bhgqpf,bhqcf->bhgqpc", do_t, vblk, preferred_element_type=acc_dtype)
    ds = (p * (dp - delta_t[..., None])).astype(q.dtype)
    dq = dq + plan.scale * jnp.einsum("bhgqpc,bhqce->bhgqpe", ds, kblk, preferred_element_type=acc_dtype)
    dk_tile = plan.scale * jnp.einsum("bhgqpc,bhgqpe->bhqce", ds, qt, preferred_element_type=acc_dtype)
    kb = jnp.broadcast_to(xs[0], (hkv, plan.nq))
    return (dq, dk.at[:, heads, kb].add(dk_tile), dv.at[:, heads, kb].add(dv_tile)), None

  init = (jnp.zeros(qt.shape, acc_dtype), jnp.zeros(kt.shape, acc_dtype), jnp.zeros(vt.shape, acc_dtype))
  (dq, dk, dv), _ = lax.scan(step, init, (jnp.asarray(index), jnp.asarray(valid)))
  untile_k = lambda x, like: x.transpose(0, 2, 3, 1, 4).reshape(
      x.shape[0], -1, hkv, x.shape[-1])[:, :like.shape[1]].astype(like.dtype)
  return _untile_q(plan, dq).astype(q.dtype), untile_k(dk, k), untile_k(dv, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, k, v):
  return _forward(plan, q, k, v)


def _attend_fwd(plan, q, k, v):
  o, lse = _forward(plan, q, k, v)
  return (o, lse), (q, k, v, o, lse)


_attend.defvjp(_attend_fwd, _backward)


def default_block(pattern: Pattern, length: int, target: int = 256) -> int:
  """A tile size: ``target`` (a multiple of the pattern block for BlockSparse), shrunk for short sequences."""
  unit = pattern.block if isinstance(pattern, BlockSparse) else 8
  tile = max(unit, target // unit * unit)
  return min(tile, -(-length // unit) * unit)


def blockwise_attention(q, k, v, pattern: Pattern, *, scale: float | None = None, q_offset: int = 0,
                        block_q: int | None = None, block_k: int | None = None):
  """Exact (o [B, T, Hq, F], lse [B, T, Hq]) with O(T·block) memory; differentiable in q, k, v and lse.

  Any T, S (ragged last tiles are masked), GQA, ``q_offset`` = absolute position of query 0 (e.g. S - T).
  BlockSparse patterns need tiles that are multiples of the pattern block.
  """
  return _attend(_plan(q, k, pattern, scale, q_offset, block_q, block_k), q, k, v)


def attention_backward(q, k, v, o, lse, do, pattern: Pattern, *, scale: float | None = None, q_offset: int = 0):
  """(dq, dk, dv) of the keys ``pattern`` admits, given the output o and logsumexp lse of the WHOLE attention.

  FlashAttention-2's backward with external (o, lse): P = exp(s·QKᵀ - lse) on the admitted keys and
  dS = P∘(dO·Vᵀ - rowsum(dO∘o)). When ``pattern`` is one of several disjoint key segments whose results were
  merged (``fusemax.merge``), passing the merged o and lse gives exactly that segment's share of the gradient.
  """
  plan = _plan(q, k, pattern, scale, q_offset, None, None)
  return _backward(plan, (q, k, v, o, lse), (do, jnp.zeros_like(lse)))


def _plan(q, k, pattern, scale, q_offset, block_q, block_k) -> _Plan:
  hq, hkv = q.shape[2], k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
  if (block_q is not None and block_q < 1) or (block_k is not None and block_k < 1):
    raise ValueError(f"block sizes must be positive (got block_q={block_q}, block_k={block_k})")
  return _Plan(pattern=pattern, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
               q_offset=int(q_offset),
               block_q=block_q if block_q is not None else default_block(pattern, q.shape[1]),
               block_k=block_k if block_k is not None else default_block(pattern, k.shape[1]), num_queries=q.shape[1],
               num_keys=k.shape[1], num_kv_heads=hkv)


def _unsupported(c: AttentionCall) -> str | None:
  return None if isinstance(c.pattern, (Dense, SinkWindow, BlockSparse)) else f"unknown pattern {c.pattern!r}"


IMPLEMENTATION = Implementation(
    "blockwise", _unsupported,
    lambda c: blockwise_attention(c.q, c.k, c.v, c.pattern, scale=c.scale, q_offset=c.q_offset))
