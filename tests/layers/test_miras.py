"""Miras memory kernels: chunked form vs the token loops (values, states, gradients), closed-form inner gradients vs
``jax.grad``, the delta-rule / Hebbian / Titans reductions, Memora's simplex and long-sequence stability."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.triton_compile import lowered_for_h100
from layers.kernels.gated_delta import reference as gdn_reference
from layers.kernels.miras import api, channel_gates, chunked, flat, pallas_reads, pallas_tiles, pallas_triton, reference
from layers.miras import bias as biases
from layers.miras.memory import LinearMemory, MLPMemory, matmul
from layers.miras.retention import Decay, ElasticNet, LqNorm, SoftmaxKL
from layers.miras.spec import Gates, MemorySpec
from research.models.registry import MIXERS

SPECS = {
    "moneta": MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0)),
    # ε = 1e-3: the smoothed sign r/sqrt(r² + ε) amplifies float32 rounding of r by up to 1/sqrt(ε)
    "yaad": MemorySpec(MLPMemory(), biases.YaadHuber(1e-3), Decay()),
    "memora": MemorySpec(MLPMemory(), biases.L2(), SoftmaxKL()),
    "titans": MemorySpec(MLPMemory(), biases.L2(), Decay(), momentum=True),
    "elastic_linear": MemorySpec(LinearMemory(), biases.L2(), ElasticNet(0.01)),
    "moneta_pre": MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0), read="pre"),
    # per-token inner-gradient clipping (τ = 0.5 binds on most tokens of these inputs), Memora's lag token included
    "yaad_clip": MemorySpec(MLPMemory(), biases.YaadHuber(1e-3), Decay(), inner_clip=0.5),
    "memora_clip": MemorySpec(MLPMemory(), biases.L2(), SoftmaxKL(), inner_clip=0.5),
    "titans_clip": MemorySpec(MLPMemory(), biases.L2(), Decay(), momentum=True, inner_clip=0.5),
}
# more memories the fast paths are compared on (not the token loops: the SPECS tests cover those rules already)
FAST_PATH_SPECS = {
    "elastic_mlp": MemorySpec(MLPMemory(), biases.L2(), ElasticNet(0.01)),
    "moneta_clip": MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0), inner_clip=0.5),
}


def _inputs(spec: MemorySpec, seed: int, *, b=2, t=13, h=2, d=8, channel=False, eta_scale=0.1, dtype=jnp.float32):
  """Unit q, k; v ~ N(0, 1); gates around their layer defaults; a random initial state of the right kind."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 10)
  g = d if channel else 1
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (unit(jax.random.normal(kk, (b, t, h, d))) for kk in ks[:2])
  v = jax.random.normal(ks[2], (b, t, h, d))
  gates = Gates(eta=eta_scale * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h, g))),
                log_alpha=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (b, t, h, g))),
                delta=jax.nn.softplus(jax.random.normal(ks[5], (b, t, h))) if spec.bias.needs_delta else None,
                log_momentum=jax.nn.log_sigmoid(jax.random.normal(ks[6], (b, t, h, g))) if spec.momentum else None)
  state = {n: jax.random.normal(kk, (b, h, *shape)) / np.sqrt(shape[1])
           for (n, shape), kk in zip(spec.memory.shapes(d).items(), jax.random.split(ks[7], 2))}
  if isinstance(spec.retention, SoftmaxKL):
    state = {n: jax.nn.softmax(np.sqrt(w.shape[-1]) * w, axis=-1) for n, w in state.items()}
  momentum = ({n: 0.1 * jax.random.normal(kk, w.shape) for (n, w), kk in zip(state.items(), jax.random.split(ks[8], 2))}
              if spec.momentum else None)
  ln = (1.0 + 0.1 * jax.random.normal(ks[9], (h, d)), 0.1 * jax.random.normal(ks[9], (h, d)))
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
  return cast((q, k, v)), cast(gates), dict(initial_state=cast(state), initial_momentum=cast(momentum), ln=cast(ln))


def _rel(x, y) -> float:
  """max |x − y| / max |y| over a pytree."""
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(y))
  assert np.isfinite(err)
  return err / scale


def _loss(fn, weights):
  """A scalar of every output and final state, so its gradient checks all of them."""
  def loss(qkv, gates, kw):
    o, s, m = fn(*qkv, gates, **kw)
    return (jnp.sum(o * weights) + sum(jnp.sum(jnp.sin(w)) for w in s.values())
            + sum(jnp.sum(jnp.cos(w)) for w in (m or {}).values()))
  return loss


def _chunk_one_and_exact(spec: MemorySpec, inputs) -> tuple:
  """(chunked at chunk size 1, the exact recurrence): each (outputs, state)."""
  qkv, gates, kw = inputs
  run = lambda fn, **extra: fn(*qkv, gates, spec=spec, **kw, **extra)[:2]
  return run(chunked.miras_chunked, chunk_size=1), run(reference.exact_recurrence)


@pytest.mark.parametrize("name", list(SPECS))
def test_chunk_size_one_equals_the_exact_recurrence(name):
  """Equal in float64 (the algorithm is exact); in float32 the chunked path is as close to the float64 truth as the
  exact recurrence itself is (some of these 13-token recurrences amplify rounding ~100×, so the two float32 paths
  can differ by more than either differs from the truth: Yaad at seed 1 by 1.7e-5, each ~1e-5 from the truth)."""
  spec = SPECS[name]
  inputs = _inputs(spec, 1, channel=not spec.momentum)
  chunk32, exact32 = _chunk_one_and_exact(spec, inputs)
  with jax.enable_x64(True):  # the same float32 inputs, exactly, in float64
    chunk64, exact64 = _chunk_one_and_exact(spec, jax.tree.map(lambda x: x.astype(jnp.float64), inputs))
    err64 = _rel(chunk64, exact64)
    err32, exact_err32 = _rel(chunk32, exact64), _rel(exact32, exact64)
  print(f"{name}: chunk 1 vs exact recurrence: max rel error {err64:.1e} (float64); against the float64 truth, "
        f"chunked {err32:.1e}, exact recurrence {exact_err32:.1e} (float32)")
  assert err64 < 1e-12
  assert err32 < max(1e-5, 2.0 * exact_err32)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunk,channel", [(4, True), (8, True), (16, False), (2, False)])
