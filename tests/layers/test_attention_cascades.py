"""FuseMax einsum cascades vs the naive softmax oracle (attention spec §7 oracles 1-9)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels.attention import fusemax, masks, reference
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow

STABLE = ("three_pass", "two_pass", "one_pass")


def _qkv(seed, b=2, t=23, s=23, hq=4, hkv=2, e=8, f=8, dtype=jnp.float32, logit_scale=1.0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, t, hq, e), dtype) * logit_scale
  return q, jax.random.normal(kk, (b, s, hkv, e), dtype), jax.random.normal(kv, (b, s, hkv, f), dtype)


def _err(a, b):
  return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("pattern", [Dense(True), Dense(False), SinkWindow(2, 5),
                                     BlockSparse(3, 2, 2, num_q_heads=4, num_kv_heads=2)], ids=repr)
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_cascades_match_softmax_oracle(pattern, logit_scale):
  q, k, v = _qkv(1, logit_scale=logit_scale)
  mask = masks.dense_mask(pattern, 23, 23, 2)

  @jax.jit
  def run(q, k, v):
    # block_k=5: 23 % 5 != 0, so the last key tile is ragged (padded and masked).
    return [fusemax.CASCADES[n](q, k, v, mask, **({} if n == "three_pass" else {"block_k": 5})) for n in STABLE]

  o_ref, lse_ref = jax.jit(fusemax.dot_product_softmax)(q, k, v, mask)
  for name, (o, lse) in zip(STABLE, run(q, k, v)):
    print(name, pattern, "max |Δo|", _err(o, o_ref), "max |Δlse|", _err(lse, lse_ref))
    assert _err(o, o_ref) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(o_ref))))
    assert _err(lse, lse_ref) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(lse_ref))))


def test_base2_one_pass_equals_natural():
  q, k, v = _qkv(2)
  o, lse = jax.jit(lambda *a: fusemax.one_pass(*a, block_k=4))(q, k, v)
  o2, lse2 = jax.jit(lambda *a: fusemax.one_pass(*a, block_k=4, base2=True))(q, k, v)
  assert _err(o, o2) < 1e-6 and _err(lse, lse2) < 1e-5


def test_float64_cascades_agree_to_1e12():
  with jax.enable_x64(True):
    q, k, v = _qkv(3, dtype=jnp.float64, logit_scale=30.0)
    mask = masks.dense_mask(SinkWindow(2, 7), 23, 23)
    o_ref, lse_ref = fusemax.dot_product_softmax(q, k, v, mask)
    for name in STABLE:
      o, lse = jax.jit(lambda *a, n=name: fusemax.CASCADES[n](*a, mask))(q, k, v)
      assert o.dtype == jnp.float64
      print(name, "f64 max |Δo|", _err(o, o_ref))
      assert _err(o, o_ref) < 1e-12 and _err(lse, lse_ref) < 1e-12


@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_large_logit_shift_is_finite_and_exact(shift):
  """A constant added to every logit (an extra key dimension with q·k = shift) leaves attention unchanged."""
  q, k, v = _qkv(4, b=1, hq=2, hkv=2)
  e = q.shape[-1]
  q1 = jnp.concatenate([q, jnp.full(q.shape[:-1] + (1,), shift * math.sqrt(e))], -1)
  k1 = jnp.concatenate([k, jnp.ones(k.shape[:-1] + (1,))], -1)
  o_ref, lse_ref = fusemax.dot_product_softmax(q, k, v)
  for name in STABLE:
    o, lse = jax.jit(lambda *a, n=name: fusemax.CASCADES[n](*a, scale=1.0 / math.sqrt(e)))(q1, k1, v)
    assert bool(jnp.isfinite(o).all()) and bool(jnp.isfinite(lse).all())
    print(name, shift, "max |Δo|", _err(o, o_ref), "max |Δlse - shift|", _err(lse - shift, lse_ref))
    assert _err(o, o_ref) <= 2e-3  # the fp32 ulp of a 1e4 logit is ~1e-3
    assert _err(lse - shift, lse_ref) <= 1e-2


def test_naive_overflows_negative_control():
  q, k, v = _qkv(5, logit_scale=60.0)
  o, _ = fusemax.naive(q, k, v)
  assert not bool(jnp.isfinite(o).all())
  o_stable, _ = fusemax.three_pass(q, k, v)
  assert bool(jnp.isfinite(o_stable).all())


@pytest.mark.parametrize("name", ("naive",) + STABLE)
def test_fully_masked_rows_give_zero_and_minus_inf_without_nan(name):
  q, k, v = _qkv(6, t=6, s=6)
  mask = np.tril(np.ones((6, 6), bool))
  mask[2] = False  # query 2 sees nothing
  mask = mask[None]
  fn = jax.jit(lambda q, k, v: fusemax.CASCADES[name](q, k, v, mask))
  o, lse = fn(q, k, v)
  assert float(jnp.max(jnp.abs(o[:, 2]))) == 0.0 and bool(jnp.all(lse[:, 2] == -jnp.inf))
  if name == "naive":
    return  # the negative control divides 0 by 0 on that row: its gradient is NaN by construction
  loss = lambda q, k, v: jnp.sum(fn(q, k, v)[0] ** 2) + jnp.sum(jnp.where(mask.any(-1)[0, None, :, None],
                                                                         fn(q, k, v)[1], 0.0))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
  assert float(jnp.max(jnp.abs(grads[0][:, 2]))) == 0.0


def test_one_pass_invariant_to_joint_kv_tile_permutation():
  q, k, v = _qkv(7, t=8, s=24)
  perm = np.array([2, 0, 5, 1, 4, 3])
  tiles = lambda x: x.reshape(x.shape[0], 6, 4, *x.shape[2:])[:, perm].reshape(x.shape)
  run = jax.jit(lambda q, k, v: fusemax.one_pass(q, k, v, block_k=4)[0])
  o, o_perm = run(q, k, v), run(q, tiles(k), tiles(v))
  assert _err(o, o_perm) <= 1e-6


@pytest.mark.parametrize("name", STABLE)
def test_cascade_gradients_match_oracle(name):
  q, k, v = _qkv(8)
  mask = masks.dense_mask(SinkWindow(2, 6), 23, 23)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)[0])) + jnp.sum(fn(q, k, v, mask)[1] ** 2)
  g = jax.jit(jax.grad(loss(fusemax.CASCADES[name]), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(fusemax.dot_product_softmax), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    print(name, "max |Δgrad|", _err(a, b))
    assert _err(a, b) <= 1e-5


def test_twopass_softmax_matches_jax_softmax():
  x = jax.random.uniform(jax.random.PRNGKey(9), (5, 300), minval=-1e4, maxval=1e4)
  x = x.at[0].set(jax.random.normal(jax.random.PRNGKey(10), (300,)))
  mask = jax.random.bernoulli(jax.random.PRNGKey(11), 0.7, x.shape).at[1].set(False)
  y = jax.jit(fusemax.twopass_softmax)(x, mask)
  y_ref = jax.nn.softmax(jnp.where(mask, x, -jnp.inf), axis=-1)
  y_ref = jnp.where(mask.any(-1, keepdims=True), y_ref, 0.0)
  print("twopass max |Δ|", _err(y, y_ref))
  assert _err(y, y_ref) <= 1e-6 and float(jnp.max(jnp.abs(y[1]))) == 0.0


@pytest.mark.parametrize("cuts,empty", [((0, 23), ()), ((0, 7, 23), ()), ((0, 5, 11, 23), (1,)),
                                        ((0, 1, 2, 3, 4, 5, 20, 23), (0, 3, 6))])
def test_merge_of_key_segments_equals_unsplit(cuts, empty):
  """Split keys into segments (some fully masked = empty), attend to each, merge by logsumexp."""
  q, k, v = _qkv(12)
  mask = masks.dense_mask(Dense(True), 23, 23)
  mask[:, :, [j for e in empty for j in range(cuts[e], cuts[e + 1])]] = False

  @jax.jit
  def run(q, k, v):
    parts = [fusemax.three_pass(q, k[:, a:b], v[:, a:b], mask[:, :, a:b]) for a, b in zip(cuts, cuts[1:])]
    return fusemax.three_pass(q, k, v, mask), fusemax.merge([p[0] for p in parts], [p[1] for p in parts])

  (o_ref, lse_ref), (o, lse) = run(q, k, v)
  assert _err(o, o_ref) <= 1e-6
  assert bool(jnp.all((lse == -jnp.inf) == (lse_ref == -jnp.inf)))
  finite = jnp.isfinite(lse_ref)
  assert _err(jnp.where(finite, lse, 0), jnp.where(finite, lse_ref, 0)) <= 1e-5


def test_merge_all_empty_is_zero_and_minus_inf():
  o = jnp.ones((1, 3, 2, 4))
  lse = jnp.full((1, 3, 2), -jnp.inf)
  merged, merged_lse = fusemax.merge([o, o], [lse, lse])
  assert float(jnp.max(jnp.abs(merged))) == 0.0 and bool(jnp.all(merged_lse == -jnp.inf))
  g = jax.grad(lambda a: jnp.sum(fusemax.merge([a, o], [lse, lse])[0]))(o)
  assert bool(jnp.isfinite(g).all())


def test_three_pass_matches_jax_nn_xla():
  q, k, v = _qkv(13, hq=4, hkv=2)
  o_ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  o, _ = reference.attention_reference(q, k, v, Dense(True))
  assert _err(o, o_ref) <= 1e-6


def test_sink_free_window_matches_jax_nn_local_window():
  q, k, v = _qkv(14, hq=2, hkv=2)
  o_ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(4, 0), implementation="xla")
  o, _ = reference.attention_reference(q, k, v, SinkWindow(0, 5))
  assert _err(o, o_ref) <= 1e-6
