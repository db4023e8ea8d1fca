"""Gumbel MuZero on the true game: search-tree invariants, a lookahead toy, perfect packings, checkpoints."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from memmap import env
from memmap.agent.network import NEG
from memmap.agent.search import FITS, SearchConfig, complete, search
from memmap.agent.train import AgentConfig, load_agent, make_net, solve, train
from memmap.baselines.exhaustive import min_height
from memmap.baselines.heuristics import greedy
from memmap.generators import guillotine, random_instance
from memmap.instance import SLOW, Instance, load_bound, validate


def _toy() -> Instance:
  # b2 blocks b3 (benefit 3) and b4; only lookahead sees that leaving b2 slow is worth 5 against greedy's 2.
  return Instance(ids=("b1", "b2", "b3", "b4"), lower=[0, 4, 4, 6], upper=[4, 8, 6, 8], size=[4, 8, 4, 4],
                  capacity=8, benefit=np.array([1.0, 1.0, 3.0, 1.0]))


def test_search_tree_discount_and_interior_masking():
  inst = _toy()
  cfg = env.GameConfig(objective="benefit", order="input", num_slots=4, grid=8)
  game = env.make_game(inst, cfg)
  graphdef, params = nnx.split(make_net(AgentConfig(num_slots=4, grid=8, width=16), 0))
  envp = jax.tree.map(lambda x: x[None], game.params)
  states = jax.vmap(env.reset)(envp)
  run = jax.jit(search, static_argnames=("graphdef", "cfg", "scfg"))
  out, _ = run(graphdef, params, envp, states, jax.random.key(0), cfg=cfg, scfg=SearchConfig(32, 4, 1.0))
  tree = out.search_tree
  idx = np.asarray(tree.children_index[0])
  term = np.asarray(tree.embeddings.terminal[0])
  disc = np.asarray(tree.children_discounts[0])
  logits = np.asarray(tree.children_prior_logits[0])
  mask_fn = jax.jit(jax.vmap(lambda s: env.legal_mask(game.params, s, cfg)))
  masks = np.asarray(mask_fn(jax.tree.map(lambda x: x[0], tree.embeddings)))
  checked = 0
  for node in range(idx.shape[0]):
    if node > 0 and not np.isin(node, idx):
      continue
    legal = masks[node]
    assert (logits[node][~legal] <= NEG).all()
    for a in np.flatnonzero(idx[node] >= 0):
      assert (disc[node, a] == 0.0) == term[idx[node, a]]
      checked += 1
  assert checked >= 8


def test_search_finds_lookahead_move_greedy_misses():
  inst = _toy()
  cfg = AgentConfig(objective="benefit", order="input", num_slots=4, grid=8, width=16)
  off_greedy = greedy(inst, "input", "best", inst.capacity)
  assert inst.benefit[off_greedy != SLOW].sum() == 2.0
  off = solve(make_net(cfg, 0), cfg, inst, num_simulations=32)
  validate(inst, off)
  assert inst.benefit[off != SLOW].sum() == 5.0 and off[1] == SLOW


def test_agent_trains_and_packs_perfect_packings(tmp_path):
  cfg = AgentConfig.tiny()
  net, history = train(cfg, tmp_path, log=lambda _: None)
  assert len(history) == cfg.iterations and np.isfinite(history[-1]["ce"])
  restored, cfg2 = load_agent(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, nnx.state(net), nnx.state(restored))
  hits = 0
  for seed in range(5):
    inst = guillotine(6, np.random.default_rng(100 + seed), 8, 8)
    assert min_height(inst)[0] == 8
    off = solve(restored, cfg2, inst, num_simulations=64)
    hits += validate(inst, off) == 8
  assert hits == 5


@pytest.mark.parametrize("fit", FITS)
def test_heuristic_rollout_value_equals_the_greedy_return(fit):
  inst = guillotine(12, np.random.default_rng(7), 16, 16)
  cfg = env.GameConfig(num_slots=8, grid=8)
  game = env.make_game(inst, cfg, n_max=16)
  run = jax.jit(complete, static_argnames=("cfg", "fit"))
  value = float(run(game.params, env.reset(game.params), cfg=cfg, fit=fit)[1])
  height = validate(inst, greedy(inst, "spatial", fit), capacity=10**9)
  assert value == pytest.approx(-height / load_bound(inst), rel=1e-5)


def test_rollout_guided_agent_emits_valid_placements():
  cfg = AgentConfig.tiny()
  inst = guillotine(8, np.random.default_rng(3), 8, 8)
  off = solve(make_net(cfg, 1), cfg, inst, num_simulations=8, rollout_weight=1.0, order="chronological",
              rollout_fits=("best", "first"), fortify=False)
  assert validate(inst, off, capacity=10**9) <= validate(inst, greedy(inst, "chronological", "best"), capacity=10**9)


def _hard_instances() -> list[Instance]:
  # Tight enough that an untrained network with 2 simulations loses to the greedy fits on some of them.
  return [random_instance(20, np.random.default_rng(s), horizon=10) if s % 2 else
          guillotine(20, np.random.default_rng(s), 8, 16) for s in (4, 9, 11)]


def test_heuristic_completions_reproduce_best_and_first_fit():
  differ = 0
  for inst in _hard_instances():
    for order in ("spatial", "chronological"):
      cfg = env.GameConfig(order=order, num_slots=4, grid=8)  # first fit's offset is often past the 4 best-fit slots
      game = env.make_game(inst, cfg)
      run = jax.jit(complete, static_argnames=("cfg", "fit"))
      done = {f: game.offsets_bytes(run(game.params, env.reset(game.params), cfg=cfg, fit=f)[0]) for f in FITS}
      for fit, off in done.items():
        np.testing.assert_array_equal(off, greedy(inst, order, fit))
      differ += not np.array_equal(done["best"], done["first"])
  assert differ >= 1


def test_fortified_agent_never_loses_to_best_or_first_fit_and_orders_keep_the_best():
  cfg = AgentConfig.tiny()
  net = make_net(cfg, 0)
  height = lambda inst, off: validate(inst, off, capacity=10**9)
  plain_lost = 0
  for inst in _hard_instances():
    fortified = {}
    for order in ("spatial", "chronological"):
      greedy_h = min(height(inst, greedy(inst, order, fit)) for fit in FITS)
      plain = height(inst, solve(net, cfg, inst, num_simulations=2, order=order, fortify=False))
      fortified[order] = height(inst, solve(net, cfg, inst, num_simulations=2, order=order))
      print(f"{order}: greedy {greedy_h} plain agent {plain} fortified {fortified[order]}")
      assert fortified[order] <= min(greedy_h, plain)
      plain_lost += plain > greedy_h
    both = height(inst, solve(net, cfg, inst, num_simulations=2, order=("spatial", "chronological")))
    assert both == min(fortified.values())
  assert plain_lost >= 1  # otherwise the incumbent was never needed and this test could not fail
