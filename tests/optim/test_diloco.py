"""(Streaming) DiLoCo pieces on the fake CPU devices, each replica on its own device (spec oracles 18-20, 22).

The per-replica algorithm (``optim.diloco.streaming.DiLoCo``) runs inside ``shard_map`` over a ``diloco`` axis with
every state field stacked per replica, so a test can read each replica's copy of the global params. Replica m
minimises ½‖θ − target[s, m]‖² with fresh targets every step, so replicas drift apart between syncs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from optim.diloco.fragments import FragmentPlan, SyncSchedule
from optim.diloco.streaming import DiLoCo, fingerprint, outer_sgd, replicas_agree
from optim.diloco.wire import FORMATS

AXIS = "diloco"


def _params(seed: int = 0) -> dict:
  """Three layers under ``blocks`` plus an embedding and a norm outside them."""
  keys = jax.random.split(jax.random.key(seed), 8)
  return {"blocks": {i: {"w": jax.random.normal(keys[2 * i], (4, 6)), "b": jax.random.normal(keys[2 * i + 1], (6,))}
                     for i in range(3)},
          "embed": jax.random.normal(keys[6], (5, 6)), "norm": jax.random.normal(keys[7], (6,))}


def _targets(steps: int, replicas: int, seed: int = 1) -> list[dict]:
  keys = jax.random.split(jax.random.key(seed), steps)
  template = _params()
  return [jax.tree.map(lambda x, k=k: 2.0 * jax.random.normal(k, (replicas, *x.shape)), template) for k in keys]


def _loss(params, target):
  return sum(0.5 * jnp.sum(jnp.square(p - t)) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target)))


def _algorithm(replicas, *, sync_every=1, fragments=1, overlap=0, alpha=0.0, outer=None, wire="fp32",
               pattern="strided", params=None):
  plan = FragmentPlan.build(_params() if params is None else params, fragments, pattern=pattern, row_size=8,
                            replicas=replicas)
  return DiLoCo(outer=outer or outer_sgd(), plan=plan, schedule=SyncSchedule(sync_every, fragments, overlap),
                alpha=alpha, wire=FORMATS[wire], axis_name=AXIS, replicas=replicas)


class Runner:
  """Runs ``algorithm`` with ``inner`` on M devices; every state field is stacked [M, ...] on the host side."""

  def __init__(self, algorithm: DiLoCo, inner: optax.GradientTransformation, inner_step=None):
    self.mesh = Mesh(np.asarray(jax.devices()[:algorithm.replicas]), (AXIS,))
    self.algorithm, self.inner = algorithm, inner
    stacked = lambda fn: jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=P(AXIS), out_specs=P(AXIS),
                                               check_vma=False))

    def init(params):
      params = jax.tree.map(lambda x: x[0], params)
      return jax.tree.map(lambda x: x[None], algorithm.init(params, inner.init(params)))

    def default_inner_step(target):
      def inner_step(local, inner_state):
        grads = jax.grad(_loss)(local, target)
        updates, inner_state = inner.update(grads, inner_state, local)
        return optax.apply_updates(local, updates), inner_state, {"loss": _loss(local, target)}
      return inner_step

    def step(state, target):
      state, target = jax.tree.map(lambda x: x[0], (state, target))
      state, metrics = algorithm.step(state, (inner_step or default_inner_step)(target))
      return jax.tree.map(lambda x: x[None], (state, metrics))

    self._init, self._step = stacked(init), stacked(step)

  def put(self, tree):
    return jax.device_put(tree, NamedSharding(self.mesh, P(AXIS)))

  def init(self, params, per_replica: bool = False):
    stacked = params if per_replica else jax.tree.map(lambda x: jnp.stack([x] * self.algorithm.replicas), params)
    return self._init(self.put(stacked))

  def run(self, state, targets):
    """All steps; returns the final state and [(state, metrics) after each step] on the host."""
    history = []
    for target in targets:
      state, metrics = self._step(state, self.put(target))
      history.append(jax.device_get((state, metrics)))
    return state, history


def _tree_close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol), a, b)


def _replica(tree, m):
  return jax.tree.map(lambda x: np.asarray(x)[m], tree)


# -- oracle 18: one replica is lookahead -----------------------------------------------------------------------------

def test_one_replica_with_plain_outer_sgd_equals_optax_lookahead():
  k, outer_lr, steps = 3, 0.5, 10
  inner = optax.adam(0.05)
  runner = Runner(_algorithm(1, sync_every=k, outer=outer_sgd(outer_lr, momentum=0.0)), inner)
  targets = _targets(steps, 1)
  _, history = runner.run(runner.init(_params()), targets)

  look = optax.lookahead(inner, sync_period=k, slow_step_size=outer_lr)
  params = optax.LookaheadParams.init_synced(_params())
  state = look.init(params)
  for s, target in enumerate(targets):
    grads = jax.grad(_loss)(params.fast, _replica(target, 0))
    updates, state = look.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ours, _ = history[s]
    _tree_close(_replica(ours.local, 0), params.fast)
    _tree_close(_replica(ours.global_params, 0), params.slow)
  assert not np.allclose(np.asarray(params.slow["embed"]), np.asarray(_params()["embed"]))


# -- oracle 19: the sign of Δ and the Nesterov rule ------------------------------------------------------------------

def _shift_step(step_size):
  """An inner step that moves replica m's params by −step_size·(m + 1) (whatever the inner state)."""
  def make(target):
    del target

    def inner_step(local, inner_state):
      shift = step_size * (jax.lax.axis_index(AXIS) + 1).astype(jnp.float32)
      return jax.tree.map(lambda x: x - shift, local), inner_state, {}
    return inner_step
  return make


