"""KV caches that hold exactly the keys a (sparse) attention layer can still see.

LongGen ("A Little Goes a Long Way", arXiv 2410.01485) keeps full attention in the middle third of the layers and
a KV-reduced pattern elsewhere, so decoding stores, per sparse layer, only the tokens visible to the current query:

* ``Dense`` (full layers): every token, slot = position; ``max_length`` slots.
* ``SinkWindow(S, W)``: sink tokens j < S in slots [0, S), the window in a ring buffer: slot S + (j - S) mod W;
  after query t the cache holds {0..S-1} ∪ {t-W+1..t}, ``min(t + 1, S + W)`` tokens, O(1) in sequence length.
* ``BlockSparse`` (per KV head h): the last L blocks in a ring of L·b slots (slot j mod L·b), and every strided
  block (kb ≡ r_h mod s) older than the ring in a strided region (slot L·b + ((kb - r_h) // s)·b + j mod b) of
  ⌈max_length / (b·s)⌉·b slots. The stride is absolute, so a key invisible to query t stays invisible later and
  dropping it is exact.

The cache is rebuilt after each chunk by scattering the kept (old ∪ new) tokens to these canonical slots; empty
slots have position -1. Shapes: k, v [B, Hkv, n_slots, D]; positions int32 [Hkv, n_slots]; next position scalar.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow
from research.models.cache import DecodeCache


class KVCache(DecodeCache):
  """Decode-time keys/values and their positions (``nnx.split(model, nnx.Param, KVCache, ...)`` separates them)."""


def num_slots(pattern: Pattern, max_length: int) -> int:
  """Cache slots per KV head for sequences of up to ``max_length`` tokens."""
  if isinstance(pattern, Dense):
    return max_length
  if isinstance(pattern, SinkWindow):
    return min(pattern.sink + pattern.window, max_length)
  return (pattern.local_blocks + math.ceil(max_length / (pattern.block * pattern.stride))) * pattern.block


def check_cacheable(pattern: Pattern) -> None:
  """Raise ValueError for patterns whose visible set is not a bounded, evictable set of slots."""
  if isinstance(pattern, Dense) and not pattern.causal:
    raise ValueError("a KV cache needs a causal pattern (Dense(causal=False) sees future tokens)")
  if isinstance(pattern, BlockSparse) and pattern.num_dense_heads:
    raise ValueError("BlockSparse caches keep one slot layout for every head; num_dense_heads must be 0 "
                     f"(got {pattern.num_dense_heads})")


def canonical_slots(pattern: Pattern, positions, last, heads):
  """Slot of each kept token (inside ``num_slots``). positions int [Hkv, n] >= 0; last = newest position;
  heads [Hkv, 1]. Kept tokens never share a slot: the window/ring holds the newest W (L·b) positions."""
  if isinstance(pattern, Dense):
    return positions
  if isinstance(pattern, SinkWindow):
    return jnp.where(positions < pattern.sink, positions, pattern.sink + (positions - pattern.sink) % pattern.window)
  b, local, s = pattern.block, pattern.local_blocks, pattern.stride
  kb = positions // b
  strided = local * b + ((kb - pattern._residue(heads)) // s) * b + positions % b
  return jnp.where(kb > last // b - local, positions % (local * b), strided)


def init(pattern: Pattern, batch: int, num_kv_heads: int, head_dim: int, max_length: int, dtype) -> nnx.Dict:
  """An empty cache: zero k/v, positions -1, next position 0."""
  check_cacheable(pattern)
  n = num_slots(pattern, max_length)
  return nnx.Dict(k=KVCache(jnp.zeros((batch, num_kv_heads, n, head_dim), dtype)),
                  v=KVCache(jnp.zeros((batch, num_kv_heads, n, head_dim), dtype)),
                  positions=KVCache(jnp.full((num_kv_heads, n), -1, jnp.int32)),
                  next_position=KVCache(jnp.zeros((), jnp.int32)))


def visible_mask(pattern: Pattern, query_positions, key_positions):
  """bool [Hkv, T, n]: query t may see cached key n of head h (empty slots, position -1, never)."""
  heads = np.arange(key_positions.shape[0])[:, None, None]
  j = key_positions[:, None, :]
  return (j >= 0) & pattern.allowed(query_positions[None, :, None], jnp.maximum(j, 0), heads)


def update(pattern: Pattern, cache: nnx.Dict, k_all, v_all, positions_all) -> None:
  """Keep the tokens of (old cache ∪ chunk) visible to the chunk's last query, each in its canonical slot.

  k_all, v_all [B, Hkv, n, D] and positions_all int [Hkv, n] (-1 = empty) hold the old slots then the new tokens.
  """
  hkv, n_slots = cache["positions"].shape
  heads = np.arange(hkv)[:, None]
  last = cache["next_position"][...] - 1
  keep = (positions_all >= 0) & pattern.allowed(last, jnp.maximum(positions_all, 0), heads)
  slot = jnp.where(keep, canonical_slots(pattern, jnp.maximum(positions_all, 0), last, heads), n_slots)
  cache["k"][...] = jnp.zeros_like(cache["k"][...]).at[:, heads, slot].set(k_all, mode="drop")
  cache["v"][...] = jnp.zeros_like(cache["v"][...]).at[:, heads, slot].set(v_all, mode="drop")
  cache["positions"][...] = jnp.full((hkv, n_slots), -1, jnp.int32).at[heads, slot].set(
      positions_all.astype(jnp.int32), mode="drop")


def cached_count(cache: nnx.Dict) -> jax.Array:
  """Tokens held per KV head, int [Hkv]."""
  return jnp.sum(cache["positions"][...] >= 0, axis=-1)