def test_chunked_equals_the_frozen_gradient_loop_values_and_grads(name, chunk, channel, monkeypatch):
  """Every per-token read and the final state in float32 against the loop in float64 on the same inputs (1e-5, or
  within twice the float32 loop's own error where that is larger: 1.6e-5 for Titans at chunk 2 on some CPUs);
  gradients of all inputs in float64, where the second derivatives of the smoothed biases (up to 1/sqrt(ε)) do not
  amplify float32 rounding. Yaad's switch at ‖r‖ = δ is discontinuous, so a token within rounding of its threshold
  may take either branch in float32: its values are compared in float64 too. Chunks of 8 with channel gates run in
  two sub-blocks of 4 (:mod:`channel_gates`; a chunk size no other case traces, so the patched block size is what
  gets compiled)."""
  spec = SPECS[name]
  if chunk == 8:
    monkeypatch.setattr(channel_gates, "BLOCK", 4)
  channel = channel and not spec.momentum
  eta_scale = 0.02 if name.startswith("memora") else 0.1  # Memora's softmax of logits saturates at large steps
  run_ref = lambda *a, **k: reference.frozen_gradient_loop(*a, spec=spec, chunk_size=chunk, **k)
  run = lambda *a, **k: chunked.miras_chunked(*a, spec=spec, chunk_size=chunk, **k)
  qkv, gates, kw = _inputs(spec, 2 + chunk, channel=channel, eta_scale=eta_scale)
  (o_r, s_r, m_r), (o, s, m) = run_ref(*qkv, gates, **kw), run(*qkv, gates, **kw)
  with jax.enable_x64(True):
    qkv64, gates64, kw64 = jax.tree.map(lambda x: x.astype(jnp.float64), (qkv, gates, kw))
    o_t, s_t, m_t = run_ref(*qkv64, gates64, **kw64)  # the truth
    errs = _rel(o, o_t), _rel((s, m), (s_t, m_t))
    loop_errs = _rel(o_r, o_t), _rel((s_r, m_r), (s_t, m_t))
    qkv, gates, kw = _inputs(spec, 2 + chunk, channel=channel, eta_scale=eta_scale, dtype=jnp.float64)
    weights = jax.random.normal(jax.random.PRNGKey(7), o.shape, jnp.float64)
    g_r = jax.grad(_loss(run_ref, weights), argnums=(0, 1, 2))(qkv, gates, kw)
    g = jax.grad(_loss(run, weights), argnums=(0, 1, 2))(qkv, gates, kw)
    grad_err = _rel(g, g_r)
    errs64 = _rel(run(*qkv, gates, **kw), run_ref(*qkv, gates, **kw))
  print(f"{name} chunk {chunk} {'channel' if channel else 'head'} gates: max rel error every read {errs[0]:.1e}, "
        f"state {errs[1]:.1e} (float32; the loop's {loop_errs[0]:.1e}, {loop_errs[1]:.1e}); values {errs64:.1e}, "
        f"grads {grad_err:.1e} (float64)")
  bound = 2e-5 if name == "memora" else 1e-5  # Memora, chunk 8: 1.2e-5 in float32, with or without sub-blocks
  within = all(err < max(bound, 2.0 * loop_err) for err, loop_err in zip(errs, loop_errs))
  assert (name.startswith("yaad") or within) and errs64 < 1e-9 and grad_err < 1e-9


def test_frozen_gradients_are_stale_for_chunks_longer_than_one():
  spec = MemorySpec(MLPMemory(), biases.L2(), Decay())
  qkv, gates, kw = _inputs(spec, 3, eta_scale=0.5)
  o0 = reference.exact_recurrence(*qkv, gates, spec=spec, **kw)[0]
  o4 = chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=4, **kw)[0]
  print(f"exact vs chunk 4: rel difference {_rel(o4, o0):.1e}")
  assert _rel(o4, o0) > 1e-3


@pytest.mark.parametrize("memory", [LinearMemory(), MLPMemory()], ids=["linear", "mlp"])
@pytest.mark.parametrize("bias", [biases.Dot(), biases.L2(), biases.Lp(1.5), biases.Lp(2.0), biases.Lp(3.0),
                                  biases.YaadHuber(), biases.HuberCoord(), biases.HuberNorm(), biases.Robust()],
                         ids=lambda b: f"{type(b).__name__}{getattr(b, 'p', '')}")
def test_every_inner_gradient_equals_jax_grad_of_the_per_token_loss(memory, bias):
  spec = MemorySpec(memory, bias)
  qkv, gates, kw = _inputs(spec, 4, b=1, t=16, h=1, d=8)
  k, v = qkv[1][0, :, 0], qkv[2][0, :, 0]
  w = {n: x[0, 0] for n, x in kw["initial_state"].items()}
  ln = tuple(x[0] for x in kw["ln"])
  delta = jnp.linspace(0.2, 3.0, 16)  # both sides of Huber thresholds
  y, cache = memory.forward(w, k, ln)
  acts = memory.backprop(w, cache, bias.grad(y, v, delta), ln)
  closed = jax.vmap(lambda i: {n: jnp.outer(e[i], a[i]) for n, (a, e) in acts.items()})(jnp.arange(16))
  auto = jax.vmap(jax.grad(spec.token_loss), in_axes=(None, 0, 0, 0, None))(w, k, v, delta, ln)
  coef = jax.random.uniform(jax.random.PRNGKey(5), (16,))  # a chunk's weighted sum = grad of the weighted loss
  summed = {n: jnp.einsum("i,iab->ab", coef, x) for n, x in closed.items()}
  weighted = jax.grad(lambda w: jnp.sum(coef * jax.vmap(spec.token_loss, (None, 0, 0, 0, None))(w, k, v, delta, ln)))(w)
  errs = _rel(closed, auto), _rel(summed, weighted)
  print(f"{type(memory).__name__} {bias}: per-token grads max rel error {errs[0]:.1e}, weighted sum {errs[1]:.1e}")
  assert max(errs) < 1e-5


def test_bias_output_gradients_equal_jax_grad():
  y, v = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 8))
  delta = jnp.linspace(0.1, 4.0, 64)
  for bias in (biases.Dot(), biases.L2(), biases.Lp(1.5), biases.Lp(3.0), biases.YaadHuber(), biases.HuberCoord(),
               biases.HuberNorm(), biases.Robust()):
    auto = jax.vmap(jax.grad(bias.loss))(y, v, delta)
    err = _rel(bias.grad(y, v, delta), auto)
    print(f"{bias}: |∂ℓ/∂y − jax.grad| max rel {err:.1e}")
    assert err < 1e-6


def test_yaad_l1_writes_pass_the_values_a_gradient_only_with_enough_smoothing():
  """Past its threshold Yaad's inner gradient is δ·r/√(r² + ε): its derivative in the value is δ·ε/(r² + ε)^{3/2},
  ~1e-6·δ at the default ε = 1e-6 with |r| ≈ 1 (why Yaad stays at chance on MQAR, docs/results.md), ~0.35·δ at
  ε = 1."""
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  y = jax.random.normal(ks[0], (32, 8))
  sign = jnp.where(jax.random.bernoulli(ks[1], 0.5, (32, 8)), 1.0, -1.0)
  r = sign * jax.random.uniform(ks[2], (32, 8), minval=1.0, maxval=3.0)
  v, delta = y - r, jnp.full((32,), 0.5)  # 1 ≤ |r_i| ≤ 3, ‖r‖ ≫ δ: the ℓ1 branch
  assert bool(jnp.all(jnp.linalg.norm(r, axis=-1) > delta))
  for eps, low, high in ((1e-6, 0.0, 1e-6), (1.0, 0.02, 0.4)):
    bias = biases.YaadHuber(eps)
    dgrad_dv = jax.vmap(jax.jacfwd(bias.grad, argnums=1))(y, v, delta)  # [32, 8, 8], diagonal
    diag = jnp.abs(jnp.diagonal(dgrad_dv, axis1=-2, axis2=-1)) / delta[:, None]
    print(f"YaadHuber(eps={eps}): |∂g/∂v| / δ in [{float(diag.min()):.1e}, {float(diag.max()):.1e}]")
    assert low <= float(diag.min()) and float(diag.max()) <= high


def test_lp_smoothing_converges_to_the_exact_gradient_and_p1_steps_ignore_the_residual_size():
  r = jnp.array([0.3, -1.7, 2.2, -0.05])
  for p in (1.5, 3.0):
    exact = p * jnp.sign(r) * jnp.abs(r) ** (p - 1)
    errs = [float(jnp.max(jnp.abs(biases.Lp(p, eps).grad(r, 0.0) - exact))) for eps in (1e-2, 1e-4, 1e-6)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs
  step = biases.Lp(1.0, 1e-12).grad(r, 0.0)
  np.testing.assert_allclose(jnp.abs(step), 1.0, rtol=1e-5)
  np.testing.assert_allclose(biases.Lp(2.0).grad(r, 0.0), biases.L2().grad(r, 0.0), rtol=1e-6)


def test_yaad_steps_are_l2_inside_the_threshold_and_delta_l1_outside():
  y, v = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 8))
  r = y - v
  delta = jnp.full((32,), float(jnp.median(jnp.linalg.norm(r, axis=-1))))
  inside = jnp.linalg.norm(r, axis=-1) <= delta
  assert 0 < int(inside.sum()) < 32
  g = biases.YaadHuber(0.0).grad(y, v, delta)
  np.testing.assert_allclose(g[inside], 2 * r[inside], rtol=1e-6)
  np.testing.assert_allclose(g[~inside], delta[~inside, None] * jnp.sign(r[~inside]), rtol=1e-6)