def test_delta_sign_and_nesterov_match_a_hand_computed_case():
  """θ0 = 1, replicas move by −0.1 and −0.2, so Δ̄ = 0.15 each step (Δ = θ_g − θ_m > 0). Outer Nesterov
  (η 0.7, β 0.9, torch ``SGD(nesterov=True)``): v1 = Δ̄, θ1 = θ0 − η(Δ̄ + βv1) = 0.8005;
  v2 = Δ̄ + βv1 = 0.285, θ2 = θ1 − η(Δ̄ + βv2) = 0.51595."""
  params = {"blocks": {0: {"w": jnp.ones((2, 4))}}}
  algorithm = _algorithm(2, outer=outer_sgd(0.7, 0.9, nesterov=True), params=params)
  runner = Runner(algorithm, optax.identity(), inner_step=_shift_step(0.1))
  _, history = runner.run(runner.init(params), [None, None])
  for (state, _), expected in zip(history, (0.8005, 0.51595)):
    np.testing.assert_allclose(np.asarray(state.global_params["blocks"][0]["w"]), expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(history[1][0].outer_states[0][0].trace[0]), 0.285, rtol=1e-6)


def test_outer_sgd_lr_1_without_momentum_moves_global_params_to_the_replica_mean():
  algorithm = _algorithm(4, sync_every=2, outer=outer_sgd(1.0, momentum=0.0))
  runner = Runner(algorithm, optax.sgd(0.1))
  targets = _targets(2, 4)
  _, history = runner.run(runner.init(_params()), targets)
  before_sync = history[1][0]
  # replica m's local params just before the merge: recompute two plain SGD steps from the start
  means = []
  for m in range(4):
    p = _params()
    for target in targets:
      p = jax.tree.map(lambda x, g: x - 0.1 * g, p, jax.grad(_loss)(p, _replica(target, m)))
    means.append(p)
  _tree_close(_replica(before_sync.global_params, 0), jax.tree.map(lambda *x: sum(x) / 4, *means), atol=2e-6)


