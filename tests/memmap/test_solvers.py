"""Every method through ``memmap.solvers``: omnimalloc's allocators (skipped without the package), the exact method,
the network-free anytime agent against exhaustive search, CP-SAT hinted by the exact solver, the game's size limit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from memmap import env
from memmap.agent import anytime
from memmap.baselines import cpsat, exact, omni
from memmap.baselines.exhaustive import min_height
from memmap.baselines.heuristics import portfolio
from memmap.generators import guillotine, random_instance
from memmap.instance import load_bound, validate
from memmap.io_minimalloc import read_csv
from memmap.solvers import OMNI_METHODS, solve

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "minimalloc"
BIG = np.iinfo(np.int64).max


def test_omnimalloc_list_matches_the_installed_package():
  om = pytest.importorskip("omnimalloc")
  assert set(om.available_allocators()) == set(omni.ALLOCATORS)


@pytest.mark.parametrize("method", OMNI_METHODS)
def test_every_omnimalloc_allocator_returns_a_placement_our_validator_accepts(method):
  pytest.importorskip("omnimalloc")
  inst = random_instance(40, np.random.default_rng(0)).replace(alignment=128)
  if method in ("omnimalloc:minimalloc", "omnimalloc:genetic"):
    # google/minimalloc's module is not on PyPI; genetic needs deap (omnimalloc[all]): both say so themselves
    try:
      solve(inst, method, time_limit=1)
    except ImportError as e:
      assert "install" in str(e).lower()
      return
  sol = solve(inst, method, time_limit=1)
  assert sol.placed == inst.n and sol.peak >= load_bound(inst)
  validate(inst, sol.offsets, capacity=sol.peak)
  assert (sol.offsets % 128 == 0).all()


def test_omnimalloc_without_the_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "omnimalloc", None)  # makes ``import omnimalloc`` raise ImportError
  assert not omni.available()
  with pytest.raises(ImportError, match=r"memlab\[baselines\]"):
    omni.solve(random_instance(5, np.random.default_rng(0)), "supermalloc")


@pytest.mark.parametrize("seed", range(6))
def test_anytime_agent_reaches_the_exhaustive_optimum_on_small_instances(seed):
  rng = np.random.default_rng(200 + seed)
  inst = guillotine(7, rng, 8, 8) if seed % 2 else random_instance(7, rng, horizon=6)
  best, _ = min_height(inst)
  offsets, probes = anytime.solve(inst, time_limit=30)
  assert validate(inst, offsets, capacity=BIG) == best
  assert validate(inst, portfolio(inst), capacity=BIG) >= best
  assert all(p.status in exact.STATUSES for p in probes)


def test_agent_method_needs_no_flags_and_beats_the_portfolio_on_minimalloc_F():
  pytest.importorskip("numba")  # interpreted, the search would take minutes
  inst, _ = read_csv(DATA / "F.1048576.csv")
  sol = solve(inst, "agent", time_limit=60)
  assert sol.fits and sol.peak == 1048576 == load_bound(inst)  # L = C on F: a fit there is optimal
  assert sol.peak < validate(inst, portfolio(inst), capacity=BIG)


def test_exact_method_reports_feasible_or_infeasible_with_the_capacity():
  inst = guillotine(12, np.random.default_rng(5), 8, 8)
  ok = solve(inst.replace(capacity=8), "exact", time_limit=30)
  assert ok.status == "feasible" and ok.fits and ok.peak <= 8
  no = solve(inst.replace(capacity=7), "exact", time_limit=30)
  assert no.status == "infeasible" and no.offsets.size == 0 and not no.fits
  with pytest.raises(ValueError, match="height game only"):
    solve(inst, "exact", objective="benefit")


def test_exact_placement_is_a_cpsat_hint():
  inst = guillotine(14, np.random.default_rng(8), 12, 12)
  hint = exact.solve(inst, capacity=12, time_limit=30)
  assert hint.status == "feasible"
  res = cpsat.solve_height(inst, time_limit=10, hint=hint.offsets)
  assert res.status == "optimal" and validate(inst, res.offsets, capacity=BIG) == 12


def test_the_jittable_game_refuses_instances_above_its_size_limit():
  inst = random_instance(env.MAX_BUFFERS + 1, np.random.default_rng(0), horizon=10_000)
  with pytest.raises(ValueError, match=f"at most {env.MAX_BUFFERS} buffers"):
    env.make_game(inst, env.GameConfig())
