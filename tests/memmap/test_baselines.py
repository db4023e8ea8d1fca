"""Heuristics and CP-SAT: valid placements, and CP-SAT optimal where exhaustive search proves the optimum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memmap.baselines import cpsat
from memmap.baselines.exhaustive import max_benefit, min_height
from memmap.baselines.heuristics import FITS, greedy, portfolio
from memmap.generators import guillotine, random_instance
from memmap.instance import SLOW, Instance, load_bound, validate
from memmap.io_minimalloc import read_csv
from memmap.orders import ORDERS
from memmap.solvers import HEURISTICS, solve

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "minimalloc"
BIG = np.iinfo(np.int64).max


def test_every_heuristic_emits_valid_placements():
  rng = np.random.default_rng(0)
  insts = [random_instance(50, rng), guillotine(30, rng), read_csv(DATA / "D.1048576.csv")[0]]
  for inst in insts:
    for order in ORDERS:
      for fit in FITS:
        h = validate(inst, greedy(inst, order, fit), capacity=BIG)
        assert h >= load_bound(inst)
        off = greedy(inst, order, fit, capacity=inst.capacity)
        validate(inst, off)
    assert validate(inst, portfolio(inst), capacity=BIG) <= validate(inst, greedy(inst, "spatial", "best"), BIG)


@pytest.mark.parametrize("seed", range(4))
def test_cpsat_height_matches_exhaustive_search(seed):
  rng = np.random.default_rng(seed)
  inst = guillotine(6, rng, 8, 8) if seed % 2 else random_instance(6, rng, horizon=6)
  best, _ = min_height(inst)
  res = cpsat.solve_height(inst, time_limit=10)
  assert res.status == "optimal"
  assert validate(inst, res.offsets, capacity=BIG) == best == res.objective
  hinted = cpsat.solve_height(inst, time_limit=10, hint=greedy(inst, "input", "first"))  # e.g. an agent's layout
  assert hinted.status == "optimal" and validate(inst, hinted.offsets, capacity=BIG) == best
  for method in HEURISTICS:
    assert solve(inst, method).peak >= best


@pytest.mark.parametrize("seed", range(3))
def test_cpsat_benefit_matches_exhaustive_search(seed):
  rng = np.random.default_rng(10 + seed)
  inst = random_instance(6, rng, horizon=5)
  inst = inst.replace(capacity=int(load_bound(inst) * 0.6))
  best, _ = max_benefit(inst)
  res = cpsat.solve_benefit(inst, time_limit=10)
  assert res.status == "optimal"
  validate(inst, res.offsets)
  assert res.objective == pytest.approx(best, rel=1e-9)
  msa = greedy(inst, "msa", "best", inst.capacity)
  assert inst.benefit[msa != SLOW].sum() <= best + 1e-9


def test_cpsat_buffer_larger_than_capacity_is_left_slow():
  inst = Instance(ids=("big", "small"), lower=[0, 0], upper=[2, 2], size=[16, 4], capacity=8)
  res = cpsat.solve_benefit(inst, time_limit=5)
  assert res.status == "optimal" and res.offsets[0] == SLOW and res.offsets[1] != SLOW


def test_cpsat_reports_a_status_on_a_hard_instance():
  inst, _ = read_csv(DATA / "A.1048576.csv")
  # The greedy hint makes a feasible answer immediate; the margin is for a loaded 2-core CI machine.
  res = cpsat.solve_height(inst, time_limit=5.0)
  assert res.status in ("optimal", "feasible")
  h = validate(inst, res.offsets, capacity=BIG)
  assert 1048576 <= h <= validate(inst, portfolio(inst), capacity=BIG)