def test_p2_q2_linear_moneta_is_the_delta_rule():
  """W_t = W_{t−1} − 2η_t (W_{t−1} k_t − v_t) k_tᵀ = DeltaNet with β = 2η; with α < 1 Miras decays after the
  gradient (at W_{t−1}), GDN before it: one step differs by exactly (1 − α) 2η W k kᵀ (spec oracle 3)."""
  spec = MemorySpec(LinearMemory(), biases.Lp(2.0), LqNorm(2.0))
  (q, k, v), gates, kw = _inputs(spec, 6, t=24)
  gates = gates._replace(log_alpha=jnp.zeros_like(gates.log_alpha))
  o, s, _ = chunked.miras_chunked(q, k, v, gates, spec=spec, chunk_size=1, **kw)
  s0 = jnp.swapaxes(kw["initial_state"]["w"], -1, -2)  # GDN keeps Sᵀ ([K, V]) and reads Sᵀ q
  o_gdn, s_gdn = gdn_reference.gated_delta_rule_reference(q, k, v, jnp.zeros(q.shape[:3]), 2 * gates.eta[..., 0],
                                                          scale=1.0, initial_state=s0)
  errs = _rel(o, o_gdn), _rel(jnp.swapaxes(s["w"], -1, -2), s_gdn)
  print(f"p = q = 2 linear Moneta vs DeltaNet: max rel error outputs {errs[0]:.1e}, state {errs[1]:.1e}")
  assert max(errs) < 1e-5
  alpha = 0.7  # one token with decay
  one = lambda x: x[:, :1]
  g1 = gates._replace(eta=one(gates.eta), log_alpha=jnp.full_like(one(gates.log_alpha), np.log(alpha)))
  _, s1, _ = chunked.miras_chunked(*(one(x) for x in (q, k, v)), g1, spec=spec, chunk_size=1, **kw)
  log_decay = jnp.full(one(gates.eta)[..., 0].shape, np.log(alpha))
  _, s_gdn1 = gdn_reference.gated_delta_rule_reference(*(one(x) for x in (q, k, v)), log_decay,
                                                       2 * one(gates.eta)[..., 0], scale=1.0, initial_state=s0)
  w0, kk, eta = kw["initial_state"]["w"], k[:, 0], gates.eta[:, 0, :, 0]
  gap = -(1 - alpha) * 2 * eta[..., None, None] * jnp.einsum("bhij,bhj,bhk->bhik", w0, kk, kk)
  err = _rel(s1["w"] - jnp.swapaxes(s_gdn1, -1, -2), gap)
  print(f"Miras vs GDN decay order, one step: max rel error of the predicted gap {err:.1e}")
  assert err < 1e-4


def test_hebbian_linear_memory_is_gated_linear_attention_for_every_chunk_size():
  spec = MemorySpec(LinearMemory(), biases.Dot(), Decay())
  (q, k, v), gates, kw = _inputs(spec, 8, t=32, channel=True)
  s = kw["initial_state"]["w"]
  outs = []
  for tok in range(32):  # GLA: W_t = W_{t−1} diag(α_t) + 2 v_t (η_t ⊙ k_t)ᵀ, gates on the key axis
    a, e = jnp.exp(gates.log_alpha[:, tok]), gates.eta[:, tok]
    s = s * a[..., None, :] + 2 * jnp.einsum("bhi,bhj->bhij", v[:, tok], e * k[:, tok])
    outs.append(jnp.einsum("bhij,bhj->bhi", s, q[:, tok]))
  o_gla = jnp.stack(outs, axis=1)
  for chunk in (1, 4, 16):
    o, s_c, _ = chunked.miras_chunked(q, k, v, gates, spec=spec, chunk_size=chunk, **kw)
    errs = _rel(o, o_gla), _rel(s_c["w"], s)
    print(f"Hebbian chunk {chunk} vs gated linear attention: outputs {errs[0]:.1e}, state {errs[1]:.1e}")
    assert max(errs) < 1e-5


def test_titans_reductions():
  """Zero momentum decay = plain GD with decay; Yaad with δ → ∞ = ℓ2 gradient descent with decay."""
  titans = SPECS["titans"]
  qkv, gates, kw = _inputs(titans, 9)
  no_carry = dict(kw, initial_momentum=jax.tree.map(jnp.zeros_like, kw["initial_momentum"]))
  o_m, s_m, _ = chunked.miras_chunked(*qkv, gates._replace(log_momentum=jnp.full_like(gates.log_alpha, -80.0)),
                                      spec=titans, chunk_size=4, **no_carry)
  gd = MemorySpec(MLPMemory(), biases.L2(), Decay())
  o_gd, s_gd, _ = chunked.miras_chunked(*qkv, gates._replace(log_momentum=None), spec=gd, chunk_size=4,
                                        **dict(kw, initial_momentum=None))
  errs = _rel(o_m, o_gd), _rel(s_m, s_gd)
  yaad = SPECS["yaad"]
  o_y, s_y, _ = chunked.miras_chunked(*qkv, gates._replace(log_momentum=None, delta=jnp.full(qkv[0].shape[:3], 1e9)),
                                      spec=yaad, chunk_size=4, **dict(kw, initial_momentum=None))
  errs += _rel(o_y, o_gd), _rel(s_y, s_gd)
  print(f"momentum μ=0 vs GD: {errs[0]:.1e}, {errs[1]:.1e}; Yaad δ=1e9 vs ℓ2 GD: {errs[2]:.1e}, {errs[3]:.1e}")
  assert max(errs) < 1e-6


def test_moneta_weights_are_the_normalised_accumulator():
  a = {"w": jax.random.normal(jax.random.PRNGKey(2), (6, 5))}
  for q in (2.0, 3.0, 4.0, 5.0):
    w = LqNorm(q).gradient_point(a)["w"]
    ratio = w / a["w"]
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-5)
    assert float(ratio[0, 0]) > 0
    norm = lambda x: float(jnp.sum(jnp.abs(x) ** q) ** (1 / q))
    np.testing.assert_allclose(norm(w), norm(a["w"]) ** (3 - q), rtol=1e-5)
  np.testing.assert_allclose(LqNorm(2.0).gradient_point(a)["w"], a["w"], rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4])
def test_memora_memory_stays_on_the_simplex(chunk):
  spec = SPECS["memora"]
  qkv, gates, kw = _inputs(spec, 10, t=64, eta_scale=1.0, channel=True)
  for length in (1, 5, 8, 37, 64):  # the state at the last chunk boundary by each length
    _, s, _ = chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=chunk, lengths=jnp.full((2,), length), **kw)
    for name, w in s.items():
      assert float(jnp.min(w)) >= 0.0, (name, length)
      np.testing.assert_allclose(jnp.sum(w, axis=-1), 1.0, atol=1e-5)
  w = {"w1": jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (4, 16)), axis=-1)}
  zero = {"w1": jnp.zeros((4, 16))}
  ident = SoftmaxKL().lag_step(w, zero, {"w1": jnp.ones((1, 1))}, {"w1": jnp.zeros((1, 1))})
  np.testing.assert_allclose(ident["w1"], w["w1"], rtol=1e-5)  # α = 1, η = 0: identity
  uniform = SoftmaxKL().lag_step(w, zero, {"w1": jnp.zeros((1, 1))}, {"w1": jnp.zeros((1, 1))})
  np.testing.assert_allclose(uniform["w1"], 1 / 16, rtol=1e-6)  # α = 0, η = 0: uniform


