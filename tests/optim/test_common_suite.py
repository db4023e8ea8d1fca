"""Shared conformance suite for every optimizer in ``optim/`` (after optax ``contrib/_common_test.py``).

To join, append an :class:`Case` to ``CASES``. Each case runs: toy convergence, ``inject_hyperparams``
equality, schedule == constant learning rate, ``MultiSteps`` (zeros on non-final steps, or a raise for optimizers
that cannot accumulate), ``ShapeDtypeStruct`` init, dtype preservation (float32 and bfloat16) and sharding
stability on the 8 fake CPU devices of ``tests/conftest.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim.galore import galore
from optim.natural_galore import natural_galore
from optim.zo.spsa import mezo_sgd


@dataclasses.dataclass(frozen=True)
class Case:
  """One optimizer configuration under test.

  Attributes:
    name: test id.
    factory: ``factory(learning_rate=..., **kwargs) -> optax.GradientTransformation``.
    kwargs: arguments besides ``learning_rate``.
    learning_rate: used for convergence and the other checks.
    static_args: arguments ``inject_hyperparams`` must not turn into arrays (ranks, gaps, history sizes).
    multisteps: ``False`` for optimizers that must raise under ``optax.MultiSteps``.
    steps: convergence steps on the toy quadratic.
    extra_args: ``fn(objective) -> dict`` of extra ``update`` keyword arguments (e.g. ``obj_fn`` for ZO).
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  learning_rate: float = 0.1
  static_args: tuple[str, ...] = ()
  multisteps: bool = True
  steps: int = 600
  extra_args: Callable[[Callable[[Any], jax.Array]], dict[str, Any]] = lambda objective: {}


_GALORE_STATIC = ("rank", "update_proj_gap")
CASES = [
    Case("galore", galore, dict(rank=2, update_proj_gap=20, scale=1.0), static_args=_GALORE_STATIC),
    Case("natural_galore", natural_galore, dict(rank=2, update_proj_gap=20, scale=1.0, history=4, damping=1.0),
         static_args=_GALORE_STATIC + ("history",)),
    # ZO: central differences are exact on the quadratic for any ε, and ε = 1 keeps the float noise of L(θ ± εz),
    # amplified by 1/ε, below the sharded-vs-unsharded tolerance.
    Case("mezo_sgd", mezo_sgd, dict(num_samples=16, eps=1.0, allow_low_precision=True), learning_rate=0.05,
         static_args=("num_samples", "seed"), multisteps=False, extra_args=lambda objective: {"obj_fn": objective}),
]


def _toy(dtype=jnp.float32) -> tuple[Any, Any, Callable[[Any], jax.Array]]:
  """Quadratic over an LM-shaped tree: two projectable matrices, a norm vector and an embedding."""
  keys = jax.random.split(jax.random.key(0), 4)
  target = {
      "blocks": {0: {"mixer": {"q_proj": {"kernel": jax.random.normal(keys[0], (8, 6))}},
                     "mlp": {"up": {"kernel": jax.random.normal(keys[1], (6, 10))}},
                     "norm": {"weight": jax.random.normal(keys[2], (6,))}}},
      "embed": {"embedding": jax.random.normal(keys[3], (5, 6))},
  }
  target = jax.tree.map(lambda x: x.astype(dtype), target)
  params = jax.tree.map(jnp.zeros_like, target)

  def objective(p):
    return sum(jnp.sum(jnp.square((a - b).astype(jnp.float32))) for a, b in
               zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True))

  return params, target, objective


def _make(case: Case, **overrides) -> optax.GradientTransformation:
  return case.factory(**{"learning_rate": case.learning_rate, **case.kwargs, **overrides})


def _step_fn(tx, objective, case):
  def step(params, state):
    grads = jax.grad(objective)(params)
    updates, state = tx.update(grads, state, params, **case.extra_args(objective))
    return optax.apply_updates(params, updates), state

  return step


