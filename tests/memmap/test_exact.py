"""The exact solver (MiniMalloc's search) against exhaustive search, compiled against interpreted, and its limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memmap.baselines import exact
from memmap.baselines.exhaustive import min_height
from memmap.generators import guillotine, random_instance
from memmap.instance import Instance, load_bound, validate
from memmap.io_minimalloc import read_csv

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "minimalloc"


def _small(seed: int) -> Instance:
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 8))
  inst = guillotine(n, rng, 8, 8) if seed % 2 else random_instance(n, rng, horizon=6)
  return inst.replace(alignment=64) if seed % 4 == 0 else inst


@pytest.mark.parametrize("block", range(4))
def test_feasible_and_infeasible_answers_agree_with_exhaustive_search(block):
  statuses = set()
  for seed in range(15 * block, 15 * block + 15):
    inst = _small(seed)
    opt, _ = min_height(inst)
    for cap in (opt - 1, opt, opt + inst.alignment):
      res = exact.solve(inst, cap, time_limit=30)
      assert res.status == ("feasible" if cap >= opt else "infeasible"), (seed, cap, opt, res.status)
      statuses.add(res.status)
      if res.status == "feasible":
        assert validate(inst, res.offsets, capacity=cap) <= cap
      else:
        assert res.offsets is None
  assert statuses == {"feasible", "infeasible"}


def test_compiled_kernel_visits_the_same_nodes_as_the_interpreted_one():
  pytest.importorskip("numba")
  assert exact._search is not exact._python_search
  for seed in range(12):
    inst = _small(100 + seed)
    cap = min_height(inst)[0] + (seed % 3 - 1)
    fast = exact.solve(inst, cap, time_limit=30)
    slow = exact.solve(inst, cap, time_limit=30, compiled=False)
    assert (fast.status, fast.nodes) == (slow.status, slow.nodes)
    if fast.offsets is not None:
      np.testing.assert_array_equal(fast.offsets, slow.offsets)


def test_guillotine_packings_fit_at_their_height_and_not_below_the_load_bound():
  for seed in range(3):
    inst = guillotine(30, np.random.default_rng(seed), 16, 16)
    res = exact.solve(inst, 16, time_limit=60)
    assert res.status == "feasible" and validate(inst, res.offsets) <= 16
    below = exact.solve(inst, load_bound(inst) - 1, time_limit=60)
    assert below.status == "infeasible" and below.nodes == 0  # the section inference proves it at the root


def test_minimalloc_F_fits_at_its_capacity():
  pytest.importorskip("numba")  # interpreted, the ~2,000 nodes F needs take minutes
  inst, _ = read_csv(DATA / "F.1048576.csv")
  res = exact.solve(inst, time_limit=120)
  assert res.status == "feasible", res
  assert validate(inst, res.offsets) == 1048576


def test_time_limit_gives_unknown_and_bad_arguments_are_refused():
  inst, _ = read_csv(DATA / "E.1048576.csv")
  res = exact.solve(inst, time_limit=0.0)
  assert res.status == "unknown" and res.offsets is None
  exact.warm_up()
  for preorders in (("WAT",), exact.PREORDERS):  # one preorder is limited by the clock as well as three
    res = exact.solve(inst, time_limit=1.0, preorders=preorders)
    assert res.status == "unknown" and res.seconds < 4.0 and res.nodes > 0
  with pytest.raises(ValueError, match="capacity"):
    exact.solve(inst, capacity=0)
  with pytest.raises(ValueError, match="preorders"):
    exact.solve(inst, preorders=("WXQ",))