def test_inner_clip_bounds_every_token_step():
  """With η = α = 1 and chunk size 1, one token moves the state by exactly its clipped gradient: norm ≤ τ, = τ
  where the raw gradient is longer; without the clip the same step is longer than τ."""
  tau = 0.05
  for name in ("yaad_clip", "titans_clip"):
    spec = SPECS[name]
    qkv, gates, kw = _inputs(spec, 21, b=2, t=1, h=2)
    gates = gates._replace(eta=jnp.ones_like(gates.eta), log_alpha=jnp.zeros_like(gates.log_alpha),
                           log_momentum=None if gates.log_momentum is None else jnp.full_like(gates.eta, -30.0))
    kw = dict(kw, initial_momentum=None if kw["initial_momentum"] is None else
              jax.tree.map(jnp.zeros_like, kw["initial_momentum"]))
    step = lambda spec: jnp.sqrt(sum(jnp.sum((s - kw["initial_state"][n]) ** 2, axis=(-2, -1)) for n, s in
                                     chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=1, **kw)[1].items()))
    clipped = step(dataclasses.replace(spec, inner_clip=tau))
    raw = step(dataclasses.replace(spec, inner_clip=None))
    print(f"{name}: per-(b, h) step norms {np.asarray(clipped).ravel()} (raw {np.asarray(raw).ravel()})")
    assert bool(jnp.all(raw > tau))
    np.testing.assert_allclose(clipped, tau, rtol=1e-5)


def _long_sequence(spec, seed, t=4096, d=64):
  """One head, T = 4096, head width 64, chunk 64, gates drawn around the layers' initial values (η ≈ 0.12,
  α ≈ 0.99): (outputs, state, ‖∂(last chunk's outputs · w)/∂k‖ per chunk of keys)."""
  qkv, gates, kw = _inputs(spec, seed, b=1, t=t, h=1, d=d, channel=not spec.momentum)
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  gates = gates._replace(eta=jax.nn.sigmoid(-2.0 + jax.random.normal(ks[0], gates.eta.shape)),
                         log_alpha=jax.nn.log_sigmoid(4.6 + jax.random.normal(ks[1], gates.eta.shape)))
  run = lambda qkv: chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=64, **kw)[:2]
  w = jax.random.normal(ks[2], (1, 64, 1, d))
  (o, s), vjp = jax.vjp(run, qkv)
  (grads,) = vjp((jnp.zeros_like(o).at[:, -64:].set(w), jax.tree.map(jnp.zeros_like, s)))
  per_chunk = jnp.sqrt(jnp.sum(grads[1][0, :, 0].reshape(t // 64, 64 * d) ** 2, axis=-1))
  return o, s, per_chunk


LONG_CASES = {"moneta": ("moneta", {}), "yaad": ("yaad", {}), "memora": ("memora", {}), "titans": ("titans", {}),
              "moneta_q2_clip": ("moneta", {"q": 2.0, "inner_clip": 0.1})}


@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long_random_sequences_stay_finite_and_clipped_memories_forget(case):
  """T = 4096 in float32, each layer's own memory (its config's ``memory_spec``): outputs and states stay finite for
  every variant, and so do outer gradients where the memory is clipped (Yaad, Memora by default: inner_clip 0.1).

  With the clip, the last chunk's outputs depend less on the first chunk's keys than on the last chunk's: the memory
  forgets, as its decay says. Without it Yaad's and Memora's outer gradients overflow (inf or NaN here): the
  frozen-gradient chunk map of the LayerNorm'd MLP memory is expanding (lucidrains/titans-pytorch #29; the table in
  docs/results.md). Moneta at the paper's (p, q) = (3, 4) is left unclipped: its printed ℓq map W = A/‖A‖_4² inverts
  the norm (‖W‖ = 1/‖A‖), so bounded steps let A decay towards 0 and W blow up; with q = 2 (W = A) the clip makes
  it forget like the others. Titans is left unclipped too: in the whole layer (momentum μ ≈ 0.9 at init) the clip
  made its outer gradients larger, not smaller; with the momentum gates drawn here its unclipped gradients overflow
  (printed, not asserted)."""
  name, overrides = LONG_CASES[case]
  spec = MIXERS.config_class(name)(**overrides).memory_spec()
  o, s, per_chunk = _long_sequence(spec, 11)
  finite = lambda tree: all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
  print(f"{case} (inner_clip {spec.inner_clip}): T=4096 max |o| {float(jnp.max(jnp.abs(o))):.2f}; sensitivity to "
        f"the keys of chunk 0 / 32 / 62: {float(per_chunk[0]):.1e} / {float(per_chunk[32]):.1e} / "
        f"{float(per_chunk[-2]):.1e}")
  assert finite((o, s))
  if spec.inner_clip is not None:
    assert finite(per_chunk) and float(per_chunk[0]) < float(per_chunk[-2])


@pytest.mark.parametrize("name,channel", [("moneta", False), ("moneta", True), ("moneta_pre", True),
                                          ("yaad_clip", False), ("elastic_mlp", True)])
@pytest.mark.parametrize("split", [False, True])
def test_flat_path_equals_the_chunked_path_values_and_grads(name, channel, split):
  """``xla_flat`` (all heads at once, hoisted scores, the boundary read as the next chunk's extra row) against
  ``xla_chunked``: every read and the state in float32, gradients of all inputs in float64, with a padded trailing
  chunk and a row whose length ends inside a chunk (so the boundary read and the kept state are both exercised).
  ``split`` (``xla_split``): the reads after the keys' scan. Work mapped over chunks outside the scan (the split
  reads, the channel gates' scores) runs three chunks at a time: 4 chunks make a batch and a rest."""
  spec = SPECS.get(name) or FAST_PATH_SPECS[name]
  lengths = jnp.array([13, 9])
  d, hidden = 8, 8 * spec.memory.expansion
  per_chunk = 4 * 4 * 4 * max(hidden, 4 * d if channel else 0)  # [b·h, c, max(E, c·d)] float32, b·h = 4, c = 4
  fast = functools.partial(flat.miras_flat, split=split, batch_bytes=3 * per_chunk)
  runs = [functools.partial(fn, spec=spec, chunk_size=4, lengths=lengths) for fn in (chunked.miras_chunked, fast)]
  qkv, gates, kw = _inputs(spec, 21, t=13, channel=channel)
  (o_c, s_c, _), (o_f, s_f, _) = (run(*qkv, gates, **kw) for run in runs)
  errs = _rel(o_f, o_c), _rel(s_f, s_c)
  with jax.enable_x64(True):
    qkv, gates, kw = _inputs(spec, 21, t=13, channel=channel, dtype=jnp.float64)
    weights = jax.random.normal(jax.random.PRNGKey(7), o_c.shape, jnp.float64)
    g_c, g_f = (jax.grad(_loss(run, weights), argnums=(0, 1, 2))(qkv, gates, kw) for run in runs)
    grad_err = _rel(g_f, g_c)
  print(f"{name} {'channel' if channel else 'head'} gates: {'split' if split else 'flat'} vs chunked, max rel error "
        f"reads {errs[0]:.1e}, state {errs[1]:.1e} (float32), grads {grad_err:.1e} (float64)")
  assert max(errs) < 1e-5 and grad_err < 1e-9



@pytest.mark.parametrize("post", [True, False])
def test_channel_gate_sub_blocks_equal_the_elementwise_coefficients(post):
  """``channel_gates.Coefficients`` scores and mix (4 sub-blocks of 4 rows, the earlier blocks factored through each
  block's first read decay) against the [c, c, d] coefficients of ``chunked.coefficients`` formed element-wise:
  values and gradients of every input in float64, and in float32 with decays of up to e^-40 a token (e^-200 over
  the chunk)."""
  c, d = 16, 8
  with jax.enable_x64(True):
    ks = jax.random.split(jax.random.PRNGKey(11), 6)
    x, y, e = (jax.random.normal(kk, (c, d), jnp.float64) for kk in ks[:3])
    a = jax.random.normal(ks[3], (c, c), jnp.float64)
    eta = jax.nn.sigmoid(jax.random.normal(ks[4], (c, d), jnp.float64))
    la = -40.0 * jax.random.uniform(ks[5], (c, d), jnp.float64) ** 2
    spec = dataclasses.replace(SPECS["moneta"], read="post" if post else "pre")

    def dense(x, y, a, e, eta, la):
      coef = chunked.coefficients(spec, eta, la, jnp.cumsum(la, axis=0), jnp.zeros_like(la))["coef"]
      return jnp.einsum("ti,si,tsi->ts", x, y, coef), jnp.einsum("ts,tso,so->to", a, coef, e)

    def blocks(x, y, a, e, eta, la):
      coef = channel_gates.Coefficients.from_gates(eta, la, jnp.cumsum(la, axis=0), post=post, block=4)
      return coef.scores(x, y), coef.mix(a, e)

    args = (x, y, a, e, eta, la)
    values = [f(*args) for f in (dense, blocks)]
    w = [jax.random.normal(jax.random.PRNGKey(i), v.shape, jnp.float64) for i, v in enumerate(values[0])]
    loss = lambda f: lambda *args: sum(jnp.sum(o * wi) for o, wi in zip(f(*args), w))
    grads = [jax.grad(loss(f), argnums=tuple(range(6)))(*args) for f in (dense, blocks)]
    err = max(_rel(values[1], values[0]), _rel(grads[1], grads[0]))
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads[1]))
    # float32, where exp(−Σ log α) over a chunk (up to e^200 here) would overflow if factored through the chunk start
    err32 = _rel(blocks(*(v.astype(jnp.float32) for v in args)), values[0])
  print(f"channel sub-blocks ({'post' if post else 'pre'} reads) vs element-wise coefficients: max rel error {err:.1e} "
        f"(float64), {err32:.1e} (float32)")
  assert err < 1e-12 and finite and err32 < 1e-5


def test_flat_path_never_holds_every_chunks_channel_coefficients():
  """With per-channel gates the first layer's scores need coefficient arrays per chunk (:mod:`channel_gates`; at
  c = 16, one sub-block, about [b·h, c, c, d]); the flat path forms them a batch of chunks at a time
  (``batch_bytes``): in XLA's own accounting, one chunk at a time saves more temporaries in the fwd+bwd than
  [b·h, c, c, d] for all 32 chunks (at the 340M layer shape, B = 8, the batching took the temporaries from 41.5 to
  7.4 GiB on the CPU)."""
  spec = SPECS["moneta"]
  (q, k, v), gates, kw = _inputs(spec, 3, b=1, t=512, h=4, d=16, channel=True)
  per_chunk = 4 * 4 * 16 * 16 * 16  # [b·h, c, c, d] float32, c = 16: below one chunk's arrays, so one at a time
  temps = {}
  for budget in (per_chunk, 1 << 40):
    run = functools.partial(flat.miras_flat, spec=spec, chunk_size=16, remat=True, batch_bytes=budget, **kw)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v, gates)[0] ** 2), argnums=(0, 1, 2)))
    temps[budget] = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  every_chunk = 32 * per_chunk
  print(f"flat, channel gates: fwd+bwd temporaries {temps[per_chunk] / 2**20:.2f} MiB a chunk at a time, "
        f"{temps[1 << 40] / 2**20:.2f} MiB all at once; all chunks' coefficients {every_chunk / 2**20:.2f} MiB")
  assert temps[1 << 40] - temps[per_chunk] > every_chunk


