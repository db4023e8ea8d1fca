"""The dispatching entry point: implementation order, fail-fast messages, pattern reductions to dense causal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from layers.kernels.attention import api, reference
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow


def _qkv(seed, t=24, hq=4, hkv=2, d=8):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (2, t, hq, d)), jax.random.normal(kk, (2, t, hkv, d)),
          jax.random.normal(kv, (2, t, hkv, d)))


def test_automatic_order_on_cpu():
  q, k, v = _qkv(5)
  call = lambda pattern, **kw: api.AttentionCall(q, k, v, pattern, None, 0, False, None)._replace(**kw)
  assert api.choose(call(Dense(True))) == "xla"  # short dense causal: one fused softmax
  assert api.choose(call(SinkWindow(0, 7))) == "xla"  # plain window: jax.nn.dot_product_attention's local window
  assert api.choose(call(SinkWindow(2, 7))) == "blockwise"  # sinks need a mask
  assert api.choose(call(Dense(True), return_lse=True)) == "blockwise"  # xla returns no logsumexp
  long_q = jnp.zeros((1, 4096, 1, 8))
  assert api.choose(call(Dense(True), q=long_q, k=long_q, v=long_q)) == "blockwise"  # T·S logits too many
  assert api.AUTOMATIC_ORDER == ("cudnn", "pallas_gpu", "xla", "blockwise", "reference")


@pytest.mark.parametrize("implementation", ["xla", "fusemax_3pass", "fusemax_2pass", "fusemax_1pass"])
@pytest.mark.parametrize("pattern", [Dense(True), SinkWindow(0, 6)], ids=repr)
def test_every_implementation_matches_the_reference(implementation, pattern):
  q, k, v = _qkv(6)
  o = jax.jit(lambda *a: api.attention(*a, pattern=pattern, implementation=implementation))(q, k, v)
  o_ref, _ = reference.attention_reference(q, k, v, pattern)
  print(implementation, pattern, "max |Δ|", float(jnp.max(jnp.abs(o - o_ref))))
  assert float(jnp.max(jnp.abs(o - o_ref))) <= 1e-5


def test_fusemax_cascades_run_any_pattern_and_return_lse():
  q, k, v = _qkv(7)
  p = BlockSparse(4, 2, 3)
  o, lse = api.attention(q, k, v, pattern=p, implementation="fusemax_1pass", return_lse=True)
  o_ref, lse_ref = reference.attention_reference(q, k, v, api.bind_heads(p, 4, 2))
  assert float(jnp.max(jnp.abs(o - o_ref))) <= 1e-5 and float(jnp.max(jnp.abs(lse - lse_ref))) <= 1e-5


def test_explicit_xla_refuses_what_it_cannot_express():
  q, k, v = _qkv(8)
  with pytest.raises(ValueError, match="'xla' expresses dense and sink-free window patterns only"):
    api.attention(q, k, v, pattern=SinkWindow(2, 5), implementation="xla")


def test_landing_on_the_reference_is_logged_once(caplog):
  q, k, v = _qkv(9)
  call = api.AttentionCall(q, k, v, "not a pattern", None, 0, False, None)  # nothing but the reference runs it
  with caplog.at_level("WARNING", logger="memlab"):
    assert api.choose(call) == api.choose(call) == "reference"
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and lines[0].startswith("attention runs the slower 'reference' implementation: cudnn needs")


def test_cpu_dispatch_uses_blockwise_and_matches_reference(caplog):
  q, k, v = _qkv(0)
  p = SinkWindow(2, 7)
  with caplog.at_level("WARNING", logger="memlab"):
    o, lse = jax.jit(lambda *a: api.attention(*a, pattern=p, return_lse=True))(q, k, v)
  assert not caplog.records  # no fallback to the O(T·S) reference on CPU
  o_ref, lse_ref = reference.attention_reference(q, k, v, p)
  assert float(jnp.max(jnp.abs(o - o_ref))) <= 1e-5 and float(jnp.max(jnp.abs(lse - lse_ref))) <= 1e-5


@pytest.mark.parametrize("implementation,message", [
    ("cudnn", "needs a GPU backend"), ("pallas_gpu", "needs a GPU backend"), ("flash", "must be None or one of")])
def test_explicit_implementation_fails_fast(implementation, message):
  q, k, v = _qkv(1)
  with pytest.raises(ValueError, match=message):
    api.attention(q, k, v, implementation=implementation)


def test_reference_implementation_on_request():
  q, k, v = _qkv(2)
  o = api.attention(q, k, v, pattern=Dense(False), implementation="reference")
  o_ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  assert float(jnp.max(jnp.abs(o - o_ref))) <= 1e-5


@pytest.mark.parametrize("pattern", [SinkWindow(3, 24), SinkWindow(0, 100), BlockSparse(4, 6, 5),
                                     BlockSparse(4, 1, 1), BlockSparse(4, 2, 3, num_dense_heads=2)], ids=repr)
def test_reductions_reproduce_dense_causal(pattern):
  """window >= N, all-local blocks, stride 1 and all-dense heads are exactly causal attention."""
  q, k, v = _qkv(3)
  run = jax.jit(lambda *a: (api.attention(*a, pattern=pattern, implementation="blockwise"),
                            api.attention(*a, pattern=Dense(True), implementation="reference")))
  o, o_causal = run(q, k, v)
  print(pattern, "max |Δ|", float(jnp.max(jnp.abs(o - o_causal))))
  assert float(jnp.max(jnp.abs(o - o_causal))) <= 1e-5


def test_bind_heads_sets_dkernel_step():
  p = api.bind_heads(BlockSparse(stride=8), 4, 2)
  assert (p.num_q_heads, p.num_kv_heads, p.resolved_step) == (4, 2, 2)
  with pytest.raises(ValueError, match="exceeds the KV heads"):
    api.bind_heads(BlockSparse(num_dense_heads=3), 4, 2)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_dispatch_never_calls_cudnn_window_without_causal():
  """jax #39576: cuDNN with a left window and is_causal=False attends to the future; we always pass causal."""
  q, k, v = [x.astype(jnp.bfloat16) for x in _qkv(4, t=256, hq=2, hkv=2, d=64)]
  o = api.attention(q, k, v, pattern=SinkWindow(0, 16), implementation="cudnn")
  o_ref, _ = reference.attention_reference(*[x.astype(jnp.float32) for x in (q, k, v)], SinkWindow(0, 16))
  assert float(jnp.max(jnp.abs(o.astype(jnp.float32) - o_ref))) <= 2e-2
