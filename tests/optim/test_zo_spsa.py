"""ZO-SPSA on one worker (spec oracles 10-13, 16): the estimator on quadratics, seeded directions, exact
perturbation, the fused update against its plain reference, weight decay, precision, and mezo_sgd = one round."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim.zo.directions import direction, leaf_ids
from optim.zo.perturb import call_perturbed
from optim.zo.rounds import (RoundSpec, apply_round, apply_round_reference, perturbed, perturbed_loss,
                             projected_gradients, zo_round, zo_step)
from optim.zo.spsa import mezo_sgd, scale_by_spsa
from research.models import ModelConfig
from research.train import TrainConfig, build_model
from research.train.steps import lm_loss


def _quadratic(d: int, seed: int = 0):
  """L(θ) = ½θᵀAθ + bᵀθ over a two-leaf tree (a [d//2] vector and a matrix holding the rest), A SPD."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(d, d))
  a = jnp.asarray(m @ m.T / d + np.eye(d), jnp.float32)
  b = jnp.asarray(rng.normal(size=d), jnp.float32)
  first = d // 2
  rest = d - first
  params = {"v": jnp.asarray(rng.normal(size=first), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(rest, 1)), jnp.float32)}
  flat = lambda p: jnp.concatenate([p["v"], p["w"].reshape(-1)])
  loss = lambda p: 0.5 * flat(p) @ a @ flat(p) + b @ flat(p)
  return params, loss, flat


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere"])
@pytest.mark.parametrize("eps", [1e-1, 1.0])
def test_central_difference_on_a_quadratic_is_the_directional_derivative_for_any_eps(distribution, eps):
  params, loss, _ = _quadratic(10)
  spec = RoundSpec(eps=eps, num_samples=3, distribution=distribution)
  root = jax.random.key(3)
  g, _ = jax.jit(lambda p: projected_gradients(lambda q: (loss(q), ()), p, root, 5, 2, spec))(params)
  for j in range(3):
    z = direction(params, root, 5, 2, j, distribution)
    _, expected = jax.jvp(loss, (params,), (z,))
    np.testing.assert_allclose(float(g[j]), float(expected), rtol=2e-4, atol=2e-4)


def _spsa_estimates(params, loss, distribution: str, num_samples: int, trials: int):
  """[trials, d]: scale_by_spsa's ĝ at steps 0 .. trials − 1 (each a fresh set of directions), flattened."""
  tx = scale_by_spsa(eps=1e-2, num_samples=num_samples, distribution=distribution, seed=11)
  state = tx.init(params)

  def one(t):
    updates, _ = tx.update(None, state._replace(count=t), params, obj_fn=loss)
    return jnp.concatenate([updates["v"], updates["w"].reshape(-1)])

  return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(trials, dtype=jnp.int32)), np.float64)


def test_spsa_mean_over_many_seeds_matches_the_gradient():
  params, loss, flat = _quadratic(10)
  grad = np.asarray(flat(jax.grad(loss)(params)), np.float64)
  trials = 4000
  estimates = _spsa_estimates(params, loss, "gaussian", 1, trials)
  error = np.linalg.norm(estimates.mean(0) - grad)
  scale = np.sqrt((grad.size + 1) / trials) * np.linalg.norm(grad)  # the estimator's standard error
  print(f"|mean ĝ − ∇L| = {error:.4f}, √((d+1)/N)·|∇L| = {scale:.4f}")
  assert error < 3 * scale
  # ... and the mean of a few samples does not (the test can tell a right mean from a wrong one).
  assert np.linalg.norm(estimates[:4].mean(0) - grad) > 3 * scale


@pytest.mark.parametrize("num_samples", [1, 4])
def test_second_moment_follows_lemma_2(num_samples):
  params, loss, flat = _quadratic(10)
  grad_sq = float(np.sum(np.asarray(flat(jax.grad(loss)(params)), np.float64) ** 2))
  d, trials = 10, 20000
  found = {}
  for distribution, extra in (("sphere", -1), ("gaussian", +1)):
    estimates = _spsa_estimates(params, loss, distribution, num_samples, trials)
    found[distribution] = np.mean(np.sum(estimates ** 2, axis=1)) / grad_sq
    expected = (d + num_samples + extra) / num_samples
    print(f"{distribution} n={num_samples}: E|ĝ|²/|∇L|² = {found[distribution]:.3f}, Lemma 2: {expected:.3f}")
    assert found[distribution] == pytest.approx(expected, rel=0.06)
  assert found["sphere"] < found["gaussian"]


