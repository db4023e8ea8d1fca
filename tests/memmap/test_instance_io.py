"""Instance model, validator and MiniMalloc CSV reader/writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memmap.baselines.heuristics import greedy
from memmap.generators import random_instance
from memmap.instance import (SLOW, Instance, PlacementError, adjacency, compress_times, first_clash, load_bound,
                             overlap_pairs, sweep, time_overlap, validate)
from memmap.io_minimalloc import read_csv, write_csv

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "minimalloc"
FIXTURE = "id,lower,upper,size\nb1,0,3,4\nb2,3,9,4\nb3,0,9,4\nb4,9,21,4\nb5,0,21,4\n"


def test_minimalloc_fixture_validates_at_height_12(tmp_path):
  path = tmp_path / "input.12.csv"
  path.write_text(FIXTURE)
  inst, offsets = read_csv(path)
  assert offsets is None and inst.capacity == 12 and inst.n == 5
  assert validate(inst, np.array([8, 8, 4, 4, 0])) == 12
  assert load_bound(inst) == 12


def test_validator_names_both_overlapping_buffers():
  inst = Instance(ids=("a", "b", "c"), lower=[0, 2, 5], upper=[4, 6, 8], size=[4, 4, 4], capacity=8)
  assert validate(inst, np.array([0, 4, 0])) == 8
  with pytest.raises(PlacementError, match=r"'a'.*'b'.*overlap"):
    validate(inst, np.array([0, 2, SLOW]))
  with pytest.raises(PlacementError, match="exceeds the capacity"):
    validate(inst, np.array([0, 5, SLOW]))
  aligned = inst.replace(alignment=4)
  with pytest.raises(PlacementError, match="alignment"):
    validate(aligned, np.array([0, SLOW, 2]))
  # Touching intervals are half-open: [0,4) and [4,...) never overlap, so c may share a's addresses.
  assert validate(inst, np.array([0, 4, 0])) == 8


def test_compress_times_preserves_overlaps_and_load():
  inst = random_instance(40, np.random.default_rng(0))
  comp = compress_times(inst)
  assert (time_overlap(comp) == time_overlap(inst)).all()
  assert load_bound(comp) == load_bound(inst)
  assert comp.upper.max() < 81


def test_csv_round_trip_with_slow_buffers_and_any_row_order(tmp_path):
  rng = np.random.default_rng(1)
  inst = random_instance(30, rng)
  offsets = np.where(rng.random(30) < 0.3, SLOW, rng.integers(0, 10**6, 30))
  write_csv(tmp_path / "x.csv", inst, offsets)
  back, back_off = read_csv(tmp_path / "x.csv", capacity=inst.capacity)
  assert back.ids == inst.ids and (back_off == offsets).all()
  for name in ("lower", "upper", "size"):
    assert (getattr(back, name) == getattr(inst, name)).all()
  rows = (tmp_path / "x.csv").read_text().splitlines()
  (tmp_path / "y.csv").write_text("\n".join([rows[0]] + rows[1:][::-1]) + "\n")
  rev, _ = read_csv(tmp_path / "y.csv", capacity=inst.capacity)
  assert sorted(zip(rev.ids, rev.size.tolist())) == sorted(zip(inst.ids, inst.size.tolist()))


def test_csv_synonyms_and_errors(tmp_path):
  (tmp_path / "s.csv").write_text("buffer,start,end,size\nx,0,2,8\n")
  inst, _ = read_csv(tmp_path / "s.csv")
  assert inst.upper[0] == 3  # "end" is inclusive
  (tmp_path / "d.csv").write_text("id,lower,start,upper,size\nx,0,0,2,8\n")
  with pytest.raises(ValueError, match="duplicate"):
    read_csv(tmp_path / "d.csv")
  (tmp_path / "g.csv").write_text("id,lower,upper,size,gaps\nx,0,9,8,1-3 5-7@0:4\n")
  assert read_csv(tmp_path / "g.csv")[0].n == 1


@pytest.mark.parametrize("name", "ABCDEF")
def test_minimalloc_benchmark_files_read(name):
  inst, _ = read_csv(DATA / f"{name}.1048576.csv")
  assert inst.capacity == 1048576 and inst.n in (154, 170, 203, 213, 215, 296)
  assert load_bound(inst) <= inst.capacity


def _dense_overlap(inst: Instance) -> np.ndarray:
  """The obviously-correct reference: every pair compared directly."""
  lo, up = inst.lower, inst.upper
  ov = (lo[:, None] < up[None, :]) & (lo[None, :] < up[:, None])
  np.fill_diagonal(ov, False)
  return ov


@pytest.mark.parametrize("seed", range(5))
def test_sweep_structures_equal_their_dense_references(seed):
  rng = np.random.default_rng(seed)
  inst = random_instance(int(rng.integers(1, 120)), rng, horizon=int(rng.integers(2, 40)))
  dense = _dense_overlap(inst)
  i, j = overlap_pairs(inst)
  assert len(i) == dense.sum() // 2 and dense[i, j].all()
  assert (time_overlap(inst) == dense).all()
  indptr, nbrs = adjacency(inst)
  for k in range(inst.n):
    assert sorted(nbrs[indptr[k]:indptr[k + 1]].tolist()) == np.flatnonzero(dense[k]).tolist()
  times = np.unique(inst.lower)
  live = (inst.lower[None, :] <= times[:, None]) & (times[:, None] < inst.upper[None, :])
  assert load_bound(inst) == int((live * inst.size[None, :]).sum(axis=1).max())
  sw = sweep(inst)
  shared = np.zeros_like(dense)
  for members in sw.sections:
    shared[np.ix_(members, members)] = True
  np.fill_diagonal(shared, False)
  assert (shared == dense).all()  # two buffers overlap in time iff they share a section
  assert sorted(b for part, _, _ in sw.partitions for b in part) == list(range(inst.n))


@pytest.mark.parametrize("seed", range(6))
def test_sweep_validator_finds_a_clash_iff_the_pairwise_check_does(seed):
  rng = np.random.default_rng(10 + seed)
  inst = random_instance(60, rng, horizon=30)
  offsets = greedy(inst, "spatial", "first")
  if seed % 2:  # move a few buffers somewhere random: clashes, or by luck none
    moved = rng.choice(inst.n, seed, replace=False)
    offsets[moved] = rng.integers(0, 20, seed) * 64
  offsets[rng.random(inst.n) < 0.2] = SLOW
  placed = offsets != SLOW
  o, z = offsets, inst.size
  clash = _dense_overlap(inst) & (o[:, None] < o[None, :] + z[None, :]) & (o[None, :] < o[:, None] + z[:, None])
  clash &= placed[:, None] & placed[None, :]
  found = first_clash(inst, offsets, np.flatnonzero(placed))
  assert (found is not None) == bool(clash.any())
  if found is not None:
    assert clash[found]
    with pytest.raises(PlacementError, match="overlap in time and address"):
      validate(inst, offsets, capacity=10**9)
  else:
    assert validate(inst, offsets, capacity=10**9) == int((o + z)[placed].max())