def test_kernel_erf_matches_lax_erf():
  """The Pallas kernels' erf (Triton lowers no erf) against XLA's over the range where GELU's inputs live: the
  approximation itself in float64 (bound 1.2e-7), and in float32 within the rounding XLA's own erf shows there."""
  with jax.enable_x64(True):
    x = jnp.linspace(-8.0, 8.0, 100_001, dtype=jnp.float64)
    exact = jax.lax.erf(x)
    err64 = float(jnp.max(jnp.abs(pallas_triton.erf(x) - exact)))
    x32 = x.astype(jnp.float32)
    err32, xla32 = (float(jnp.max(jnp.abs(f(x32).astype(jnp.float64) - exact))) for f in (pallas_triton.erf,
                                                                                           jax.lax.erf))
  print(f"kernel erf: max abs error {err64:.1e} (float64), {err32:.1e} in float32 (XLA's erf there: {xla32:.1e})")
  assert err64 < 1.2e-7 and err32 < 1.5 * xla32


def _kernels_vs_flat(kernels, spec, channel: bool, bits: int, seed: int, weight_seed: int, monkeypatch) -> tuple:
  """Max relative errors (reads, state, gradients of every input) of a Pallas path in interpret mode against
  ``xla_flat``, with a padded trailing chunk and a length ending inside an earlier chunk (chunks of 32 with channel
  gates, else 16; d = 16); in float64 with XLA's erf swapped into the kernels, else float32 with their own."""
  c = 32 if channel else 16
  lengths = jnp.array([5 * c // 2, 3 * c // 2 - 3])
  runs = [functools.partial(fn, spec=spec, chunk_size=c, lengths=lengths) for fn in (flat.miras_flat, kernels)]
  if bits == 64:
    monkeypatch.setattr(pallas_triton, "erf", jax.lax.erf)
  with jax.enable_x64(bits == 64):
    qkv, gates, kw = _inputs(spec, seed, t=5 * c // 2, d=16, channel=channel,
                             dtype=jnp.float64 if bits == 64 else jnp.float32)
    (o_f, s_f, _), (o_p, s_p, _) = (run(*qkv, gates, **kw) for run in runs)
    weights = jax.random.normal(jax.random.PRNGKey(weight_seed), o_f.shape, o_f.dtype)
    g_f, g_p = (jax.grad(_loss(run, weights), argnums=(0, 1, 2))(qkv, gates, kw) for run in runs)
    return _rel(o_p, o_f), _rel(s_p, s_f), _rel(g_p, g_f)


@pytest.mark.parametrize(("name", "channel", "hidden_tile", "bits"), [
    ("moneta", False, 64, 32), ("moneta", True, 32, 32), ("moneta", False, 16, 64), ("moneta", True, 64, 64),
    ("moneta_pre", True, 32, 64), ("yaad", False, 32, 64), ("yaad", True, 16, 64)])
def test_pallas_kernels_equal_the_flat_path_values_and_grads(name, channel, hidden_tile, bits, monkeypatch):
  """The Pallas kernels (one program per head walks every chunk tile by tile along E; the backward recomputes each
  chunk from its checkpointed start state and pulls the cotangents back by hand) in Pallas interpret mode, against
  ``xla_flat``: reads, state and the gradients of every input, with an incomplete trailing chunk and a row whose
  length ends inside an earlier chunk (boundary read, kept state, padding). In float32 with the kernels' own erf
  (which differs from XLA's by up to 1.2e-7), and in float64 with XLA's erf swapped in, where the hand-written
  backward must equal autodiff of the flat path to rounding. ``hidden_tile`` 16 and 32 cut the state and
  activations (E = 64) in four and two tiles (Moneta's read scale summed over tiles); channel gates run chunks of 32
  in two row blocks of 16, so W1's factored coefficients between blocks and their gate cotangents are exercised;
  Yaad's Huber threshold δ gets its gradient through the kernel's bias-gradient pull-back."""
  kernels = functools.partial(pallas_triton.miras_pallas, interpret=True,
                              tuning=pallas_triton.Tuning(hidden_tile=hidden_tile))
  errs = _kernels_vs_flat(kernels, SPECS[name], channel, bits, 22, 8, monkeypatch)
  print(f"{name}, {'channel' if channel else 'head'} gates, E-tile {hidden_tile}: pallas (interpret) vs flat, "
        f"max rel error reads {errs[0]:.1e}, "
        f"state {errs[1]:.1e}, grads {errs[2]:.1e} (float{bits})")
  # float64: Yaad's Huber map with channel gates in four tiles amplifies the summation order's rounding (6e-13 to
  # 1.3e-12 seen, with XLA's compiled order); a wrong pull-back is off by O(1)
  assert max(errs) < (1e-5 if bits == 32 else 1e-11)


@pytest.mark.parametrize(("name", "channel", "hidden_tile", "bits"), [
    ("moneta", False, 16, 64), ("yaad", True, 16, 64), ("moneta", True, 32, 32)])
def test_tiled_pallas_recurrence_equals_the_flat_path(name, channel, hidden_tile, bits, monkeypatch):
  """``pallas_tiles``: the keys' recurrence as kernels of one program per head and tile of E with a row-wise kernel
  of one program per head between them (interpret mode), three per chunk forward and three per chunk backward with a
  hand-written pull-back that also returns the inputs' cotangents; with per-head gates the reads are
  ``pallas_reads``' kernels, with channel gates XLA's. Against ``xla_flat``: reads, state and the gradients of every
  input, with a padded trailing chunk and a length ending inside an earlier chunk; in float64 with XLA's erf in the
  kernels the pull-back must equal autodiff to rounding (Moneta's read scales summed over four tiles; Yaad's δ and
  channel gates along each layer's axis)."""
  kernels = functools.partial(pallas_tiles.miras_tiles,
                              tiling=pallas_tiles.Tiling(hidden_tile=hidden_tile, interpret=True))
  errs = _kernels_vs_flat(kernels, SPECS[name], channel, bits, 25, 10, monkeypatch)
  print(f"{name}, {'channel' if channel else 'head'} gates, E-tile {hidden_tile}: tiled pallas (interpret) vs flat, "
        f"max rel error reads {errs[0]:.1e}, state {errs[1]:.1e}, grads {errs[2]:.1e} (float{bits})")
  assert max(errs) < (1e-5 if bits == 32 else 1e-12)


@pytest.mark.parametrize(("channel", "kernels"), [(True, 6), (False, 9)])
def test_tiled_pallas_kernels_lower_to_triton_for_an_h100(channel, kernels):
  """The kernels of ``pallas_tiles``' fwd+bwd (bf16 matmuls, two tiles) lower to Triton IR for an (abstract) H100
  from this CPU: the keys' recurrence's six (four per tile, two row-wise per head), and with per-head gates the
  reads' three (forward; backward through the tiles, then through the queries' coefficients)."""
  spec = SPECS["moneta"]
  qkv, gates, kw = _inputs(spec, 24, b=1, t=64, d=16, channel=channel)
  run = functools.partial(pallas_tiles.miras_tiles, spec=spec, chunk_size=32, matmul="bfloat16",
                          tiling=pallas_tiles.Tiling(hidden_tile=32))
  assert _triton_calls(run, qkv, gates, kw) == kernels


@pytest.mark.parametrize(("name", "bits", "hidden_tile"), [("moneta", 64, 16), ("moneta_pre", 64, 16),
                                                            ("moneta", 32, 64)])
def test_pallas_reads_equal_the_flat_reads_values_and_grads(name, bits, hidden_tile, monkeypatch):
  """``pallas_reads``: every chunk's per-token reads (before their LayerNorm) as kernels (one forward, two
  backward) of a program per chunk and head, forming each chunk's coefficients from its gates, against
  ``flat.read_u`` mapped over the chunks with XLA's coefficients (``flat.chunk_inputs``), on fresh random start
  states, ``KeyPass``es, queries, keys, gates and read scales per row (interpret mode; four tiles of E at
  ``hidden_tile`` 16; post and pre reads): u and the gradient of every input (q, k and the gates through the
  coefficients), each leaf to its own scale; in float64 with XLA's erf in the kernel the hand-written backward must
  equal autodiff to rounding."""
  if bits == 64:
    monkeypatch.setattr(pallas_triton, "erf", jax.lax.erf)
  spec = SPECS[name]
  n, heads, c, d, e = 3, 2, 16, 16, 64
  with jax.enable_x64(bits == 64):
    dtype = jnp.float64 if bits == 64 else jnp.float32
    (q, k, v), gates, _ = _inputs(spec, 31, b=1, t=n * c, h=heads, d=d, dtype=dtype)
    key = iter(jax.random.split(jax.random.PRNGKey(31), 8))
    normal = lambda *shape: jax.random.normal(next(key), shape, dtype)
    scale = lambda: 0.5 + jnp.abs(normal(n, heads, c, 1))  # per row (the KeyPass's are not read)
    starts = {"w2": 0.3 * normal(n, heads, e, d), "w1": 0.3 * normal(n, heads, d, e)}
    keys = flat.KeyPass(None, normal(n, heads, c, d), normal(n, heads, c, e), normal(n, heads, c, e))
    kernels = pallas_reads.ChunkReads(pallas_reads.ReadTiling(hidden_tile=hidden_tile, interpret=True))

    def xla(starts, keys, x, scale):
      return jax.vmap(functools.partial(flat.read_u, spec))(starts, keys, x.q * x.decay, x.decay, x.w1_coef,
                                                            x.scores_q, scale)

    def run(reads, starts, keys, q, k, eta, log_alpha, scale):
      x = flat.chunk_inputs(spec, q, k, v, Gates(eta, log_alpha), c, None)
      return reads(starts, keys, x, scale)

    args = (starts, keys, q, k, gates.eta, gates.log_alpha, {"w2": scale(), "w1": scale()})
    weights = normal(n, heads, c, d)
    runs = (xla, functools.partial(kernels, spec))
    u_f, u_p = (run(reads, *args) for reads in runs)
    g_f, g_p = (jax.grad(lambda a, reads=reads: jnp.sum(run(reads, *a) * weights))(args) for reads in runs)
    errs = [_rel(u_p, u_f)] + [_rel(p, f) for p, f in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_f), strict=True)]
  print(f"pallas reads (interpret, E-tile {hidden_tile}, {spec.read} reads) vs flat.read_u, float{bits}: max rel "
        f"error u {errs[0]:.1e}, gradients (largest over inputs) {max(errs[1:]):.1e}")
  assert max(errs) < (1e-5 if bits == 32 else 1e-13)


