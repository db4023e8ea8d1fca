"""Gated delta rule kernels: chunked WY form and Pallas scan vs the token recurrence (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels.gated_delta import Tuning, api, chunked, reference, state_scan, triangular, wy


def _inputs(seed, b=2, t=100, h=2, dk=16, dv=32, decay_scale=1.0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, t, h, dk))).astype(dtype)
  k = unit(jax.random.normal(ks[1], (b, t, h, dk))).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
  g = decay_scale * jax.nn.log_sigmoid(jax.random.uniform(ks[3], (b, t, h))) / 16
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  s0 = jax.random.normal(ks[5], (b, h, dk, dv))
  return q, k, v, g, beta, s0


def _max_err(x, y):
  err = float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
  assert np.isfinite(err)
  return err


def _rel(x, y):
  return _max_err(x, y) / float(jnp.max(jnp.abs(y)))


def _chunked(chunk_size, kernel_impl="xla"):
  return lambda *a, **kw: chunked.gated_delta_rule_chunked(*a, chunk_size=chunk_size, kernel_impl=kernel_impl,
                                                           **kw)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("t,decay_scale", [(100, 1.0), (257, 1.0), (100, 128.0)])
def test_chunked_matches_recurrence(chunk_size, t, decay_scale):
  q, k, v, g, beta, s0 = _inputs(t + chunk_size, t=t, decay_scale=decay_scale)
  o_ref, s_ref = reference.gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0)
  o, s = _chunked(chunk_size)(q, k, v, g, beta, initial_state=s0)
  errs = _max_err(o, o_ref), _max_err(s, s_ref)
  print(f"C={chunk_size} t={t} decay×{decay_scale}: max |Δo|={errs[0]:.2e} max |ΔS|={errs[1]:.2e}")
  assert max(errs) <= 1e-5


def test_unit_lower_inverse():
  # A as the chunked form builds it: β_r k_r·k_s (r > s) for unit keys in a small dim (strongly correlated).
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 64, 8))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(2), (3, 64, 1)))
  a = jnp.tril(beta * (k @ jnp.swapaxes(k, -1, -2)), -1)
  inv = triangular.unit_lower_inverse(a)
  residual = _max_err(inv @ (jnp.eye(64) + a), jnp.eye(64))
  print(f"||T(I+A) - I||_max = {residual:.2e}")
  assert residual <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_wy_inverse_exact_for_identical_keys(impl):
  """A chunk of (nearly) identical keys with β≈1 and no decay: A = β·(all-ones strictly lower). Its inverse has
  entries ≤ 1, but the Neumann product (I+N)(I+N²)(I+N⁴)… forms powers with binomially large entries (~1e17 at
  C = 64) whose cancellation left float32 errors ~1e10 — the NaN that stopped MoM training on GPU."""
  k = jnp.ones((1, 1, 1, 64, 16)) / 4.0 + 1e-3 * jax.random.normal(jax.random.PRNGKey(5), (1, 1, 1, 64, 16))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(jax.random.PRNGKey(6), (1, 1, 1, 64, 16))
  beta, gamma = jnp.full((1, 1, 1, 64), 0.99), jnp.zeros((1, 1, 1, 64))
  a = jnp.tril(beta[..., :, None] * (k @ jnp.swapaxes(k, -1, -2)), -1)
  solve = lambda rhs: jax.scipy.linalg.solve_triangular(jnp.eye(64) + a, rhs, lower=True, unit_diagonal=True)
  w, u = wy.wy_representation(k, v, beta, gamma, impl=impl)
  errs = _max_err(w, solve(k * beta[..., None])), _max_err(u, solve(v * beta[..., None]))
  print(f"{impl}: max |Δw|, |Δu| = {errs[0]:.2e}, {errs[1]:.2e}")
  assert max(errs) <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_gradients_match_reference(impl):
  q, k, v, g, beta, s0 = _inputs(7, t=70, decay_scale=8.0)

  def loss(fn, *args):
    o, s = fn(*args[:5], initial_state=args[5])
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(s))

  argnums = tuple(range(6))
  g_ref = jax.grad(lambda *a: loss(reference.gated_delta_rule_reference, *a), argnums)(q, k, v, g, beta, s0)
  g_chk = jax.grad(lambda *a: loss(_chunked(16, impl), *a), argnums)(q, k, v, g, beta, s0)
  for name, x, y in zip(("dq", "dk", "dv", "dg", "dbeta", "ds0"), g_chk, g_ref):
    rel = _rel(x, y)
    print(f"{impl} {name}: max rel err {rel:.2e}")
    assert rel <= 1e-4, name


def test_wy_backward_matches_autodiff_of_triangular_solve():
  """The analytic WY backward (xla and Pallas forward) vs jax.grad through a plain triangular solve."""
  ks = jax.random.split(jax.random.PRNGKey(12), 5)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  k, v = unit(jax.random.normal(ks[0], (1, 2, 3, 16, 16))), jax.random.normal(ks[1], (1, 2, 3, 16, 32))
  beta = jax.nn.sigmoid(jax.random.normal(ks[2], (1, 2, 3, 16)))
  gamma = jnp.cumsum(jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, 2, 3, 16))), -1)
  probe_w, probe_u = jax.random.normal(ks[4], (2, 1, 2, 3, 16, 32))
  probe_w = probe_w[..., :16]

  def naive(k, v, beta, gamma):
    a = jnp.tril(beta[..., :, None] * (k @ jnp.swapaxes(k, -1, -2)) * jnp.exp(
        jnp.tril(gamma[..., :, None] - gamma[..., None, :])), -1)
    eye = jnp.eye(16)
    solve = lambda rhs: jax.scipy.linalg.solve_triangular(eye + a, rhs, lower=True, unit_diagonal=True)
    return solve(k * (beta * jnp.exp(gamma))[..., None]), solve(v * beta[..., None])

  loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0] * probe_w) + jnp.sum(fn(*a)[1] * probe_u)
  g_ref = jax.grad(loss(naive), argnums=(0, 1, 2, 3))(k, v, beta, gamma)
  for impl in ("xla", "pallas_interpret"):
    fn = lambda *a, impl=impl: wy.wy_representation(*a, impl=impl)
    assert max(_max_err(x, y) for x, y in zip(fn(k, v, beta, gamma), naive(k, v, beta, gamma))) <= 1e-5
    g = jax.grad(loss(fn), argnums=(0, 1, 2, 3))(k, v, beta, gamma)
    for name, x, y in zip(("dk", "dv", "dbeta", "dgamma"), g, g_ref):
      print(f"wy {impl} {name}: max rel err {_rel(x, y):.2e}")
      assert _rel(x, y) <= 1e-4, (impl, name)


def test_pallas_kernels_match_xla():
  q, k, v, g, beta, s0 = _inputs(3, t=96, decay_scale=4.0)
  o_x, s_x = _chunked(32, "xla")(q, k, v, g, beta, initial_state=s0)
  o_p, s_p = _chunked(32, "pallas_interpret")(q, k, v, g, beta, initial_state=s0)
  print(f"pallas vs xla scan: {_max_err(o_p, o_x):.2e} {_max_err(s_p, s_x):.2e}")
  assert _max_err(o_p, o_x) <= 1e-5 and _max_err(s_p, s_x) <= 1e-5


def test_split_with_carried_state_equals_one_pass():
  q, k, v, g, beta, s0 = _inputs(4, t=150)
  o_full, s_full = api.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation="xla_chunked")
  cut = 77
  o1, s1 = api.gated_delta_rule(*(x[:, :cut] for x in (q, k, v, g, beta)), initial_state=s0)
  o2, s2 = api.gated_delta_rule(*(x[:, cut:] for x in (q, k, v, g, beta)), initial_state=s1)
  err = max(_max_err(jnp.concatenate([o1, o2], 1), o_full), _max_err(s2, s_full))
  print(f"split at {cut}: {err:.2e}")
  assert err <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_chunk_resets_match_token_recurrence(impl):
  """Packed segments: the chunked state is zeroed at flagged chunk starts exactly as the recurrence's resets."""
  c, t = 16, 90
  q, k, v, g, beta, s0 = _inputs(11, t=t, decay_scale=4.0)
  chunk_resets = jnp.array([[True, False, True, True, False, True], [False, True, False, False, True, False]])
  resets = jnp.zeros((2, t), bool).at[:, ::c].set(chunk_resets)

  def loss(fn, *args, **kw):
    o, s = fn(*args[:5], initial_state=args[5], **kw)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(s)), (o, s)

  grad = lambda fn, **kw: jax.grad(lambda *a: loss(fn, *a, **kw), range(6), has_aux=True)(q, k, v, g, beta, s0)
  g_ref, (o_ref, s_ref) = grad(reference.gated_delta_rule_reference, resets=resets)
  g_chk, (o, s) = grad(_chunked(c, impl), chunk_resets=chunk_resets)
  g_api, (o_api, _) = grad(api.gated_delta_rule, implementation="reference", chunk_size=c, chunk_resets=chunk_resets)
  errs = {"o": _max_err(o, o_ref), "state": _max_err(s, s_ref), "api reference o": _max_err(o_api, o_ref)}
  errs |= {f"d{n}": _rel(x, y) for n, x, y in zip(("q", "k", "v", "g", "beta", "s0"), g_chk, g_ref)}
  print(impl, {n: f"{e:.1e}" for n, e in errs.items()})
  assert max(errs.values()) <= 1e-4 and errs["o"] <= 1e-5 and errs["state"] <= 1e-5
  assert _max_err(g_api[5], g_ref[5]) == 0.0
  assert float(jnp.max(jnp.abs(g_ref[5][0]))) == 0.0  # row 0 resets at token 0: s0 cannot matter


