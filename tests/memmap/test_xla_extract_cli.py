"""XLA buffer extraction: totals against memory_analysis, XLA's layout validated, every method on the buffers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memmap.baselines import cpsat
from memmap.instance import load_bound, validate
from memmap.solvers import METHODS, solve
from memmap.xla_extract import extract


def _mlp_grad(x, w1, w2):
  def loss(ws):
    h = jnp.tanh(x @ ws[0])
    return jnp.sum((h @ ws[1]) ** 2)
  return jax.grad(loss)((w1, w2))


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  shapes = [(32, 48), (48, 64), (64, 16)]
  args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  return extract(jax.jit(_mlp_grad).lower(*args))


def test_extracted_totals_match_memory_analysis(toy):
  totals = toy.totals()
  for name, (ours, xla) in totals.items():
    assert ours == xla, (name, ours, xla)
  assert totals["temp"][0] > 0 and toy.instance.n >= 3
  assert int(toy.instance.size.sum()) >= totals["temp"][0]  # temps share the allocation's addresses over time


def test_xla_layout_is_valid_and_cpsat_height_within_bounds(toy):
  inst = toy.instance
  lb = load_bound(inst)
  assert validate(inst, toy.xla_offsets, capacity=toy.xla_height) <= toy.xla_height
  res = cpsat.solve_height(inst, time_limit=10)
  assert res.status == "optimal" and lb <= res.objective <= toy.xla_height
  assert np.all(toy.program.additive_benefit() >= 0) and toy.program.t_slow > 0


@pytest.mark.parametrize("objective", ["height", "benefit"])
def test_every_method_on_extracted_buffers_validates(toy, objective):
  inst = toy.instance.replace(capacity=int(0.5 * toy.xla_height))
  for method in METHODS:
    if method in ("agent", "exact") or method.startswith("omnimalloc:"):
      continue  # height game only; covered in test_solvers.py
    sol = solve(inst, method, objective, time_limit=5)
    assert sol.offsets.size == inst.n
    if objective == "benefit":
      validate(inst, sol.offsets)


def test_a_capacity_fraction_below_one_byte_is_refused(toy):
  rng = np.random.default_rng(1)
  args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(32, 48), (48, 64), (64, 17)]]  # a fresh compile
  with pytest.raises(ValueError, match="below one byte"):
    extract(jax.jit(_mlp_grad).lower(*args), capacity_fraction=1e-30)
  assert toy.instance.capacity == toy.xla_height  # fraction 1