def test_pallas_channel_gates_stay_finite_and_accurate_under_strong_decay():
  """Channel gates with a cumulative log-decay near −200 per chunk of 64 (α ≈ 0.05 a token): factored through the
  start of the chunk, B_t / B_s would overflow float32; through each row block's end every exponent is ≤ 0. The
  kernels' reads stay as close to the float64 answer as ``xla_flat``'s in float32, and their gradients finite."""
  spec = SPECS["moneta"]
  qkv, gates, kw = _inputs(spec, 3, t=128, d=16, channel=True)
  gates = gates._replace(log_alpha=jax.nn.log_sigmoid(-3.0 + jax.random.normal(jax.random.PRNGKey(1),
                                                                                gates.log_alpha.shape)))
  assert float(jnp.min(jnp.sum(gates.log_alpha.reshape(2, 2, 64, 2, 16), axis=2))) < -150
  run = functools.partial(pallas_triton.miras_pallas, spec=spec, chunk_size=64, interpret=True)
  o_p = run(*qkv, gates, **kw)[0]
  o_f = flat.miras_flat(*qkv, gates, spec=spec, chunk_size=64, **kw)[0]
  with jax.enable_x64(True):
    f64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)
    exact = flat.miras_flat(*f64(qkv), f64(gates), spec=spec, chunk_size=64, **f64(kw))[0]
    errs = _rel(o_p, exact), _rel(o_f, exact)
  grads = jax.grad(lambda q, gates: jnp.sum(run(q, *qkv[1:], gates, **kw)[0] ** 2), argnums=(0, 1))(qkv[0], gates)
  print(f"strong decay: pallas vs float64 {errs[0]:.1e}, xla_flat (float32) vs float64 {errs[1]:.1e}")
  # both are float32 paths whose distance to float64 moves with XLA's compiled summation order (pallas 1.3e-5 to
  # 7.6e-5, xla_flat 2.1e-5 to 1.0e-4 seen); an overflowing factorisation gives inf or O(1)
  assert errs[0] < max(4 * errs[1], 1e-4) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(("matmul_mode", "channel", "hidden_tile"), [("float32", False, 64), ("bfloat16", False, 16),
                                                                    ("bfloat16", True, 32)])