def test_directions_are_stable_when_a_leaf_is_added_and_identical_under_jit():
  params, _, _ = _quadratic(10)
  root = jax.random.key(0)
  z = direction(params, root, 4, 1, 2, "gaussian")
  bigger = {**params, "extra": jnp.zeros((3, 3))}
  z_bigger = direction(bigger, root, 4, 1, 2, "gaussian")
  z_jit = jax.jit(lambda p: direction(p, root, 4, 1, 2, "gaussian"))(params)
  for name in params:
    np.testing.assert_array_equal(z[name], z_bigger[name])
    np.testing.assert_array_equal(z[name], z_jit[name])
  assert not np.array_equal(z["v"], direction(params, root, 4, 2, 2, "gaussian")["v"])  # another worker
  assert len(set(jax.tree.leaves(leaf_ids(bigger)))) == 3


def _lm(layers=("attn",)):
  cfg = TrainConfig(model=ModelConfig(layers=layers, d_model=32, num_heads=2, num_kv_heads=2), seq_len=16)
  model = build_model(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, size=(2, 17)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  return model, lambda p: lm_loss(model.merge(p), batch, 0.01)


def test_perturbed_forward_built_per_read_equals_the_materialised_perturbation_bitwise():
  model, loss = _lm(("attn", "attn"))
  params = model.params
  ids, key = leaf_ids(params), jax.random.key(5)
  scale = jnp.float32(1.0)
  for signed_eps in (1e-3, -1e-3):
    lazy = jax.jit(lambda p, s=signed_eps: perturbed_loss(loss, p, ids, key, scale, s, "gaussian"))(params)
    eager = jax.jit(lambda p, s=signed_eps: loss(perturbed(p, ids, key, scale, s, "gaussian")))(params)
    assert float(lazy[0]) == float(eager[0])
    assert float(lazy[0]) != float(jax.jit(loss)(params)[0])
  # A leaf read by two equations (the tied embedding: lookup and output head) is perturbed identically at both.
  flags = []
  call_perturbed(lambda p: jnp.sum(p["a"]) + jnp.sum(p["a"] * 2.0), {"a": jnp.ones(3)},
                 lambda i, x, tok: flags.append(i) or x + tok, jnp.float32(1.0))
  assert flags == [0, 0]


def test_perturb_then_restore_is_bit_identical_in_f32():
  model, loss = _lm()
  params = model.params
  spec = RoundSpec(eps=1e-3, num_samples=2)
  root = jax.random.key(1)
  step = zo_step(lambda p, batch: loss(p), lambda t: 0.0, spec, seed=1)  # the donated one-worker step, lr = 0
  state, out = step({"params": jax.tree.map(jnp.copy, params), "round": jnp.int32(0)}, None)
  jax.tree.map(np.testing.assert_array_equal, state["params"], params)  # θ comes back bit for bit ...
  assert np.asarray(out.codes).any() and int(state["round"]) == 1  # ... although the two evaluations differed
  # MeZO's in-place cycle θ + εz − 2εz + εz does not restore θ exactly (MeZO issue #42).
  z = direction(params, root, 0, 0, 0, "gaussian")
  cycled = jax.tree.map(lambda p, d: ((p + 1e-3 * d) - 2e-3 * d) + 1e-3 * d, params, z)
  changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(cycled),
                                                                             jax.tree.leaves(params)))
  print(f"in-place perturb/unperturb changed {changed} of {sum(p.size for p in jax.tree.leaves(params))} floats")
  assert changed > 0


@pytest.mark.parametrize("distribution,normalize", [("gaussian", "mean"), ("rademacher", "sqrt"),
                                                    ("sphere", "mean")])
def test_fused_update_equals_the_plain_reference(distribution, normalize):
  model, _ = _lm()
  params = model.params
  spec = RoundSpec(num_samples=3, distribution=distribution, normalize=normalize, weight_decay=0.1)
  rng = np.random.default_rng(4)
  values = rng.normal(size=(4, 3)).astype(np.float32)
  active = np.array([True, False, True, True])
  root, lr = jax.random.key(9), np.float32(0.05)
  fused = jax.jit(lambda p: apply_round(p, jnp.asarray(values), jnp.asarray(active), lr, root, jnp.int32(7), spec))
  got = fused(params)
  want = apply_round_reference(params, values, active, lr, root, 7, spec)
  if distribution == "sphere":  # √d/‖g‖ sums every leaf's squares: summation order may differ in the last bit
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  else:
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # The inactive worker's values are ignored: changing them changes nothing.
  values[1] = 1e3
  jax.tree.map(np.testing.assert_array_equal,
               jax.jit(lambda p: apply_round(p, jnp.asarray(values), jnp.asarray(active), lr, root, jnp.int32(7),
                                             spec))(params), got)


