"""Masks of a pattern: the dense [H, T, S] reference mask, block-level maps and exact visible-pair counts.

Block maps classify every (query tile, key tile) as EMPTY (skipped), PARTIAL (element mask needed) or FULL, and
turn into per-tile visit lists so that execution touches only visible tiles: the FLOPs and memory saved are real,
not a dense mask. Counts are the closed forms of the attention spec (§3.4), used for FLOP accounting.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow, head_pattern_count

EMPTY, PARTIAL, FULL = 0, 1, 2


def dense_mask(pattern: Pattern, num_queries: int, num_keys: int, num_kv_heads: int = 1, q_offset: int = 0,
               kv_length: int | None = None) -> np.ndarray:
  """bool [Hp, T, S] (Hp = 1 if the pattern is head independent): query q_offset + t may see key s."""
  heads = np.arange(head_pattern_count(pattern, num_kv_heads))[:, None, None]
  i = q_offset + np.arange(num_queries)[None, :, None]
  j = np.arange(num_keys)[None, None, :]
  mask = np.broadcast_to(pattern.allowed(i, j, heads), (heads.shape[0], num_queries, num_keys))
  if kv_length is not None:
    mask = mask & (j < kv_length)
  return np.array(mask)


def traced_mask(pattern: Pattern, num_queries: int, num_keys: int, num_kv_heads: int = 1, q_offset: int = 0):
  """:func:`dense_mask` built from iotas inside the computation (a numpy constant XLA would fold at compile time)."""
  heads = jnp.arange(head_pattern_count(pattern, num_kv_heads))[:, None, None]
  i = q_offset + jnp.arange(num_queries)[None, :, None]
  j = jnp.arange(num_keys)[None, None, :]
  return jnp.broadcast_to(pattern.allowed(i, j, heads), (heads.shape[0], num_queries, num_keys))


def block_classes(pattern: Pattern, num_queries: int, num_keys: int, block_q: int, block_k: int,
                  num_kv_heads: int = 1, q_offset: int = 0, kv_length: int | None = None) -> np.ndarray:
  """int8 [Hp, ceil(T/block_q), ceil(S/block_k)] in {EMPTY, PARTIAL, FULL}, computed without a dense mask.

  ``kv_length`` (default ``num_keys``) marks keys at or beyond it as padding.
  """
  kv_length = num_keys if kv_length is None else kv_length
  nq, nk = -(-num_queries // block_q), -(-num_keys // block_k)
  hp = head_pattern_count(pattern, num_kv_heads)
  if isinstance(pattern, BlockSparse):
    any_, all_ = _block_sparse_any_all(pattern, nq, nk, block_q, block_k, hp, q_offset)
  else:
    q_lo = q_offset + np.arange(nq)[:, None] * block_q
    k_lo = np.arange(nk)[None, :] * block_k
    any_, all_ = pattern.tile_any_all(q_lo, q_lo + block_q - 1, k_lo, k_lo + block_k - 1)
    any_, all_ = np.broadcast_to(any_, (hp, nq, nk)), np.broadcast_to(all_, (hp, nq, nk))
  k_lo = np.arange(nk) * block_k
  any_ = any_ & (k_lo < kv_length)
  all_ = all_ & (k_lo + block_k <= kv_length)
  return np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)


def _block_sparse_any_all(pattern: BlockSparse, nq, nk, block_q, block_k, hp, q_offset):
  b = pattern.block
  if block_q % b or block_k % b or q_offset % b:
    raise ValueError(f"BlockSparse tiles and q_offset must be multiples of block={b} "
                     f"(got block_q={block_q}, block_k={block_k}, q_offset={q_offset})")
  fq, fk = block_q // b, block_k // b
  qb0 = q_offset // b
  n = max(qb0 + nq * fq, nk * fk)
  grid = pattern.block_grid(n, np.arange(hp))[:, qb0:qb0 + nq * fq, :nk * fk]
  grid = grid.reshape(hp, nq, fq, nk, fk)
  return grid.max(axis=(2, 4)) > EMPTY, grid.min(axis=(2, 4)) == FULL


def visit_lists(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per (head, query tile), the non-empty key tiles in order, padded to the longest row.

  Returns (index int32 [Hp, nq, n_max], valid bool [Hp, nq, n_max]); padding points at tile 0 with valid False.
  """
  nonempty = classes != EMPTY
  n_max = max(int(nonempty.sum(-1).max()), 1)
  order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :n_max]
  valid = np.take_along_axis(nonempty, order, axis=-1)
  return np.where(valid, order, 0).astype(np.int32), valid


def row_counts(pattern: Pattern, num_queries: int, h: int = 0) -> np.ndarray:
  """Exact visible keys per query row (closed forms, §3.4) for T = S = num_queries, int64 [T]."""
  i = np.arange(num_queries, dtype=np.int64)
  if isinstance(pattern, Dense):
    return i + 1 if pattern.causal else np.full_like(i, num_queries)
  if isinstance(pattern, SinkWindow):
    return np.minimum(i + 1, pattern.sink + pattern.window)
  b, local, s = pattern.block, pattern.local_blocks, pattern.stride
  qb = i // b
  if pattern._dense_head(h):
    return i + 1
  r = pattern._residue(h)
  strided = np.maximum(0, np.floor_divide(qb - local - r, s) + 1)
  return (np.minimum(local, qb + 1) - 1) * b + (i % b) + 1 + b * strided


def visible_pairs(pattern: Pattern, num_queries: int, num_kv_heads: int = 1) -> int:
  """Sum over KV heads of the visible (query, key) pairs at T = S = num_queries (each head counted once)."""
  hp = head_pattern_count(pattern, num_kv_heads)
  per_head = [int(row_counts(pattern, num_queries, h).sum()) for h in range(hp)]
  return sum(per_head) * (num_kv_heads // hp)
