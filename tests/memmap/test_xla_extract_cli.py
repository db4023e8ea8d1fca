"""XLA buffer extraction (totals against memory_analysis) and the ``python -m memmap`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memmap.baselines import cpsat
from memmap.instance import load_bound, validate
from memmap.io_minimalloc import read_csv
from memmap.solvers import METHODS, solve
from memmap.xla_extract import extract

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data" / "minimalloc"


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
    if method == "agent":
      continue
    sol = solve(inst, method, objective, time_limit=5)
    assert sol.offsets.size == inst.n
    if objective == "benefit":
      validate(inst, sol.offsets)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "memmap", *args], cwd=ROOT, capture_output=True, text=True,
                        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_cli_solve_best_fit_on_minimalloc_A(tmp_path):
  out = tmp_path / "A.sol.csv"
  r = _cli("solve", "../shared/data/minimalloc/A.1048576.csv", "--method", "best_fit", "--out", str(out))
  assert r.returncode == 0, r.stderr
  assert "peak=" in r.stdout and "fits=no" in r.stdout and "time=" in r.stdout
  inst, offsets = read_csv(out)
  assert validate(inst, offsets, capacity=np.iinfo(np.int64).max) >= 1048576


def test_cli_errors_are_one_line():
  for args in (("solve", "missing.csv"), ("solve", str(DATA / "A.1048576.csv"), "--method", "nope"),
               ("solve", str(DATA / "A.1048576.csv"), "--method", "agent")):
    r = _cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("memmap: error:")