def test_packed_segments_equal_separate_runs():
  """Two sequences packed into one row (each padded to a chunk multiple with identity tokens) run as if alone."""
  c = 16
  q, k, v, g, beta, _ = _inputs(12, b=1, t=64)
  lengths = (21, 40)  # padded to 32 and 48
  separate = [api.gated_delta_rule(*(x[:, s:s + n] for x in (q, k, v, g, beta)), implementation="reference")
              for s, n in zip((0, lengths[0]), lengths)]
  pad = lambda x, n: jnp.pad(x, [(0, 0), (0, -n % c)] + [(0, 0)] * (x.ndim - 2))
  packed = [jnp.concatenate([pad(x[:, s:s + n], n) for s, n in zip((0, lengths[0]), lengths)], axis=1)
            for x in (q, k, v, g, beta)]
  o, final = _chunked(c)(*packed, chunk_resets=jnp.array([[True, False, True, False, False]]))
  err = max(_max_err(o[:, :21], separate[0][0]), _max_err(o[:, 32:72], separate[1][0]),
            _max_err(final, separate[1][1]))
  print(f"packed vs separate: {err:.2e}")
  assert err <= 1e-5


def test_prefill_then_decode_steps_equal_one_pass():
  q, k, v, g, beta, s0 = _inputs(5, t=40)
  o_full, s_full = api.gated_delta_rule(q, k, v, g, beta, initial_state=s0)
  _, state = api.gated_delta_rule(*(x[:, :30] for x in (q, k, v, g, beta)), initial_state=s0)
  outs = []
  for i in range(30, 40):
    o_i, state = api.gated_delta_step(*(x[:, i] for x in (q, k, v, g, beta)), state)
    outs.append(o_i)
  err = max(_max_err(jnp.stack(outs, 1), o_full[:, 30:]), _max_err(state, s_full))
  print(f"prefill+decode vs one pass: {err:.2e}")
  assert err <= 1e-5


