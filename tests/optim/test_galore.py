"""GaLore oracles (spec optim.md §5.1–5.8): identity projector, linear exactness, cadence, memory, parity with
optax.contrib.galore, Eckart–Young, refresh policies, weight decay, parameter selection, >2-D leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import GaLoreDimensionNumbers

from optim.galore import FULL_RANK_LABEL, GALORE_LABEL, galore, galore_labels, scale_by_galore
from optim.galore_projection import LeafProjection
from optim.memory import state_bytes_per_param


def _grads(seed: int, shapes: dict[str, tuple[int, ...]], steps: int) -> list[dict[str, jax.Array]]:
  keys = jax.random.split(jax.random.key(seed), steps)
  return [{name: jax.random.normal(jax.random.fold_in(k, i), shape) for i, (name, shape) in
           enumerate(sorted(shapes.items()))} for k in keys]


def _run(tx, grads, params=None, state=None):
  state = tx.init(grads[0] if params is None else params) if state is None else state
  update = jax.jit(tx.update)
  outs, states = [], []
  for g in grads:
    u, state = update(g, state, params)
    outs.append(u)
    states.append(state)
  return outs, states


def test_identity_projector_equals_base_optimizer_exactly():
  grads = _grads(0, {"w": (6, 10)}, 6)
  tx = scale_by_galore(rank=6, update_proj_gap=10**6, scale=1.0)
  state = tx.init(grads[0])
  # Force P = I and skip the t = 0 refresh; the base Adam keeps its own (bias-correction) count.
  state = state._replace(count=jnp.ones([], jnp.int32), left={"w": jnp.eye(6)})
  ours, _ = _run(tx, grads, state=state)
  ref, _ = _run(optax.scale_by_adam(eps=1e-8), grads)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_array_equal(a["w"], b["w"])


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_sgd_base_at_full_rank_equals_sgd(shape):
  grads = _grads(1, {"w": shape}, 7)
  tx = scale_by_galore(rank=min(shape), update_proj_gap=3, scale=1.0, base_optimizer=optax.identity())
  ours, _ = _run(tx, grads)
  err = max(float(jnp.max(jnp.abs(u["w"] - g["w"]))) for u, g in zip(ours, grads, strict=True))
  print(f"full-rank GaLore-SGD vs SGD {shape}: max err {err:.1e}")
  assert err < 1e-5


def test_momentum_base_with_fixed_projector_equals_momentum_sgd():
  grads = _grads(2, {"w": (6, 10)}, 6)
  ours, _ = _run(scale_by_galore(rank=6, update_proj_gap=10**6, scale=1.0, base_optimizer=optax.trace(0.9)), grads)
  ref, _ = _run(optax.trace(0.9), grads)
  err = max(float(jnp.max(jnp.abs(a["w"] - b["w"]))) for a, b in zip(ours, ref, strict=True))
  print(f"full-rank GaLore-momentum vs momentum SGD: max err {err:.1e}")
  assert err < 1e-5


def test_projector_refreshes_exactly_every_gap_steps():
  grads = _grads(3, {"w": (6, 10)}, 10)
  _, states = _run(scale_by_galore(rank=2, update_proj_gap=3), grads)
  projectors = [np.asarray(s.left["w"]) for s in states]
  for t in range(1, 10):
    changed = not np.array_equal(projectors[t], projectors[t - 1])
    assert changed == (t % 3 == 0), f"step {t}: projector changed={changed}"


def test_staggered_refresh_spreads_leaves_over_the_gap():
  shapes = {"a": (4, 8), "b": (4, 8), "c": (4, 8)}
  grads = _grads(4, shapes, 13)
  _, states = _run(scale_by_galore(rank=2, update_proj_gap=6, stagger_refresh=True), grads)
  for i, name in enumerate(sorted(shapes)):
    offset = i * 6 // 3
    seq = [np.asarray(s.left[name]) for s in states]
    changed = [t for t in range(1, 13) if not np.array_equal(seq[t], seq[t - 1])]
    assert changed == [t for t in range(1, 13) if (t - offset) % 6 == 0], (name, changed)


@pytest.mark.parametrize("side,projector,moments", [("std", 8 * 4, 2 * 4 * 24), ("reverse_std", 24 * 4, 2 * 8 * 4),
                                                    ("full", 8 * 4 + 24 * 4, 2 * 4 * 4)])
def test_state_entries_of_a_projected_matrix(side, projector, moments):
  m, n, r = 8, 24, 4
  params = {"mlp": {"kernel": jax.ShapeDtypeStruct((m, n), jnp.float32)}}
  ours = state_bytes_per_param(jax.eval_shape(galore(1e-3, rank=r, side=side).init, params), params)
  entries = ours["mlp/kernel"]
  assert entries.get("left", 0) + entries.get("right", 0) == projector
  assert entries["mu"] + entries["nu"] == moments
  adam = state_bytes_per_param(jax.eval_shape(optax.adamw(1e-3).init, params), params)["mlp/kernel"]
  assert adam == {"mu": m * n, "nu": m * n}
  if side == "reverse_std":  # the side optax.contrib.galore always takes: same entry counts
    theirs = jax.eval_shape(optax.contrib.galore(1e-3, rank=r).init, params)
    assert sum(state_bytes_per_param(theirs, params)["mlp/kernel"].values()) == projector + moments


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_matches_optax_contrib_galore(shape):
  grads = _grads(5, {"w": shape}, 5)
  ours, _ = _run(scale_by_galore(rank=4, update_proj_gap=2, scale=1.0, side="reverse_std"), grads)
  theirs, _ = _run(optax.contrib.scale_by_galore(rank=4, update_proj_gap=2), grads)
  err = max(float(jnp.max(jnp.abs(a["w"] - b["w"]))) for a, b in zip(ours, theirs, strict=True))
  print(f"vs optax.contrib.galore {shape}: max err {err:.1e}")
  assert err < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_projector_is_orthonormal_and_optimal(side):
  g = jax.random.normal(jax.random.key(6), (10, 16))
  plan = LeafProjection.build((10, 16), GaLoreDimensionNumbers(0, 1), side, rank=3)
  left, right = plan.projectors(g, jnp.float32, None)
  p = left if side == "left" else right
  np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
  approx = plan.project_back(plan.project(g, left, right), left, right)
  s = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
  np.testing.assert_allclose(float(jnp.sum((g - approx) ** 2)), np.sum(s[3:] ** 2), rtol=1e-4)


def test_reset_restarts_moments_and_bias_correction():
  grads = _grads(7, {"w": (6, 10)}, 4)
  _, states = _run(scale_by_galore(rank=2, update_proj_gap=3, on_refresh="reset"), grads)
  after = states[3].base_state["w"]  # refreshed at t = 3, then one Adam step
  assert int(after.count) == 1
  low_rank = states[3].left["w"].T @ grads[3]["w"]
  np.testing.assert_allclose(after.mu, 0.1 * low_rank, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after.nu, 0.001 * low_rank**2, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("side", ["std", "full"])
def test_reproject_with_unchanged_subspace_is_keep(side):
  # The same gradient at every refresh gives the same projector, so rotating the moments is a no-op.
  g = jax.random.normal(jax.random.key(8), (6, 10))
  grads = [{"w": g}] * 7
  _, keep = _run(scale_by_galore(rank=2, update_proj_gap=3, side=side, on_refresh="keep"), grads)
  _, rep = _run(scale_by_galore(rank=2, update_proj_gap=3, side=side, on_refresh="reproject"), grads)
  first, last = jax.tree.leaves(keep[0][1:3]), jax.tree.leaves(keep[6][1:3])
  assert all(np.array_equal(a, b) for a, b in zip(first, last, strict=True))
  # Moments, not updates: with side='full' the low-rank gradient is diagonal and Adam blows its ~1e-8
  # off-diagonal rounding up to O(1), so updates would compare rounding noise.
  for a, b in zip(keep, rep, strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.base_state, b.base_state)


def test_reproject_rotates_moments_into_the_new_basis():
  plan = LeafProjection.build((6, 10), GaLoreDimensionNumbers(0, 1), "left", rank=2)
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(9), (6, 6)))
  old, new = (q[:, :2], None), (q[:, [1, 0]], None)  # the same subspace, basis vectors swapped
  m = jax.random.normal(jax.random.key(10), (2, 10))
  np.testing.assert_allclose(plan.rotate(m, old, new, squared=False), m[::-1], atol=1e-6)
  np.testing.assert_allclose(plan.rotate(m**2, old, new, squared=True), (m**2)[::-1], atol=1e-6)


def _lm_params():
  return {
      "embed": {"embedding": jnp.ones((16, 8))},
      "blocks": {0: {"mixer": {"q_proj": {"kernel": jnp.ones((8, 8))}},
                     "mlp": {"up": {"kernel": jnp.ones((8, 24))}, "down": {"kernel": jnp.ones((24, 8))}},
                     "mixer_norm": {"weight": jnp.ones((8,))}}},
      "head": {"kernel": jnp.ones((8, 16))},
  }


def test_paper_selection_projects_attention_and_mlp_matrices_only():
  labels = galore_labels(_lm_params())
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert {k for k, v in flat.items() if v == GALORE_LABEL} == {
      "blocks/0/mixer/q_proj/kernel", "blocks/0/mlp/up/kernel", "blocks/0/mlp/down/kernel"}
  assert flat["embed/embedding"] == flat["head/kernel"] == flat["blocks/0/mixer_norm/weight"] == FULL_RANK_LABEL
  with pytest.raises(ValueError, match="found no matrix"):
    galore_labels({"w": jnp.ones((4, 4))})


def test_weight_decay_is_full_space_and_unscaled_and_rest_is_adamw():
  params = jax.tree.map(lambda x: x * 0.5, _lm_params())
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(11), x.shape), params)
  lr, wd = 0.1, 0.3
  with_wd, _ = _run(galore(lr, rank=2, scale=0.25, weight_decay=wd), [grads], params)
  without, _ = _run(galore(lr, rank=2, scale=0.25), [grads], params)
  jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - b, -lr * wd * p, rtol=1e-5, atol=1e-7),
               with_wd[0], without[0], params)
  adamw, _ = _run(optax.adamw(lr, weight_decay=wd), [grads], params)
  np.testing.assert_allclose(with_wd[0]["embed"]["embedding"], adamw[0]["embed"]["embedding"], rtol=1e-6)
  np.testing.assert_allclose(with_wd[0]["head"]["kernel"], adamw[0]["head"]["kernel"], rtol=1e-6)


def test_higher_rank_leaf_through_dimension_numbers_matches_its_matrix_view():
  g3 = jax.random.normal(jax.random.key(12), (3, 4, 5))  # [heads, in, head_dim] -> (in) x (heads, head_dim)
  dims = GaLoreDimensionNumbers(reduction_axis=1, output_axis=(0, 2))
  tx3 = scale_by_galore(rank=2, dimension_numbers=lambda path, leaf: dims if leaf.ndim == 3 else None)
  u3, s3 = _run(tx3, [{"w": g3}])
  g2 = g3.transpose(1, 0, 2).reshape(4, 15)
  u2, _ = _run(scale_by_galore(rank=2), [{"w": g2}])
  assert s3[0].left["w"].shape == (4, 2)
  np.testing.assert_allclose(u3[0]["w"].transpose(1, 0, 2).reshape(4, 15), u2[0]["w"], rtol=1e-5, atol=1e-7)


def test_invalid_arguments_say_what_is_allowed():
  with pytest.raises(ValueError, match="side must be one of"):
    scale_by_galore(side="top")
  with pytest.raises(ValueError, match="on_refresh must be one of"):
    scale_by_galore(on_refresh="drop")
  with pytest.raises(ValueError, match="dimension numbers"):
    LeafProjection.build((3, 4, 5), GaLoreDimensionNumbers(0, 1), "std", 2)


def test_svd_algorithm_choice_gives_the_same_updates():
  # Singular vectors are defined up to sign; a sign flip of P's column cancels in P·Adam(Pᵀg), so updates agree.
  grads = _grads(13, {"w": (6, 10), "v": (12, 5)}, 3)
  default, _ = _run(scale_by_galore(rank=3, update_proj_gap=10), grads)
  qr, _ = _run(scale_by_galore(rank=3, update_proj_gap=10, svd_algorithm="qr"), grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), default, qr)
  with pytest.raises(ValueError, match="svd_algorithm must be one of"):
    scale_by_galore(svd_algorithm="lanczos")


def test_no_matrix_selected_means_plain_adamw():
  params = {"norm": jnp.ones((5,)), "bias": jnp.zeros((3,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(14), p.shape), params)
  ours, _ = _run(galore(0.1, select="all_2d", weight_decay=0.1), [grads, grads], params)
  ref, _ = _run(optax.adamw(0.1, weight_decay=0.1), [grads, grads], params)
  for a, b in zip(ours, ref, strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