# -- oracle 20: fragments, schedule, overlap and α -------------------------------------------------------------------

def test_schedule_rejects_rounding_and_too_long_overlaps():
  with pytest.raises(ValueError, match="divisible by fragments"):
    SyncSchedule(10, 3)
  with pytest.raises(ValueError, match=r"overlap must be in \[0, sync_every/fragments = 2\)"):
    SyncSchedule(6, 3, 2)
  with pytest.raises(ValueError, match="must be <= the model's layers"):
    FragmentPlan.build(_params(), 4)


def test_fragment_plan_strided_sequential_and_non_layer_params_in_fragment_0():
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(_params())[0]]
  def members(plan):
    return [sorted(names[s.index] for s in slots) for slots in plan.slots]
  strided = members(FragmentPlan.build(_params(), 2, pattern="strided"))
  assert strided[0] == sorted(n for n in names if "[0]" in n or "[2]" in n or "embed" in n or "norm" in n)
  assert strided[1] == sorted(n for n in names if "[1]" in n)
  sequential = members(FragmentPlan.build(_params(), 3, pattern="sequential"))
  assert sequential[1] == sorted(n for n in names if "[1]" in n)
  plan = FragmentPlan.build(_params(), 2, row_size=8, replicas=4)
  assert all(r % 4 == 0 for r in plan.rows) and sum(plan.sizes()) == sum(x.size for x in jax.tree.leaves(_params()))
  leaves = jax.tree.leaves(_params())
  for p in range(2):
    unpacked = plan.unpack(p, plan.pack(p, plan.select(p, leaves)))
    for a, b in zip(unpacked, plan.select(p, leaves), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_fragment_merges_once_per_h_steps_with_at_most_one_in_flight():
  sync_every, fragments, overlap, steps = 6, 3, 1, 18
  runner = Runner(_algorithm(2, sync_every=sync_every, fragments=fragments, overlap=overlap, alpha=0.5),
                  optax.sgd(0.05))
  state0 = runner.init(_params())
  _, history = runner.run(state0, _targets(steps, 2))
  plan = runner.algorithm.plan
  merged = [int(np.asarray(m["synced_fragment"])[0]) for _, m in history]
  in_flight = [int(np.asarray(s.inflight_fragment)[0]) for s, _ in history]
  assert merged == [-1, 0, -1, 1, -1, 2] * 3
  assert in_flight == [0, -1, 1, -1, 2, -1] * 3  # captured τ = 1 step before its merge, gone after it
  for window in range(0, steps, sync_every):
    assert sorted(f for f in merged[window:window + sync_every] if f >= 0) == list(range(fragments))
  previous = jax.device_get(state0.global_params)
  for (state, metrics), fragment in zip(history, merged):
    changed = [i for i, (a, b) in enumerate(zip(jax.tree.leaves(previous), jax.tree.leaves(state.global_params)))
               if not np.array_equal(a, b)]
    assert changed == ([s.index for s in plan.slots[fragment]] if fragment >= 0 else [])
    assert bool(np.all(np.asarray(metrics["replicas_agree"])))
    previous = state.global_params


def _reference(params, targets, inner, *, replicas, sync_every, fragments, overlap, alpha, outer):
  """Streaming DiLoCo written out plainly: a Python list of replicas, fragment = layer mod P (non-layer leaves in
  fragment 0), Δ captured τ steps before the merge at every multiple of H/P, float32 mean in replica order."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  fragment_of = [(path[1].key % fragments if path[0].key == "blocks" else 0) for path, _ in flat]
  members = [[i for i, f in enumerate(fragment_of) if f == p] for p in range(fragments)]
  period = sync_every // fragments
  glob = [np.asarray(x) for _, x in flat]
  local = [list(glob) for _ in range(replicas)]
  inner_states = [inner.init(jax.tree.unflatten(treedef, local[m])) for m in range(replicas)]
  outer_states = [outer.init([glob[i] for i in members[p]]) for p in range(fragments)]
  captured = None
  history = []
  for s, target in enumerate(targets, start=1):
    for m in range(replicas):
      tree = jax.tree.unflatten(treedef, local[m])
      grads = jax.grad(_loss)(tree, _replica(target, m))
      updates, inner_states[m] = inner.update(grads, inner_states[m], tree)
      local[m] = [np.asarray(x) for x in jax.tree.leaves(optax.apply_updates(tree, updates))]
    if (s + overlap) % period == 0:
      p = ((s + overlap) // period - 1) % fragments
      captured = [[glob[i] - local[m][i] for i in members[p]] for m in range(replicas)]
    if s % period == 0:
      p = (s // period - 1) % fragments
      total = captured[0]
      for m in range(1, replicas):
        total = [a + b for a, b in zip(total, captured[m])]
      mean = [t / np.float32(replicas) for t in total]
      updates, outer_states[p] = outer.update(mean, outer_states[p], [glob[i] for i in members[p]])
      new = optax.apply_updates([glob[i] for i in members[p]], updates)
      for i, value in zip(members[p], new):
        glob[i] = np.asarray(value)
        for m in range(replicas):
          local[m][i] = glob[i] if alpha == 0 else np.float32(alpha) * local[m][i] + np.float32(1 - alpha) * glob[i]
    history.append((list(glob), [list(x) for x in local]))
  return history


@pytest.mark.parametrize("fragments, overlap, alpha", [(1, 0, 0.0), (3, 0, 0.0), (3, 1, 0.5), (3, 1, 0.0),
                                                        (3, 1, 1.0)])
def test_streaming_equals_the_plain_reference(fragments, overlap, alpha):
  """(3, 0, 0.0) is the non-overlapped streaming case: τ = 0 with α = 0 (replace) is the reference's plain
  sync-and-replace loop; (1, 0, 0.0) is vanilla DiLoCo."""
  replicas, sync_every, steps = 4, 6, 13
  outer = outer_sgd(0.7, 0.9)
  inner = optax.adam(0.05)
  runner = Runner(_algorithm(replicas, sync_every=sync_every, fragments=fragments, overlap=overlap, alpha=alpha,
                             outer=outer), inner)
  targets = _targets(steps, replicas)
  _, history = runner.run(runner.init(_params()), targets)
  expected = _reference(_params(), targets, inner, replicas=replicas, sync_every=sync_every, fragments=fragments,
                        overlap=overlap, alpha=alpha, outer=outer)
  for (state, _), (glob, local) in zip(history, expected):
    for m in range(replicas):
      for ours, theirs in zip(jax.tree.leaves(_replica(state.global_params, m)), glob, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
      for ours, theirs in zip(jax.tree.leaves(_replica(state.local, m)), local[m], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_alpha_1_keeps_local_params_and_alpha_0_copies_the_new_global_params():
  runs = {}
  for alpha in (0.0, 1.0):
    runner = Runner(_algorithm(2, sync_every=4, alpha=alpha), optax.sgd(0.05))
    runs[alpha] = runner.run(runner.init(_params()), _targets(4, 2))[1]
  before, after = runs[1.0][2][0], runs[1.0][3][0]  # merge after step 4: α = 1 leaves the locals as trained
  # with α = 1 the local params after the merge are the step-4 inner result, not the global params
  assert not np.array_equal(np.asarray(after.local["embed"]), np.asarray(after.global_params["embed"]))
  assert not np.array_equal(np.asarray(before.local["embed"]), np.asarray(after.local["embed"]))
  replaced = runs[0.0][3][0]
  for m in range(2):
    for a, b in zip(jax.tree.leaves(_replica(replaced.local, m)), jax.tree.leaves(_replica(replaced.global_params, 0))):
      np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
  # same inner trajectory up to the merge, same global params after it: only the merge rule differs
  for a, b in zip(jax.tree.leaves(after.global_params), jax.tree.leaves(replaced.global_params)):
    np.testing.assert_array_equal(a, b)


# -- oracle 22: replicas ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wire", ["fp32", "e3m0"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_after_each_sync_global_params_and_outer_state_are_bit_identical_and_locals_iff_alpha_0(alpha, wire):
  replicas = 4
  runner = Runner(_algorithm(replicas, sync_every=4, fragments=2, overlap=1, alpha=alpha, wire=wire),
                  optax.adam(0.05))
  _, history = runner.run(runner.init(_params()), _targets(8, replicas))
  for state, metrics in history:
    if int(np.asarray(metrics["synced_fragment"])[0]) < 0:
      continue
    for m in range(1, replicas):
      for tree in (state.global_params, state.outer_states):
        for a, b in zip(jax.tree.leaves(_replica(tree, 0)), jax.tree.leaves(_replica(tree, m)), strict=True):
          np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
      same_locals = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_replica(state.local, 0)),
                                                             jax.tree.leaves(_replica(state.local, m))))
      # only the merged fragment is replaced, so compare its leaves
      fragment = int(np.asarray(metrics["synced_fragment"])[0])
      idx = [s.index for s in runner.algorithm.plan.slots[fragment]]
      locals0, localsm = jax.tree.leaves(_replica(state.local, 0)), jax.tree.leaves(_replica(state.local, m))
      same_fragment = all(np.array_equal(locals0[i], localsm[i]) for i in idx)
      assert same_fragment == (alpha == 0.0)
      assert not same_locals  # the other fragment keeps training apart
    assert bool(np.all(np.asarray(metrics["replicas_agree"])))


def test_a_mismatched_init_trips_the_replica_check():
  mesh = Mesh(np.asarray(jax.devices()[:4]), (AXIS,))
  check = jax.jit(jax.shard_map(lambda t: replicas_agree(jax.tree.map(lambda x: x[0], t), AXIS)[None], mesh=mesh,
                                in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False))
  same = jax.tree.map(lambda x: jnp.stack([x] * 4), _params())
  assert np.all(np.asarray(check(jax.device_put(same, NamedSharding(mesh, P(AXIS))))))
  one_ulp = jax.tree.map(lambda x: x, same)
  w = np.asarray(same["blocks"][2]["w"]).copy()
  w[3, 1, 2] = np.nextafter(w[3, 1, 2], np.float32(np.inf))
  one_ulp["blocks"][2]["w"] = jnp.asarray(w)
  assert not np.any(np.asarray(check(jax.device_put(one_ulp, NamedSharding(mesh, P(AXIS))))))
  # and a run started from it (no inner progress, so Δ = 0) reports it at the merge of fragment 0 (layers 0, 2)
  runner = Runner(_algorithm(4, sync_every=2, fragments=2), optax.sgd(0.0))
  _, history = runner.run(runner.init(one_ulp, per_replica=True), _targets(2, 4))
  assert [int(np.asarray(m["synced_fragment"])[0]) for _, m in history] == [0, 1]
  assert not np.any(np.asarray(history[0][1]["replicas_agree"]))
  assert np.all(np.asarray(history[1][1]["replicas_agree"]))  # fragment 1 (layer 1) was never different


def test_fingerprint_sees_any_single_change():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64,)).astype(np.float32)
  base = np.asarray(fingerprint([jnp.asarray(x)]))
  for i in range(0, 64, 7):
    for flip in (1, 1 << 31):
      y = x.copy().view(np.uint32)
      y[i] ^= flip
      assert np.asarray(fingerprint([jnp.asarray(y.view(np.float32))]))[0] != base[0]
  swapped = x.copy()
  swapped[[1, 2]] = swapped[[2, 1]]
  assert np.asarray(fingerprint([jnp.asarray(swapped)]))[0] != base[0]