def test_weight_decay_skips_vectors():
  params = {"w": jnp.full((3, 2), 2.0), "norm": jnp.full((2,), 2.0)}
  spec = RoundSpec(num_samples=1, weight_decay=0.5)
  zero = jnp.zeros((1, 1), jnp.float32)
  out = apply_round(params, zero, jnp.ones(1, bool), jnp.float32(0.1), jax.random.key(0), jnp.int32(0), spec)
  np.testing.assert_allclose(out["w"], 2.0 - 0.1 * 0.5 * 2.0)
  np.testing.assert_array_equal(out["norm"], params["norm"])
  tx = mezo_sgd(0.1, num_samples=1, weight_decay=0.5)
  updates, _ = tx.update(None, tx.init(params), params, obj_fn=lambda p: 0.0 * sum(jnp.sum(x) for x in
                                                                                    jax.tree.leaves(p)))
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2.0)
  np.testing.assert_array_equal(updates["norm"], 0.0)


def test_low_precision_params_raise_unless_allowed():
  params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
  with pytest.raises(ValueError, match="bfloat16.*allow_low_precision"):
    scale_by_spsa().init(params)
  state = scale_by_spsa(allow_low_precision=True).init(params)
  assert state.projected_grads.shape == (1,)


def test_f32_codec_round_on_one_worker_equals_mezo_sgd():
  """Oracle 16: the ``f32`` codec with ``mean`` on 1 worker × S samples is ``mezo_sgd(num_samples=S)``."""
  model, loss = _lm()
  params = model.params
  spec = RoundSpec(eps=1e-3, num_samples=4, codec="f32", weight_decay=0.1)
  root, lr = jax.random.key(2), 0.05
  ours, out = jax.jit(lambda p: zo_round(p, loss, root, jnp.int32(3), 0, jnp.float32(lr), jnp.ones(1, bool), spec,
                                         lambda codes: codes[None]))(params)
  tx = mezo_sgd(lr, eps=1e-3, num_samples=4, weight_decay=0.1, seed=2)
  state = tx.init(params)
  state = (state[0]._replace(count=jnp.int32(3)), *state[1:])
  updates, state = jax.jit(lambda p, s: tx.update(None, s, p, obj_fn=lambda q: loss(q)[0]))(params, state)
  reference = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, reference)
  np.testing.assert_array_equal(np.asarray(out.codes).view(np.float32)[0, :, 0], state[0].projected_grads)


def test_donated_zo_step_memory_is_that_of_a_forward_pass():
  """Oracle 13 on one worker: XLA's peak of the donated ``zo_step`` vs ``lm_loss`` on the same model and batch."""
  cfg = TrainConfig(model=ModelConfig(layers=("attn", "attn"), d_model=64, num_heads=4, num_kv_heads=4), seq_len=128)
  model = build_model(cfg, abstract=True)
  tokens = jax.ShapeDtypeStruct((16, 128), jnp.int32)
  batch = {"inputs": tokens, "labels": tokens}
  loss = lambda p, b: lm_loss(model.merge(p), b, 0.01)
  forward = jax.jit(loss).lower(model.params, batch).compile().memory_analysis()
  state = {"params": model.params, "round": jax.ShapeDtypeStruct((), jnp.int32)}
  step = zo_step(loss, lambda t: 1e-4, RoundSpec()).lower(state, batch).compile().memory_analysis()
  peak = lambda m: m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  params_bytes = sum(4 * int(np.prod(p.shape)) for p in jax.tree.leaves(model.params))
  print(f"forward {peak(forward) / 2**20:.2f} MiB, zo_step {peak(step) / 2**20:.2f} MiB, "
        f"params {params_bytes / 2**20:.2f} MiB")
  assert step.alias_size_in_bytes >= params_bytes  # θ is updated in place
  assert peak(step) <= 1.1 * peak(forward)
  assert peak(step) - peak(forward) < params_bytes / 2  # no second copy of θ: per-leaf working sets only
