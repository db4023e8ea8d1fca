"""Natural GaLore oracles (spec optim.md §5.9): s = 1 closed form, Woodbury = direct solve, zero padding,
FIFO of s, history cleared on refresh, reduction to GaLore, honest memory count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim.galore import galore, scale_by_galore
from optim.memory import state_bytes_per_param
from optim.natural_galore import NaturalGaLore, natural_galore


def _grads(seed, shape, steps):
  return [{"w": jax.random.normal(k, shape)} for k in jax.random.split(jax.random.key(seed), steps)]


def _run(tx, grads):
  state, outs, states = tx.init(grads[0]), [], []
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state)
    outs.append(u)
    states.append(state)
  return outs, states


def test_single_history_closed_form():
  g = jax.random.normal(jax.random.key(0), (30,))
  nat = NaturalGaLore(history=1, damping=0.5)
  out = nat.precondition(g, g[None], 0)
  np.testing.assert_allclose(out, g / (0.5 + jnp.sum(g**2)), rtol=1e-5)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_woodbury_equals_direct_solve(damping):
  hist = jax.random.normal(jax.random.key(1), (5, 40))
  g = hist[2]
  out = NaturalGaLore(history=5, damping=damping).precondition(g, hist, 2)
  h64 = np.asarray(hist, np.float64)
  direct = np.linalg.solve(damping * np.eye(40) + h64.T @ h64, np.asarray(g, np.float64))
  err = np.linalg.norm(np.asarray(out, np.float64) - direct) / np.linalg.norm(direct)
  print(f"Woodbury vs direct (λ={damping}): relative error {err:.1e}")
  assert err < 1e-5


def test_zero_padded_history_equals_shorter_history():
  hist = jax.random.normal(jax.random.key(2), (2, 24))
  g = hist[0]
  padded = NaturalGaLore(history=6, damping=1e-2).precondition(g, jnp.zeros((6, 24)).at[:2].set(hist), 0)
  exact = NaturalGaLore(history=2, damping=1e-2).precondition(g, hist, 0)
  np.testing.assert_allclose(padded, exact, rtol=1e-4)


def test_history_is_a_fifo_of_s_cleared_on_refresh():
  grads = _grads(3, (4, 12), 7)
  tx = scale_by_galore(rank=2, update_proj_gap=5, natural=NaturalGaLore(history=3, damping=1e-2))
  _, states = _run(tx, grads)
  for t, s in enumerate(states):
    hist = np.asarray(s.history["w"])
    refreshed_at = 5 * (t // 5)
    expected = {(k % 3): np.asarray(s.left["w"].T @ grads[k]["w"]).ravel()
                for k in range(max(refreshed_at, t - 2), t + 1)}
    for row in range(3):
      np.testing.assert_allclose(hist[row], expected.get(row, np.zeros(hist.shape[1])), rtol=1e-5, atol=1e-6)


def test_keep_policy_carries_history_across_refresh():
  grads = _grads(4, (4, 12), 6)
  tx = scale_by_galore(rank=2, update_proj_gap=5, natural=NaturalGaLore(history=3, on_refresh="keep"))
  _, states = _run(tx, grads)
  assert np.count_nonzero(np.abs(np.asarray(states[5].history["w"])).sum(axis=1)) == 3


@pytest.mark.parametrize("natural", [NaturalGaLore(history=0), NaturalGaLore(history=4, damping=1e6)],
                         ids=["no_history", "huge_damping"])
def test_reduces_to_galore(natural):
  # Adam without ε is invariant to the gradient scale 1/λ, and λ -> ∞ drops the Fisher term.
  grads = _grads(5, (6, 10), 7)
  adam = optax.scale_by_adam(eps=0.0)
  ours, _ = _run(scale_by_galore(rank=3, update_proj_gap=3, base_optimizer=adam, natural=natural), grads)
  ref, _ = _run(scale_by_galore(rank=3, update_proj_gap=3, base_optimizer=adam), grads)
  err = max(float(jnp.max(jnp.abs(a["w"] - b["w"]))) for a, b in zip(ours, ref, strict=True))
  print(f"Natural GaLore {natural} vs GaLore: max err {err:.1e}")
  assert err < 1e-4


def test_natural_state_costs_s_times_the_low_rank_gradient():
  m, n, r, s = 8, 24, 4, 20
  params = {"mlp": {"kernel": jax.ShapeDtypeStruct((m, n), jnp.float32)}}
  entries = state_bytes_per_param(jax.eval_shape(natural_galore(1e-3, rank=r, history=s).init, params),
                                  params)["mlp/kernel"]
  assert entries == {"left": m * r, "mu": r * n, "nu": r * n, "history": s * r * n}
  plain = state_bytes_per_param(jax.eval_shape(galore(1e-3, rank=r).init, params), params)["mlp/kernel"]
  assert "history" not in plain


def test_invalid_settings_are_rejected():
  with pytest.raises(ValueError, match="history must be"):
    NaturalGaLore(history=-1)
  with pytest.raises(ValueError, match="damping must be"):
    NaturalGaLore(damping=0.0)