def test_identity_padding_and_strong_decay_stay_finite():
  q, k, v, g, beta, s0 = _inputs(6, t=64)
  o, s = _chunked(64)(q, k, v, jnp.full_like(g, -30.0), beta, initial_state=s0)
  assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(s)))
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 20)] + [(0, 0)] * (x.ndim - 2))
  o_pad, s_pad = _chunked(64)(*(pad(x) for x in (q, k, v, g, beta)), initial_state=s0)
  o_ref, s_ref = _chunked(64)(q, k, v, g, beta, initial_state=s0)
  assert _max_err(o_pad[:, :64], o_ref) <= 1e-6 and _max_err(s_pad, s_ref) <= 1e-6


def test_orthonormal_keys_recall_latest_value():
  dk = 16
  keys = jnp.eye(dk)[:4]
  k = jnp.concatenate([keys, keys[:1]])[None, :, None]  # key 0 is rewritten last
  v = jax.random.normal(jax.random.PRNGKey(8), (1, 5, 1, dk))
  zeros = jnp.zeros((1, 5, 1))
  _, s = api.gated_delta_rule(k, k, v, zeros, jnp.ones((1, 5, 1)))
  recalled = jnp.einsum("kv,nk->nv", s[0, 0], keys)
  expected = jnp.concatenate([v[0, 4:5, 0], v[0, 1:4, 0]])
  assert _max_err(recalled, expected) <= 1e-5


