"""Exact CP-SAT models (OR-Tools) for the placement problem.

Height (dynamic storage allocation): fixed time intervals ``X_i = [lower_i, upper_i)``, offset variables ``o_i``,
address intervals ``Y_i = [o_i, o_i + size_i)``, ``AddNoOverlap2D(X, Y)``; minimise ``h >= o_i + size_i`` with
``h >= L`` (the load bound) and ``h <= `` a greedy upper bound whose layout is given as a hint. Benefit (selection at
a capacity C): the same rectangles made optional with a presence literal ``p_i`` (``NoOverlap2D`` accepts optional
intervals); maximise ``sum_i w_i p_i``. Alignment: ``o_i = alignment * q_i``. A buffer larger than C is forced to
``p_i = 0`` (otherwise the model is ``MODEL_INVALID``). As in google/minimalloc's comparison, this is the model that
propagates well; a pairwise big-M model is much weaker.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from ortools.sat.python import cp_model

from memmap.baselines.heuristics import greedy, portfolio
from memmap.instance import SLOW, Instance, load_bound

_STATUS = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible",
           cp_model.UNKNOWN: "unknown", cp_model.MODEL_INVALID: "model_invalid"}
_BENEFIT_SCALE = 1_000_000


@dataclasses.dataclass(frozen=True)
class CpSatResult:
  """offsets (None when no solution was found), solver status, objective and proven bound, wall seconds."""
  offsets: np.ndarray | None
  status: str
  objective: float | None
  bound: float | None
  seconds: float


def _solve(model: cp_model.CpModel, time_limit: float, workers: int) -> tuple[cp_model.CpSolver, int, float]:
  solver = cp_model.CpSolver()
  solver.parameters.max_time_in_seconds = float(time_limit)
  solver.parameters.num_workers = workers
  t0 = time.perf_counter()
  status = solver.Solve(model)
  return solver, status, time.perf_counter() - t0


def solve_height(inst: Instance, time_limit: float = 60.0, workers: int = 2, upper_bound: int | None = None,
                 hint: np.ndarray | None = None) -> CpSatResult:
  """Minimises the placement height; status "optimal" also when the height meets the load bound.

  ``hint``: a layout to start from (default: the heuristic portfolio's); offsets above ``upper_bound`` are dropped
  from the hint. ``upper_bound`` defaults to the hint's height.
  """
  hint = portfolio(inst) if hint is None else np.asarray(hint, np.int64)
  ub = int((hint + inst.size).max()) if upper_bound is None else upper_bound
  lb = load_bound(inst)
  a = inst.alignment
  m = cp_model.CpModel()
  h = m.NewIntVar(lb, max(lb, ub), "h")
  xs, ys, offs = [], [], []
  for i in range(inst.n):
    q = m.NewIntVar(0, max(0, (ub - int(inst.size[i])) // a), f"q{i}")
    o = q if a == 1 else m.NewIntVar(0, ub, f"o{i}")
    if a != 1:
      m.Add(o == a * q)
    xs.append(m.NewFixedSizeIntervalVar(int(inst.lower[i]), int(inst.upper[i] - inst.lower[i]), f"x{i}"))
    ys.append(m.NewFixedSizeIntervalVar(o, int(inst.size[i]), f"y{i}"))
    m.Add(o + int(inst.size[i]) <= h)
    offs.append(o)
    if hint[i] + inst.size[i] <= ub:
      m.AddHint(q, int(hint[i]) // a)
  m.AddNoOverlap2D(xs, ys)
  m.Minimize(h)
  solver, status, secs = _solve(m, time_limit, workers)
  if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
    return CpSatResult(None, _STATUS[status], None, float(lb), secs)
  offsets = np.array([solver.Value(o) for o in offs], dtype=np.int64)
  height = int(solver.Value(h))
  name = "optimal" if status == cp_model.OPTIMAL or height == lb else "feasible"
  return CpSatResult(offsets, name, float(height), float(max(lb, solver.BestObjectiveBound())), secs)


def solve_benefit(inst: Instance, capacity: int | None = None, time_limit: float = 60.0,
                  workers: int = 2) -> CpSatResult:
  """Maximises the placed benefit at ``capacity`` (default ``inst.capacity``); unplaced buffers are ``SLOW``."""
  cap = inst.capacity if capacity is None else capacity
  a = inst.alignment
  w = np.round(inst.benefit / max(inst.benefit.max(initial=0.0), 1e-30) * _BENEFIT_SCALE).astype(np.int64)
  hint = greedy(inst, "msa", "best", cap)
  m = cp_model.CpModel()
  xs, ys, offs, pres = [], [], [], []
  for i in range(inst.n):
    z = int(inst.size[i])
    p = m.NewBoolVar(f"p{i}")
    if z > cap:
      m.Add(p == 0)
    q = m.NewIntVar(0, max(0, (cap - z) // a), f"q{i}")
    o = q if a == 1 else m.NewIntVar(0, cap, f"o{i}")
    if a != 1:
      m.Add(o == a * q)
    xs.append(m.NewOptionalFixedSizeIntervalVar(int(inst.lower[i]), int(inst.upper[i] - inst.lower[i]), p, f"x{i}"))
    ys.append(m.NewOptionalFixedSizeIntervalVar(o, min(z, cap), p, f"y{i}"))
    offs.append(o)
    pres.append(p)
    m.AddHint(p, int(hint[i] != SLOW))
    if hint[i] != SLOW:
      m.AddHint(q, int(hint[i]) // a)
  m.AddNoOverlap2D(xs, ys)
  m.Maximize(sum(int(w[i]) * pres[i] for i in range(inst.n)))
  solver, status, secs = _solve(m, time_limit, workers)
  if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
    return CpSatResult(None, _STATUS[status], None, None, secs)
  offsets = np.array([solver.Value(o) if solver.Value(p) else SLOW for o, p in zip(offs, pres)], dtype=np.int64)
  placed = float(inst.benefit[offsets != SLOW].sum())
  bound = solver.BestObjectiveBound() / _BENEFIT_SCALE * max(inst.benefit.max(initial=0.0), 1e-30)
  return CpSatResult(offsets, _STATUS[status], placed, float(bound), secs)
