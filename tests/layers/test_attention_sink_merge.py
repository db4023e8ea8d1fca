"""Sink + window as a window pass merged with a sink pass (cudnn_sink_window): the algebra on CPU, cuDNN on GPU.

On CPU the window segment runs on the blockwise XLA backend, whose backward takes external (o, lse) exactly like
cuDNN's; so these tests check the merge and the merged-statistics backward that the GPU path relies on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from layers.kernels.attention import api, cudnn_sink_window
from layers.kernels.attention.patterns import SinkWindow
from layers.kernels.attention.reference import attention_reference


def _qkv(seed, t, hq=4, hkv=2, d=16, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, (2, t, h, d), dtype) for key, h in ((kq, hq), (kk, hkv), (kv, hkv)))


def _loss(o):
  return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape) * 0.37))


@pytest.mark.parametrize("pattern,t", [(SinkWindow(4, 9), 40), (SinkWindow(3, 7), 23), (SinkWindow(12, 5), 30),
                                       (SinkWindow(50, 6), 20), (SinkWindow(4, 40), 33), (SinkWindow(0, 8), 24)],
                         ids=repr)
def test_merged_values_and_grads_match_masked_reference(pattern, t):
  q, k, v = _qkv(t, t)
  fn = lambda *a: cudnn_sink_window.sink_window_attention(*a, pattern, backend="xla")
  ref = lambda *a: attention_reference(*a, pattern)[0]
  o, o_ref = jax.jit(fn)(q, k, v), ref(q, k, v)
  g = jax.jit(jax.grad(lambda *a: _loss(fn(*a)), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(lambda *a: _loss(ref(*a)), argnums=(0, 1, 2))(q, k, v)
  errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((o, *g), (o_ref, *g_ref))]
  print(pattern, "t", t, "max |Δ| o, dq, dk, dv:", errs)
  assert all(e <= 1e-5 for e in errs)


def test_merge_is_finite_under_large_logit_shifts():
  q, k, v = _qkv(7, 32)
  q = q * 300.0  # logits in the thousands: the segments' maxima differ by far more than exp's range (~88)
  o = cudnn_sink_window.sink_window_attention(q, k, v, SinkWindow(4, 8), backend="xla")
  o_ref = attention_reference(q, k, v, SinkWindow(4, 8))[0]
  err = float(jnp.max(jnp.abs(o - o_ref)))
  print("max |Δ| at logits ~1e3:", err)
  assert bool(jnp.isfinite(o).all()) and err <= 1e-4  # float32 logits of ~1e3 carry ~1e-4 rounding


def test_rejects_unknown_backend_and_shape_mismatch():
  q, k, v = _qkv(8, 16)
  with pytest.raises(ValueError, match="backend must be one of"):
    cudnn_sink_window.sink_window_attention(q, k, v, SinkWindow(2, 4), backend="flash")
  with pytest.raises(ValueError, match="needs T = S"):
    cudnn_sink_window.sink_window_attention(q[:, :8], k, v, SinkWindow(2, 4), backend="xla")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("pattern,t", [(SinkWindow(64, 256), 1024), (SinkWindow(3, 100), 777)], ids=repr)
def test_cudnn_sink_window_bf16_matches_reference(pattern, t):
  q, k, v = _qkv(t, t, hq=4, hkv=2, d=128, dtype=jnp.bfloat16)
  fn = lambda *a: api.attention(*a, pattern=pattern, implementation="cudnn")
  ref = lambda *a: attention_reference(*(x.astype(jnp.float32) for x in a), pattern)[0]
  o, o_ref = jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v)
  g = jax.jit(jax.grad(lambda *a: _loss(fn(*a)), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *a: _loss(ref(*a)), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip((o, *g), (o_ref, *g_ref)):
    rel = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    assert rel <= 2e-2, rel