def test_pallas_kernels_lower_to_triton_for_an_h100(matmul_mode, channel, hidden_tile):
  """Both kernels of the fwd+bwd lower to Triton IR for an (abstract) H100 from this CPU: every primitive in them
  has a Triton lowering (no erf, no custom_vjp call, no slicing of values: tiles are loaded from the refs)."""
  spec = SPECS["moneta"]
  qkv, gates, kw = _inputs(spec, 24, b=1, t=64, d=16, channel=channel)
  run = functools.partial(pallas_triton.miras_pallas, spec=spec, chunk_size=32, matmul=matmul_mode,
                          tuning=pallas_triton.Tuning(hidden_tile=hidden_tile))
  assert _triton_calls(run, qkv, gates, kw) == 2


def _triton_calls(run, qkv, gates, kw) -> int:
  """Triton kernels in ``run``'s fwd+bwd lowered for an (abstract) H100 from this CPU."""
  grad = jax.grad(_loss(run, jnp.ones(qkv[0].shape)), argnums=(0, 1, 2))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (qkv, gates, kw))
  return lowered_for_h100(grad, *abstract).as_text().count("__gpu$xla.gpu.triton")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize(("impl", "channel", "dtype"), [
    ("pallas_triton", False, jnp.float32), ("pallas_triton_bf16", False, jnp.float32),
    ("pallas_triton_bf16", True, jnp.float32), ("pallas_tiles", False, jnp.float32),
    ("pallas_tiles_bf16", False, jnp.float32), ("pallas_tiles_bf16", True, jnp.float32),
    ("pallas_mosaic_bf16", False, jnp.float32), ("pallas_mosaic_chain_bf16", False, jnp.float32),
    ("pallas_mosaic_chain_bf16", False, jnp.bfloat16)])
def test_pallas_kernels_on_gpu_match_the_flat_path(impl, channel, dtype):
  """The compiled Triton and Mosaic GPU kernels (``pallas_triton``'s, ``pallas_tiles``', ``mosaic_keys``',
  ``mosaic_chain``'s, ``pallas_chain_outputs``') at the layer's head width (d = 64, E = 256, c = 64) against
  ``xla_flat`` in the same matmul precision, through the API: reads, state and the gradients of every input (q, k, v
  in bf16 too: ``pallas_mosaic_chain_bf16`` then chunks them in bf16)."""
  spec = SPECS["moneta"]
  qkv, gates, kw = _inputs(spec, 23, b=2, t=200, h=2, d=64, channel=channel)
  qkv = tuple(x.astype(dtype) for x in qkv)
  flat_impl = "xla_flat_bf16" if impl.endswith("_bf16") else "xla_flat"
  run = lambda impl: functools.partial(api.miras_memory, spec=spec, chunk_size=64, lengths=jnp.array([200, 150]),
                                       implementation=impl)
  weights = jax.random.normal(jax.random.PRNGKey(9), qkv[0].shape)
  (o_f, s_f, _), (o_p, s_p, _) = (run(i)(*qkv, gates, **kw) for i in (flat_impl, impl))
  g_f, g_p = (jax.grad(_loss(run(i), weights), argnums=(0, 1, 2))(qkv, gates, kw) for i in (flat_impl, impl))
  errs = _rel(o_p, o_f), _rel(s_p, s_f), _rel(g_p, g_f)
  print(f"{impl}, {'channel' if channel else 'head'} gates, {jnp.dtype(dtype).name} inputs, on "
        f"{jax.devices()[0].device_kind} vs {flat_impl}: "
        f"max rel error reads {errs[0]:.1e}, "
        f"state {errs[1]:.1e}, grads {errs[2]:.1e}")
  assert max(errs) < (2e-2 if impl.endswith("_bf16") else 1e-4)


def test_causality_within_and_across_chunks():
  spec = SPECS["moneta"]
  qkv, gates, kw = _inputs(spec, 12, t=16, channel=True)
  o = chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=8, **kw)[0]
  for t in (2, 7, 9):  # inside the first chunk, its last token, inside the second
    later = lambda x: x.at[:, t + 1:].add(jax.random.normal(jax.random.PRNGKey(t), x[:, t + 1:].shape))
    o2 = chunked.miras_chunked(*(later(x) for x in qkv), gates._replace(eta=later(gates.eta)), spec=spec,
                               chunk_size=8, **kw)[0]
    np.testing.assert_array_equal(o[:, :t + 1], o2[:, :t + 1])
    assert float(jnp.max(jnp.abs(o[:, t + 1:] - o2[:, t + 1:]))) > 1e-3


def test_remat_and_lengths():
  """jax.checkpoint of the chunk body changes nothing; padding past ``lengths`` changes no real token or state."""
  spec = SPECS["yaad"]
  qkv, gates, kw = _inputs(spec, 13, t=12, channel=True)
  run = lambda remat: lambda qkv, gates, kw: chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=4,
                                                                   remat=remat, **kw)
  w = jax.random.normal(jax.random.PRNGKey(3), qkv[0].shape)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0] * w)
  assert _rel(jax.grad(loss(run(True)), argnums=(0, 1, 2))(qkv, gates, kw),
              jax.grad(loss(run(False)), argnums=(0, 1, 2))(qkv, gates, kw)) < 1e-6
  o_full, s_full, _ = chunked.miras_chunked(*(x[:, :9] for x in qkv), jax.tree.map(lambda x: x[:, :9], gates),
                                            spec=spec, chunk_size=4, **kw)
  o_pad, s_pad, _ = chunked.miras_chunked(*qkv, gates, spec=spec, chunk_size=4, lengths=jnp.array([9, 9]), **kw)
  assert _rel(o_pad[:, :9], o_full) < 1e-6 and _rel(s_pad, s_full) < 1e-6


