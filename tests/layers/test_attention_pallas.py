"""Pallas GPU block-sparse kernel in interpret mode on CPU (tiny shapes) vs the C4 reference; GPU-only checks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from layers.kernels.attention import reference
from layers.kernels.attention.api import attention, bind_heads
from layers.kernels.attention.pallas_gpu import BlockSizes, pallas_attention
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow

SMALL = BlockSizes(fwd_q=16, fwd_k=8, dkv_q=8, dkv_k=16, dq_q=16, dq_k=8)


def _qkv(seed, b=1, t=32, hq=2, hkv=1, d=16, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (b, t, hq, d), dtype), jax.random.normal(kk, (b, t, hkv, d), dtype),
          jax.random.normal(kv, (b, t, hkv, d), dtype))


def _loss(o, lse):
  return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.tanh(lse), 0.0))


def _err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


@pytest.mark.parametrize("pattern,blocks,kv_length", [
    (Dense(True), SMALL, 32),
    (Dense(False), SMALL, 27),  # keys >= 27 are padding
    (SinkWindow(5, 12), SMALL, 32),
    (BlockSparse(16, 1, 2, num_q_heads=2, num_kv_heads=1), None, 32),
    (SinkWindow(3, 9), dataclasses.replace(SMALL, heavy_first=False), 32),  # natural launch order
], ids=repr)
def test_pallas_interpret_values_and_grads(pattern, blocks, kv_length):
  q, k, v = _qkv(0)
  fn = lambda q, k, v: pallas_attention(q, k, v, pattern, kv_length=kv_length, blocks=blocks, interpret=True)
  ref = lambda q, k, v: reference.attention_reference(q, k[:, :kv_length], v[:, :kv_length], pattern)
  (o, lse), (o_ref, lse_ref) = fn(q, k, v), ref(q, k, v)
  print(pattern, "max |Δo|", _err(o, o_ref), "max |Δlse|", _err(lse, lse_ref))
  assert _err(o, o_ref) <= 1e-5 and _err(lse, lse_ref) <= 1e-5
  g = jax.grad(lambda *a: _loss(*fn(*a)), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: _loss(*ref(*a)), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    print(f"max |Δd{name}|", _err(a, b))
    assert _err(a, b) <= 1e-5


def test_pallas_interpret_rows_without_visible_keys():
  """Every key is padding (kv_length = 0): o = 0, lse = -inf, gradients zero and finite."""
  q, k, v = _qkv(4, t=16)
  blocks = BlockSizes(fwd_q=8, fwd_k=8, dkv_q=8, dkv_k=8, dq_q=8, dq_k=8)
  fn = lambda q, k, v: pallas_attention(q, k, v, Dense(False), kv_length=0, blocks=blocks, interpret=True)
  o, lse = fn(q, k, v)
  assert float(jnp.max(jnp.abs(o))) == 0.0 and bool(jnp.all(lse == -jnp.inf))
  g = jax.grad(lambda *a: _loss(*fn(*a)), argnums=(0, 1, 2))(q, k, v)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)


def test_pallas_interpret_bf16_tolerances():
  q, k, v = _qkv(1, dtype=jnp.bfloat16)
  p = SinkWindow(3, 9)
  o, _ = pallas_attention(q, k, v, p, blocks=SMALL, interpret=True)
  o_ref, _ = reference.attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), p)
  print("bf16 max |Δo|", _err(o, o_ref))
  assert o.dtype == jnp.bfloat16 and _err(o, o_ref) <= 2e-2


def test_pallas_rejects_unsupported_shapes_with_reason():
  q, k, v = _qkv(2, d=24)
  with pytest.raises(ValueError, match="power-of-two head dim"):
    pallas_attention(q, k, v, Dense(True), blocks=SMALL, interpret=True)
  q, k, v = _qkv(2)
  with pytest.raises(ValueError, match="every tile equal to its block"):
    pallas_attention(q, k, v, BlockSparse(16, 1, 2), blocks=SMALL, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("pattern", [Dense(True), SinkWindow(64, 256), BlockSparse(64, 4, 4)], ids=repr)
def test_pallas_gpu_bf16_matches_reference(pattern):
  q, k, v = _qkv(3, b=2, t=1000, hq=4, hkv=2, d=128, dtype=jnp.bfloat16)
  o = attention(q, k, v, pattern=pattern, implementation="pallas_gpu")
  f32 = lambda x: x.astype(jnp.float32)
  o_ref, _ = reference.attention_reference(f32(q), f32(k), f32(v), bind_heads(pattern, 4, 2))
  assert _err(o, o_ref) <= 2e-2
