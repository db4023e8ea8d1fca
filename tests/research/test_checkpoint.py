"""Checkpointer: round trip of params/optimizer state/meta, keep-N, and restore into the saved shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.checkpoint import CheckpointError, Checkpointer, abstract_like
from research.mesh import named_mesh, replicated


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
  mesh = named_mesh()
  state = jax.device_put(_state(jax.random.key(2)), replicated(mesh))
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, state, {"step": 1})
  restored, _ = Checkpointer(tmp_path).restore(1, abstract_like(state))
  assert all(leaf.sharding == replicated(mesh) for leaf in jax.tree.leaves(restored))


def _saved(tmp_path, steps=(1, 2, 3)):
  state = _state(jax.random.key(3))
  with Checkpointer(tmp_path, keep=5) as checkpointer:
    for step in steps:
      checkpointer.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"step": step})
  return state


def test_a_truncated_file_is_detected_moved_aside_and_the_previous_step_restored(tmp_path):
  state = _saved(tmp_path)
  victim = max((p for p in (tmp_path / "3").rglob("*") if p.is_file() and "memlab" not in p.name),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  lines = []
  step, restored, meta = Checkpointer(tmp_path, keep=5).restore_latest(abstract_like(state), log=lines.append)
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"] + 2)
  assert len(lines) == 1 and lines[0].startswith("checkpoint 3 is damaged (files changed since it was written")
  aside = list((tmp_path.parent / (tmp_path.name + ".damaged")).iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("3-") and victim.name in {p.name for p in aside[0].rglob("*")}
  assert Checkpointer(tmp_path, keep=5).all_steps() == [1, 2]  # moved, not deleted, and no longer listed


def test_a_flipped_byte_is_caught_by_the_manifest(tmp_path):
  state = _saved(tmp_path, steps=(1, 2))
  data = [p for p in (tmp_path / "2").rglob("*") if p.is_file() and p.parent.name == "d"]
  raw = bytearray(data[0].read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data[0].write_bytes(bytes(raw))
  lines = []
  step, _, _ = Checkpointer(tmp_path, keep=5).restore_latest(abstract_like(state), log=lines.append)
  assert step == 1 and "checkpoint 2 is damaged" in lines[0]


def test_a_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
  _saved(tmp_path, steps=(1,))
  other = {"params": {"w": jnp.zeros((5, 3)), "blocks": {0: {"b": jnp.zeros(3)}}}}
  other["opt_state"] = optax.adamw(1e-3).init(other["params"])
  try:
    Checkpointer(tmp_path, keep=5).restore_latest(abstract_like(other))
  except CheckpointError as e:
    assert "holds another model's state (opt_state/0/mu/w is float32[4, 3] where this run has float32[5, 3])" in str(e)
  else:
    raise AssertionError("a checkpoint of another shape was restored")
  assert (tmp_path / "1").is_dir()


def test_a_namedtuple_state_whose_fields_are_not_sorted_restores(tmp_path):
  """orbax stores a NamedTuple as a dict (keys sorted); the shape check must match fields by name, not position."""
  from typing import NamedTuple

  class State(NamedTuple):
    zeta: jax.Array
    alpha: jax.Array

  state = {"opt": State(jnp.ones((2, 3)), jnp.zeros((5,)))}
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, state, {"step": 1})
  step, restored, _ = Checkpointer(tmp_path).restore_latest(abstract_like(state))
  assert step == 1 and restored["opt"].zeta.shape == (2, 3) and restored["opt"].alpha.shape == (5,)