def test_bf16_close_to_f32():
  q, k, v, g, beta, s0 = _inputs(9, t=128, dk=32, dv=32)
  o32, s32 = _chunked(64)(q, k, v, g, beta, initial_state=s0)
  o16, s16 = _chunked(64)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), g, beta, initial_state=s0)
  rms = lambda x, y: float(jnp.sqrt(jnp.mean((x.astype(jnp.float32) - y) ** 2) / jnp.mean(y ** 2)))
  print(f"bf16 rel-RMS: o {rms(o16, o32):.2e} state {rms(s16, s32):.2e}")
  assert o16.dtype == jnp.bfloat16 and rms(o16, o32) <= 1e-2 and rms(s16, s32) <= 1e-2


def test_api_dispatch_and_errors():
  q, k, v, g, beta, _ = _inputs(10, t=20)
  o_auto, _ = api.gated_delta_rule(q, k, v, g, beta)
  o_ref, _ = api.gated_delta_rule(q, k, v, g, beta, implementation="reference")
  assert _max_err(o_auto, o_ref) <= 1e-5
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      api.gated_delta_rule(q, k, v, g, beta, implementation="pallas_triton")
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.gated_delta_rule(q, k, v, g, beta, implementation="cuda")
  with pytest.raises(ValueError, match="chunk_size"):
    api.gated_delta_rule(q, k, v, g, beta, chunk_size=48, implementation="xla_chunked")
  with pytest.raises(ValueError, match="scan implementation"):
    state_scan.state_scan(*(jnp.zeros((1, 1, 1, 16, 16)),) * 3, jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 16, 16)),
                          impl="bogus")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_pallas_triton_on_gpu_matches_reference():
  q, k, v, g, beta, s0 = _inputs(11, b=2, t=300, h=4, dk=64, dv=64)
  o_ref, s_ref = reference.gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0)
  o, s = api.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation="pallas_triton")
  assert _rel(o, o_ref) <= 1e-2 and _rel(s, s_ref) <= 1e-2  # Triton f32 dots use tf32
  chunk_resets = jnp.array([[False, True, False, True, True], [True, False, False, True, False]])
  resets = jnp.zeros((2, 300), bool).at[:, ::64].set(chunk_resets)
  o_ref, s_ref = reference.gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, resets=resets)
  o, s = api.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation="pallas_triton",
                              chunk_resets=chunk_resets)
  assert _rel(o, o_ref) <= 1e-2 and _rel(s, s_ref) <= 1e-2


def test_wy_backward_kernel_equals_xla_backward():
  """The fused Pallas WY backward (interpret mode) computes the same four gradients as the batched-XLA one."""
  from layers.kernels.gated_delta import pallas_triton

  ks = jax.random.split(jax.random.PRNGKey(21), 6)
  shape = (2, 2, 3, 16)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  k, v = unit(jax.random.normal(ks[0], shape + (16,))), jax.random.normal(ks[1], shape + (32,))
  beta = jax.nn.sigmoid(jax.random.normal(ks[2], shape))
  gamma = jnp.cumsum(jax.nn.log_sigmoid(jax.random.normal(ks[3], shape)) * 2.0, -1)
  dw, du = jax.random.normal(ks[4], shape + (16,)), jax.random.normal(ks[5], shape + (32,))
  tmat = wy._forward_xla(k, v, beta, gamma)[2]
  got = pallas_triton.wy_backward(k, v, beta, gamma, tmat, dw, du, interpret=True)
  want = wy._backward_xla(k, v, beta, gamma, tmat, dw, du)
  for name, x, y in zip(("dk", "dv", "dbeta", "dgamma"), got, want):
    print(f"wy backward kernel vs xla {name}: max rel err {_rel(x, y):.2e}")
    assert _rel(x, y) <= 1e-5, name


def test_tuning_is_a_static_argument_that_changes_only_the_launch():
  """Two Tuning values trace two programs (no global, no cache clearing) computing the same gradients."""
  q, k, v, g, beta, _ = _inputs(12, t=40)

  def grads(tuning):
    loss = lambda *a: jnp.sum(jnp.sin(chunked.gated_delta_rule_chunked(
        *a, chunk_size=16, kernel_impl="pallas_interpret", tuning=tuning)[0]))
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, beta)

  default, other = grads(Tuning()), grads(Tuning(scan_forward_stages=1, wy_backward_kernel=False))
  errs = [_max_err(a, b) for a, b in zip(default, other)]
  print("Tuning() vs Tuning(stages=1, XLA WY backward): max |Δgrad|", errs)
  assert max(errs) <= 1e-5
  assert hash(Tuning()) == hash(Tuning()) and Tuning() != Tuning(wy_backward_warps=4)