@pytest.mark.parametrize("spec", ["...i,oi->...o", "ti,si->ts", "so,si->oi", "...o,oi->...i"])
def test_bfloat16_matmul_derivatives_match_float32_autodiff(spec):
  """The bf16 matmul's custom vjp (cotangent rounded to bf16, bf16 × bf16 products) against float32 jax.grad."""
  ka, kb, kg = jax.random.split(jax.random.PRNGKey(9), 3)
  shapes = {"...i,oi->...o": ((2, 5, 16), (32, 16)), "ti,si->ts": ((8, 16), (8, 16)),
            "so,si->oi": ((8, 32), (8, 16)), "...o,oi->...i": ((2, 5, 32), (32, 16))}[spec]
  a, b = jax.random.normal(ka, shapes[0]), jax.random.normal(kb, shapes[1])
  w = jax.random.normal(kg, jnp.einsum(spec, a, b).shape)
  grads = [jax.grad(lambda a, b: jnp.sum(matmul(spec, a, b, mode) * w), argnums=(0, 1))(a, b)
           for mode in ("bfloat16", "float32")]
  err = _rel(grads[0], grads[1])
  print(f"{spec}: bf16 matmul gradients vs float32, max rel error {err:.1e}")
  assert err < 2e-2
  with pytest.raises(ValueError, match="appears in one operand only"):
    jax.grad(lambda x: jnp.sum(matmul("ij,k->k", x, jnp.ones(3), "bfloat16")))(jnp.ones((2, 2)))


@pytest.mark.parametrize("name", ["moneta", "titans"])
def test_bfloat16_matmuls_stay_close_to_the_float32_reference(name):
  spec = SPECS[name]
  qkv, gates, kw = _inputs(spec, 15, t=40, channel=not spec.momentum)
  run = lambda impl: lambda qkv, gates, kw: api.miras_memory(*qkv, gates, spec=spec, chunk_size=16,
                                                             implementation=impl, **kw)
  w = jax.random.normal(jax.random.PRNGKey(3), qkv[0].shape)
  grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a)[0] * w), argnums=(0, 1, 2))(qkv, gates, kw)
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))))
  rel = lambda x, y: norm(jax.tree.map(jnp.subtract, x, y)) / norm(y)  # ‖Δ‖ / ‖ref‖ over the whole pytree
  errs = (rel(run("xla_chunked_bf16")(qkv, gates, kw)[0], run("reference")(qkv, gates, kw)[0]),
          rel(grad(run("xla_chunked_bf16")), grad(run("xla_chunked"))))
  print(f"{name}: bf16 matmuls vs float32, relative error (norm) outputs {errs[0]:.1e}, grads {errs[1]:.1e}")
  assert errs[0] < 2e-2 and errs[1] < 1e-1  # bf16 keeps ~3 digits (measured: Moneta 0.8% / 1.9%, Titans 0.9% / 7.1%)


def test_api_dispatch_and_errors():
  spec = SPECS["yaad"]
  qkv, gates, kw = _inputs(spec, 14, t=6)
  o_api = api.miras_memory(*qkv, gates, spec=spec, chunk_size=4, **kw)[0]
  o_ref = api.miras_memory(*qkv, gates, spec=spec, chunk_size=4, implementation="reference", **kw)[0]
  assert _rel(o_api, o_ref) < 1e-5
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.miras_memory(*qkv, gates, spec=spec, implementation="triton", **kw)
  titans = SPECS["titans"]
  qkv, gates, kw = _inputs(titans, 14, t=6, channel=True)
  with pytest.raises(ValueError, match="momentum needs per-head gates"):
    api.miras_memory(*qkv, gates, spec=titans, implementation="xla_chunked", **kw)
  linear = SPECS["elastic_linear"]
  qkv, gates, kw = _inputs(linear, 14, t=6)
  with pytest.raises(ValueError, match="'xla_flat' cannot run: it covers the MLP memory only"):
    api.miras_memory(*qkv, gates, spec=linear, implementation="xla_flat", **kw)
  qkv, gates, kw = _inputs(titans, 14, t=6)
  with pytest.raises(ValueError, match="'xla_flat_bf16' cannot run: it has no momentum"):
    api.miras_memory(*qkv, gates, spec=titans, implementation="xla_flat_bf16", **kw)
  with pytest.raises(ValueError, match="'xla_split' cannot run: it has no momentum"):
    api.miras_memory(*qkv, gates, spec=titans, implementation="xla_split", **kw)
  qkv, gates, kw = _inputs(SPECS["moneta"], 14, t=10, channel=True)
  split, flat_ = (api.miras_memory(*qkv, gates, spec=SPECS["moneta"], chunk_size=4, implementation=i, **kw)[0]
                  for i in ("xla_split", "xla_flat"))
  assert _rel(split, flat_) < 1e-6
  with pytest.raises(ValueError, match="key_scan and chunk_reads replace parts of the split path"):
    flat.miras_flat(*qkv, gates, spec=SPECS["moneta"], chunk_size=4, key_scan=pallas_tiles.KeyScan(), **kw)
  with pytest.raises(ValueError, match=r"chunk_reads covers per-head gates \(eta \[\.\.\., 1\]\) only"):
    flat.miras_flat(*qkv, gates, spec=SPECS["moneta"], chunk_size=4, split=True,
                    chunk_reads=pallas_reads.ChunkReads(), **kw)
  with pytest.raises(ValueError, match="ReadTiling.num_stages must be positive, got 0"):
    pallas_reads.ReadTiling(num_stages=0)
  elastic = FAST_PATH_SPECS["elastic_mlp"]
  qkv, gates, kw = _inputs(elastic, 14, t=10)
  with pytest.raises(ValueError, match="it needs a retention without a chunk-end map, not ElasticNet"):
    flat.miras_flat(*qkv, gates, spec=elastic, chunk_size=4, split=True,
                    chunk_reads=pallas_reads.ChunkReads(), **kw)
  if jax.default_backend() != "gpu":
    for implementation in ("pallas_triton", "pallas_tiles"):
      with pytest.raises(ValueError, match=f"'{implementation}' cannot run: its kernels need a GPU"):
        api.miras_memory(*qkv, gates, spec=spec, implementation=implementation, **kw)
  moneta = SPECS["moneta"]
  kernels = functools.partial(pallas_triton.miras_pallas, chunk_size=16, interpret=True)
  qkv, gates, kw = _inputs(moneta, 14, t=6, d=8)
  with pytest.raises(ValueError, match="head dim must be a power of two >= 16"):
    kernels(*qkv, gates, spec=moneta, **kw)
  qkv, gates, kw = _inputs(moneta, 14, t=6, d=16)
  with pytest.raises(ValueError, match=r"hidden_tile must be a power of two >= 16 \(Triton tiles\), got 8"):
    kernels(*qkv, gates, spec=moneta, tuning=pallas_triton.Tuning(hidden_tile=8), **kw)
  with pytest.raises(ValueError, match="the tiled Pallas Miras kernels cannot run this memory: hidden_tile must"):
    pallas_tiles.miras_tiles(*qkv, gates, spec=moneta, chunk_size=16,
                             tiling=pallas_tiles.Tiling(hidden_tile=8, interpret=True), **kw)
  for spec, why in ((SPECS["yaad_clip"], "no inner clip"),
                    (FAST_PATH_SPECS["elastic_mlp"], r"no chunk-end map \(ElasticNet\)")):
    qkv, gates, kw = _inputs(spec, 14, t=6, d=16)
    with pytest.raises(ValueError, match=f"the Pallas Miras kernels cannot run this memory: they have {why}"):
      kernels(*qkv, gates, spec=spec, **kw)
  with pytest.raises(ValueError, match="momentum needs Decay"):
    MemorySpec(MLPMemory(), biases.L2(), LqNorm(4.0), momentum=True)
