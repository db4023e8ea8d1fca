"""``python -m memmap``: the shared CLI generator's shape (--help, flags), and one-line errors with exit 2 on bad
input (issue 12, rows 9, 11 and 12): huge integers, unknown dtypes, shape mismatches, malformed rows, non-positive
capacities, simulations and time limits; a solve that finds no placement exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import research.train  # noqa: F401  (see below)
from memmap import cli
from memmap.instance import validate
from memmap.io_minimalloc import read_csv

# research.train is imported above, outside any capsys-captured test: research.metrics.Progress binds
# ``stream=sys.stdout`` when its module is imported, and a first import inside ``extract --config`` under capsys would
# leave later tests in this worker printing to a closed capture file.
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data" / "minimalloc"
A = str(DATA / "A.1048576.csv")


def _run(capsys, *argv) -> tuple[int, str, str]:
  try:
    code = cli.main(list(argv))
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _one_line_error(capsys, *argv, match: str) -> str:
  code, _, err = _run(capsys, *argv)
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
  return lines[0]


@pytest.mark.parametrize("command, flags", [
    ("solve", ["--method", "--objective", "--capacity", "--time-limit", "--agent-dir", "--simulations",
               "--agent-orders", "--rollout-fits", "--no-fortify", "--out", "--plot"]),
    ("extract", ["--config", "--function", "--shapes", "--dtype", "--capacity-fraction", "--out"]),
    ("train-agent", ["--workdir", "--iterations", "--n-min", "--n-max", "--num-simulations", "--order", "--seed"]),
])
def test_help_lists_every_flag_with_default_and_allowed_values(capsys, command, flags):
  code, out, _ = _run(capsys, command, "--help")
  assert code == 0
  for flag in flags:
    assert flag in out, flag
  assert "default:" in out
  allowed = {"solve": "omnimalloc:supermalloc", "extract": "bfloat16", "train-agent": "chronological"}[command]
  assert "one of" in out and allowed in out


def test_solve_writes_a_valid_placement(capsys, tmp_path):
  out = tmp_path / "A.sol.csv"
  code, stdout, _ = _run(capsys, "solve", A, "--method", "best_fit", "--out", str(out))
  assert code == 0 and "peak=" in stdout and "fits=no" in stdout
  inst, offsets = read_csv(out, capacity=1048576)
  assert validate(inst, offsets, capacity=np.iinfo(np.int64).max) >= 1048576


def test_csv_size_of_23_digits(capsys, tmp_path):
  path = tmp_path / "big.csv"
  path.write_text("id,lower,upper,size\nx,0,2,12345678901234567890123\n")
  _one_line_error(capsys, "solve", str(path), match="size 12345678901234567890123 is out of range")


@pytest.mark.parametrize("row, match", [("x,0,2,12,5", "5 cells for 4 columns"), ("x,0,2", "3 cells for 4 columns"),
                                        ("x,0,2,1e3", "'1e3' is not an integer"), ("x,3,2,8", "empty live interval")])
def test_malformed_rows(capsys, tmp_path, row, match):
  path = tmp_path / "bad.csv"
  path.write_text(f"id,lower,upper,size\ny,0,1,4\n{row}\n")
  _one_line_error(capsys, "solve", str(path), match=match)


def test_folder_and_missing_file_and_capacity_in_the_name(capsys, tmp_path):
  _one_line_error(capsys, "solve", str(tmp_path), match="is a folder")
  _one_line_error(capsys, "solve", str(tmp_path / "nope.csv"), match="no such MiniMalloc CSV file")
  path = tmp_path / f"x.{10**30}.csv"
  path.write_text("id,lower,upper,size\nx,0,2,8\n")
  _one_line_error(capsys, "solve", str(path), match="capacity")


@pytest.mark.parametrize("argv, match", [
    (["solve", A, "--method", "cpsat", "--time-limit", "-1"], "--time-limit must be a positive number"),
    (["solve", A, "--method", "exact", "--time-limit", "0"], "--time-limit must be a positive number"),
    (["solve", A, "--time-limit", "nan"], "--time-limit must be a finite number"),
    (["solve", A, "--capacity", "0"], "--capacity must be in [1,"),
    (["solve", A, "--capacity", "-5"], "--capacity must be in [1,"),
    (["solve", A, "--simulations", "0"], "--simulations must be a positive integer"),
    (["solve", A, "--method", "nope"], "--method must be one of"),
    (["solve", A, "--agent-orders", "spatial,sideways"], "--agent-orders must be one or more of"),
    (["extract", "--dtype", "floaty"], "--dtype must be one of"),
    (["extract", "--capacity-fraction", "0"], "--capacity-fraction must be > 0"),
    (["extract", "--capacity-fraction", "-2"], "--capacity-fraction must be > 0"),
    (["extract", "--shapes", "3x4"], "--shapes applies only with --function"),
    (["extract", "--function", "jax.numpy:matmul", "--shapes", "3x"], "--shapes must be dimensions joined by x"),
    (["extract", "--config", "huge"], "unknown preset 'huge'"),
    (["train-agent", "--n-min", "9", "--n-max", "8"], "--n-min must be <= n_max"),
    (["train-agent", "--iterations", "0"], "--iterations must be a positive integer"),
])
def test_bad_flags(capsys, argv, match):
  _one_line_error(capsys, *argv, match=match)


@pytest.mark.parametrize("shapes, match", [("3x4", "--shapes gives 1 argument(s) but jax.numpy:matmul takes 2"),
                                           ("3x4,5x6", "does not trace with --shapes 3x4,5x6")])
def test_mismatched_shapes(capsys, shapes, match):
  _one_line_error(capsys, "extract", "--function", "jax.numpy:matmul", "--shapes", shapes, match=match)


def test_a_solve_without_placement_exits_1(capsys, tmp_path):
  path = tmp_path / "two.4.csv"  # two buffers of 4 bytes live together cannot fit in 4 bytes
  path.write_text("id,lower,upper,size\na,0,2,4\nb,1,3,4\n")
  code, out, _ = _run(capsys, "solve", str(path), "--method", "exact", "--time-limit", "5", "--out",
                      str(tmp_path / "o.csv"))
  assert code == 1 and "status=infeasible" in out and not (tmp_path / "o.csv").exists()


def test_bad_input_in_a_subprocess_prints_no_traceback(tmp_path):
  path = tmp_path / "big.csv"
  path.write_text("id,lower,upper,size\nx,0,2,12345678901234567890123\n")
  r = subprocess.run([sys.executable, "-m", "memmap", "solve", str(path)], cwd=ROOT, capture_output=True, text=True,
                     env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")


_CELLS = st.one_of(st.integers(-5, 40).map(str), st.sampled_from(["", "x", "1e3", "9" * 23, " 7 ", "-0", "0x10"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(["id,lower,upper,size", "buffer,start,end,size", "id,lower,size",
                               "id,lower,upper,size,id", "id,lower,upper,size,offset", ""]),
       rows=st.lists(st.lists(_CELLS, min_size=2, max_size=6), max_size=6),
       flags=st.lists(st.sampled_from([["--capacity", "0"], ["--capacity", "64"], ["--time-limit", "-3"],
                                       ["--method", "first_fit"], ["--objective", "benefit"], ["--simulations", "0"],
                                       ["--capacity", "99999999999999999999999"]]), max_size=2))
def test_random_malformed_csvs_and_flags_end_in_a_placement_or_one_line(capsys, tmp_path, header, rows, flags):
  path = tmp_path / "random.csv"
  path.write_text("\n".join([header] + [f"b{k}," + ",".join(r) for k, r in enumerate(rows)]) + "\n")
  out = tmp_path / "out.csv"
  out.unlink(missing_ok=True)
  code, _, err = _run(capsys, "solve", str(path), *[f for pair in flags for f in pair], "--out", str(out))
  if code == 0:
    inst, offsets = read_csv(out, capacity=10**12)
    validate(inst, offsets, capacity=10**12)
  else:
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_train_agent_then_solve_with_its_network(capsys, tmp_path):
  work = tmp_path / "agent"
  tiny = ["--iterations", "1", "--n-min", "4", "--n-max", "6", "--pack-width", "8", "--pack-height", "8",
          "--batch-envs", "2", "--num-simulations", "2", "--num-slots", "4", "--grid", "8", "--width", "16",
          "--train-batch", "8", "--updates-per-iter", "1", "--max-num-considered-actions", "2"]
  code, out, err = _run(capsys, "train-agent", "--workdir", str(work), *tiny)
  assert code == 0, err
  assert (work / "history.json").is_file() and (work / "history.png").is_file() and "trained 1 iterations" in out
  path = tmp_path / "g.8.csv"
  path.write_text("id,lower,upper,size\na,0,4,4\nb,0,2,4\nc,2,4,4\n")
  code, out, err = _run(capsys, "solve", str(path), "--method", "agent", "--agent-dir", str(work), "--simulations", "4",
                        "--time-limit", "30", "--out", str(tmp_path / "o.csv"))
  assert code == 0 and "fits=yes" in out, (out, err)
  inst, offsets = read_csv(tmp_path / "o.csv", capacity=8)
  assert validate(inst, offsets) == 8
