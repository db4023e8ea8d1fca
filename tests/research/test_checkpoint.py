"""Checkpointer: round trip of params/optimizer state/meta, keep-N, and restore into the saved shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.checkpoint import Checkpointer, abstract_like
from research.mesh import data_mesh, replicated


def _state(key):
  params = {"w": jax.random.normal(key, (4, 3)), "blocks": {0: {"b": jnp.arange(3.0)}}}
  return {"params": params, "opt_state": optax.adamw(1e-3).init(params)}


def test_round_trip_restores_values_structure_and_meta(tmp_path):
  state = _state(jax.random.key(0))
  with Checkpointer(tmp_path, keep=2) as checkpointer:
    checkpointer.save(7, state, {"step": 7, "seed": 3, "data_position": 7})
  restored, meta = Checkpointer(tmp_path).restore(7, abstract_like(state))
  assert meta == {"step": 7, "seed": 3, "data_position": 7}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
  state = _state(jax.random.key(1))
  with Checkpointer(tmp_path, keep=2) as checkpointer:
    for step in range(1, 6):
      checkpointer.save(step, state, {"step": step})
  checkpointer = Checkpointer(tmp_path, keep=2)
  assert checkpointer.all_steps() == [4, 5] and checkpointer.latest_step() == 5


def test_restore_places_arrays_with_the_target_sharding(tmp_path):
  mesh = data_mesh()
  state = jax.device_put(_state(jax.random.key(2)), replicated(mesh))
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, state, {"step": 1})
  restored, _ = Checkpointer(tmp_path).restore(1, abstract_like(state))
  assert all(leaf.sharding == replicated(mesh) for leaf in jax.tree.leaves(restored))