ids = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_converges_on_toy_quadratic(case):
  params, target, objective = _toy()
  tx = case.factory(**{"learning_rate": optax.cosine_decay_schedule(case.learning_rate, case.steps, 0.01),
                       **case.kwargs})
  step = _step_fn(tx, objective, case)
  final, _ = jax.jit(lambda p, s: jax.lax.scan(lambda c, _: (step(*c), None), (p, s), length=case.steps)[0])(
      params, tx.init(params))
  pairs = zip(jax.tree.leaves(final), jax.tree.leaves(target), strict=True)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
  print(f"{case.name}: max |param - optimum| after {case.steps} steps = {err:.2e}")
  assert np.isfinite(err) and err < 3e-2


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_inject_hyperparams_matches(case):
  params, _, objective = _toy()
  plain = _make(case)
  injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(
      learning_rate=case.learning_rate, **case.kwargs)
  grads = jax.grad(objective)(params)
  extra = case.extra_args(objective)
  s_plain, s_inj = plain.init(params), injected.init(params)
  for _ in range(2):
    u_plain, s_plain = jax.jit(lambda g, s, p: plain.update(g, s, p, **extra))(grads, s_plain, params)
    u_inj, s_inj = jax.jit(lambda g, s, p: injected.update(g, s, p, **extra))(grads, s_inj, params)
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in jax.tree.leaves(u_inj)]),
                               np.concatenate([np.ravel(x) for x in jax.tree.leaves(u_plain)]), rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s_inj.inner_state, s_plain)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_schedule_equals_constant_learning_rate(case):
  params, _, objective = _toy()
  results = []
  for lr in (case.learning_rate, optax.constant_schedule(case.learning_rate)):
    tx = case.factory(learning_rate=lr, **case.kwargs)
    step = jax.jit(_step_fn(tx, objective, case))
    p, s = params, tx.init(params)
    for _ in range(5):
      p, s = step(p, s)
    results.append(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *results)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_multisteps(case):
  params, _, objective = _toy()
  tx = optax.MultiSteps(_make(case), every_k_schedule=4)
  grads = jax.grad(objective)(params)
  state = jax.jit(tx.init)(params)
  if not case.multisteps:
    with pytest.raises(ValueError):
      tx.update(grads, state, params)
    return
  for k in range(4):
    updates, state = jax.jit(tx.update)(grads, state, params)
    leaves = jax.tree.leaves(updates)
    if k < 3:
      assert all(not np.any(np.asarray(u)) for u in leaves)
  assert any(np.any(np.asarray(u)) for u in leaves)  # the 4th call applies the accumulated update


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_init_on_shape_dtype_struct(case):
  params, _, _ = _toy()
  tx = _make(case)
  abstract = jax.eval_shape(tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  concrete = tx.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
    assert (a.shape, a.dtype) == (c.shape, c.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_preserves_dtype(case, dtype):
  params, _, objective = _toy(dtype)
  tx = _make(case)
  state0 = tx.init(params)
  step = jax.jit(_step_fn(tx, objective, case))
  p, s = step(params, state0)
  p, s = step(p, s)
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True))
  assert [x.dtype for x in jax.tree.leaves(s)] == [x.dtype for x in jax.tree.leaves(state0)]
  assert step._cache_size() == 1, "the second step recompiled: state dtypes or structure drifted"
  assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_sharded_state_is_stable_on_8_devices(case):
  mesh = jax.make_mesh((8,), ("x",))
  params, _, objective = _toy()
  tx = _make(case)
  row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.tree.map(lambda x: jax.device_put(x, row_sharded if x.shape[0] % 8 == 0 else replicated), params)
  step = jax.jit(_step_fn(tx, objective, case))
  p, s = sharded, jax.jit(tx.init)(sharded)
  shardings, compilations = [], []
  for _ in range(4):
    p, s = step(p, s)
    shardings.append([x.sharding for x in jax.tree.leaves(s)])
    compilations.append(step._cache_size())
  # Init places fresh state on one device, so the first steps may recompile; after that nothing may change.
  assert shardings[2] == shardings[3]
  assert compilations[2] == compilations[3], f"a new compilation per step: {compilations}"
  p_ref, s_ref = params, tx.init(params)
  ref_step = jax.jit(_step_fn(tx, objective, case))
  for _ in range(4):
    p_ref, s_ref = ref_step(p_ref, s_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p, p_ref)
