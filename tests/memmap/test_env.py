"""The jittable mallocGame: legality, determinism under jit/vmap, rewards, and best fit = slot 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memmap import env
from memmap.baselines.heuristics import greedy
from memmap.cost_model import Program
from memmap.generators import guillotine, random_instance
from memmap.instance import SLOW, Instance, load_bound, validate

BIG = np.iinfo(np.int64).max


def _random_episode(game, cfg, rng):
  """Plays uniformly random legal actions; returns actions, final state and return."""
  s, actions, total = env.reset(game.params), [], 0.0
  step = jax.jit(lambda p, s, a: env.step(p, s, a, cfg))
  mask_fn = jax.jit(lambda p, s: env.legal_mask(p, s, cfg))
  while not bool(s.terminal):
    legal = np.flatnonzero(np.asarray(mask_fn(game.params, s)))
    a = int(rng.choice(legal))
    s, r, _, info = step(game.params, s, jnp.int32(a))
    assert not bool(info["illegal"])
    actions.append(a)
    total += float(r)
  return actions, s, total


@pytest.mark.parametrize("objective", ["height", "benefit"])
def test_random_legal_play_is_valid_and_deterministic(objective):
  rng = np.random.default_rng(0)
  inst = random_instance(8, rng)
  inst = inst.replace(capacity=int(load_bound(inst) * 0.7))
  cfg = env.GameConfig(objective=objective, num_slots=8, grid=8)
  game = env.make_game(inst, cfg, n_max=10)
  actions, final, total = _random_episode(game, cfg, rng)
  assert len(actions) == inst.n  # exactly n_valid steps
  offsets = game.offsets_bytes(final)
  h = validate(inst, offsets, capacity=BIG if objective == "height" else inst.capacity)
  if objective == "height":
    assert (offsets != SLOW).all() and total == pytest.approx(-h / load_bound(inst), rel=1e-5)
  else:
    assert total == pytest.approx(inst.benefit[offsets != SLOW].sum() / inst.benefit.sum(), rel=1e-5)
  # Replay (un-jitted for one objective) gives bit-identical states; the terminal state is absorbing.
  s2, total2, illegal = env.play(game, cfg, actions, jit=objective == "height")
  assert not illegal and total2 == pytest.approx(total, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), final, s2)
  s3, r3, _, info = env.step(game.params, s2, jnp.int32(0), cfg)
  assert float(r3) == 0.0 and not bool(info["illegal"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s2, s3)


def test_masked_actions_flag_illegal_and_slow_is_always_legal():
  rng = np.random.default_rng(1)
  inst = guillotine(12, rng, 16, 16).replace(capacity=10)
  cfg = env.GameConfig(objective="benefit", num_slots=6, grid=8)
  game = env.make_game(inst, cfg)
  s = env.reset(game.params)
  step = jax.jit(env.step, static_argnames="cfg")
  for _ in range(inst.n):
    mask = np.asarray(env.legal_mask(game.params, s, cfg))
    assert mask[-1]
    for a in range(cfg.num_actions):
      _, _, _, info = step(game.params, s, jnp.int32(a), cfg=cfg)
      assert bool(info["illegal"]) == (not mask[a])
    s, _, _, _ = step(game.params, s, jnp.int32(int(np.flatnonzero(mask)[0])), cfg=cfg)
  assert bool(s.terminal)


def test_vmap_equals_per_instance_runs():
  rng = np.random.default_rng(2)
  cfg = env.GameConfig(num_slots=8, grid=8)
  insts = [guillotine(int(n), rng, 16, 16) for n in (5, 9, 12)]
  games = [env.make_game(i, cfg, n_max=12) for i in insts]
  batched = jax.tree.map(lambda *x: jnp.stack(x), *[g.params for g in games])
  actions = jnp.asarray(rng.integers(0, 3, (12, 3)), jnp.int32)
  step = jax.jit(jax.vmap(lambda p, s, a: env.step(p, s, a, cfg)))
  s = jax.vmap(env.reset)(batched)
  for t in range(12):
    s, _, _, _ = step(batched, s, actions[t])
  for b, g in enumerate(games):
    single, _, _ = env.play(g, cfg, np.asarray(actions[:, b]))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x)[b], np.asarray(y)), s, single)
    validate(insts[b], g.offsets_bytes(single), capacity=BIG)
  obs = jax.vmap(lambda p, st: env.observe(p, st, cfg))(batched, s)
  assert obs["grid"].shape == (3, 8, 8, 2) and np.isfinite(np.asarray(obs["feats"])).all()


@pytest.mark.parametrize("order", ["spatial", "msa"])
def test_slot_zero_replays_best_fit(order):
  rng = np.random.default_rng(3)
  inst = random_instance(40, rng)
  cfg = env.GameConfig(order=order, num_slots=8, grid=8)
  game = env.make_game(inst, cfg)
  final, ret, illegal = env.play(game, cfg, [0] * inst.n)
  expected = greedy(inst, order, "best")
  assert not illegal
  np.testing.assert_array_equal(game.offsets_bytes(final), expected)
  assert ret == pytest.approx(-validate(inst, expected, BIG) / load_bound(inst), rel=1e-5)


def _cost_fixture() -> tuple[Instance, Program]:
  # Ops: k0 (c=1) writes x (8 B); k1 (c=6) reads x, writes y (8 B); k2 (c=3) reads y, writes z (4 B).
  reads = np.array([[0, 0, 0], [8, 0, 0], [0, 8, 0]], float)
  writes = np.array([[8, 0, 0], [0, 8, 0], [0, 0, 4]], float)
  prog = Program(compute=np.array([1.0, 6.0, 3.0]), mult=np.ones(3), reads=reads, writes=writes, other=np.zeros(3))
  inst = Instance(ids=("x", "y", "z"), lower=[0, 1, 2], upper=[2, 3, 3], size=[8, 8, 4], capacity=16,
                  benefit=prog.additive_benefit())
  return inst, prog


def test_cost_model_fixture_and_exact_reward_telescopes():
  inst, prog = _cost_fixture()
  want = {"000": 36, "001": 33, "010": 24, "011": 21, "100": 24, "101": 21, "110": 14, "111": 11}
  for bits, t in want.items():
    assert prog.time(np.array([c == "1" for c in bits])) == pytest.approx(t)
  assert prog.additive_benefit()[:2].sum() == pytest.approx(24.0)
  cfg = env.GameConfig(objective="benefit", reward="exact", order="input", num_slots=4, grid=8)
  for cap, best in ((4, 3), (8, 15), (12, 15), (16, 25)):
    game = env.make_game(inst.replace(capacity=cap), cfg, program=prog)
    returns = []
    for actions in np.ndindex(5, 5, 5):
      s, ret, illegal = env.play(game, cfg, actions)
      if illegal:
        continue
      fast = game.offsets_bytes(s) != SLOW
      validate(inst.replace(capacity=cap), game.offsets_bytes(s))
      assert ret == pytest.approx((36 - prog.time(fast)) / 36, rel=1e-5)
      returns.append(ret * 36)
    assert max(returns) == pytest.approx(best, rel=1e-5)
