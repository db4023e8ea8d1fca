"""Blockwise XLA attention (scan over visible tiles + recomputing custom_vjp) vs the C4 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels.attention import masks, reference
from layers.kernels.attention.blockwise import blockwise_attention
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow


def _qkv(seed, b=2, t=29, s=29, hq=4, hkv=2, e=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (b, t, hq, e), dtype), jax.random.normal(kk, (b, s, hkv, e), dtype),
          jax.random.normal(kv, (b, s, hkv, e), dtype))


def _loss(o, lse):
  # Uses lse too, so the dlse path of the custom VJP is exercised.
  return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.tanh(lse), 0.0))


def _err(a, b):
  return float(jnp.max(jnp.abs(a - b)))


CASES = [
    (Dense(True), 0, 8), (Dense(False), 0, 8), (SinkWindow(3, 6), 0, 8), (SinkWindow(0, 4), 5, 4),
    (BlockSparse(4, 2, 3, num_q_heads=4, num_kv_heads=2), 0, 8),
    (BlockSparse(4, 1, 2, num_dense_heads=1, num_q_heads=4, num_kv_heads=2), 8, 4),
]


@pytest.mark.parametrize("pattern,q_offset,block", CASES, ids=lambda c: repr(c))
def test_blockwise_values_and_grads_match_reference(pattern, q_offset, block):
  q, k, v = _qkv(0, t=29 - q_offset)  # ragged: 29 is no multiple of the tile
  fn = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, pattern, q_offset=q_offset, block_q=block,
                                                   block_k=block))
  ref = jax.jit(lambda q, k, v: reference.attention_reference(q, k, v, pattern, q_offset=q_offset))
  (o, lse), (o_ref, lse_ref) = fn(q, k, v), ref(q, k, v)
  print(pattern, "max |Δo|", _err(o, o_ref), "max |Δlse|", _err(lse, lse_ref))
  assert _err(o, o_ref) <= 1e-5 and _err(lse, lse_ref) <= 1e-5
  g = jax.jit(jax.grad(lambda *a: _loss(*fn(*a)), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *a: _loss(*ref(*a)), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    print(f"max |Δd{name}|", _err(a, b))
    assert _err(a, b) <= 1e-5


def test_blockwise_float64_to_1e12():
  with jax.enable_x64(True):
    q, k, v = _qkv(1, dtype=jnp.float64)
    p = SinkWindow(2, 9)
    o, lse = jax.jit(lambda *a: blockwise_attention(*a, p, block_q=8, block_k=8))(q, k, v)
    o_ref, lse_ref = reference.attention_reference(q, k, v, p)
    assert o.dtype == jnp.float64 and _err(o, o_ref) < 1e-12 and _err(lse, lse_ref) < 1e-12


@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_blockwise_large_logits(shift):
  """Keys with a huge common component: logits ~±1e4 after scaling; finite and equal to the reference."""
  q, k, v = _qkv(2)
  q = q.at[..., 0].set(jnp.abs(shift) ** 0.5 * np.sqrt(8))
  k = k.at[..., 0].set(np.sign(shift) * abs(shift) ** 0.5)
  fn = jax.jit(lambda *a: blockwise_attention(*a, Dense(True), block_q=8, block_k=8))
  o, lse = fn(q, k, v)
  o_ref, lse_ref = reference.attention_reference(q, k, v, Dense(True))
  assert bool(jnp.isfinite(o).all()) and bool(jnp.isfinite(lse).all())
  assert _err(o, o_ref) <= 2e-3 and _err(lse, lse_ref) <= 1e-2


def test_blockwise_rows_without_visible_keys():
  """q_offset = -3 (queries before every key under causality) leaves the first rows empty: 0, -inf, no NaN."""
  q, k, v = _qkv(3, t=10, s=13)
  fn = jax.jit(lambda *a: blockwise_attention(*a, Dense(True), q_offset=-3, block_q=4, block_k=4))
  o, lse = fn(q, k, v)
  o_ref, lse_ref = reference.attention_reference(q, k, v, Dense(True), q_offset=-3)
  assert float(jnp.max(jnp.abs(o[:, :3]))) == 0.0 and bool(jnp.all(lse[:, :3] == -jnp.inf))
  assert _err(o, o_ref) <= 1e-5
  g = jax.grad(lambda *a: _loss(*fn(*a)), argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.isfinite(x).all()) for x in g) and float(jnp.max(jnp.abs(g[0][:, :3]))) == 0.0


def test_blockwise_skips_empty_tiles():
  """Sink + window visits O(1) tiles per query tile, independent of N (real FLOP savings, not a mask)."""
  cls = masks.block_classes(SinkWindow(64, 256), 4096, 4096, 128, 128)
  index, _ = masks.visit_lists(cls)
  assert index.shape[-1] == 4  # sink tile + 2 window tiles + the diagonal, of 32 tiles


def test_blockwise_memory_grows_linearly():
  """Peak temp memory of forward+backward at N = 4K, 8K, 16K (compile only): linear, far below N² logits."""
  sizes = {}
  for n in (4096, 8192, 16384):
    x = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, Dense(True), block_q=512,
                                                                       block_k=512)[0]), argnums=(0, 1, 2)))
    sizes[n] = grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
  print("temp bytes", sizes)
  assert sizes[16384] <= 2.5 * sizes[8192] and sizes[8192] <= 2.5 * sizes[4096]
  assert sizes[16384] < 16384 ** 2 * 4 / 8  # an N² fp32 logit matrix would be 1 GiB
