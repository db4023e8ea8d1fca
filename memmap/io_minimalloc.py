"""MiniMalloc CSV problems and solutions.

Format of google/minimalloc ``src/converter.cc`` (Moffitt, "MiniMalloc: A Lightweight Memory Allocator for Hardware-
Accelerated Machine Learning", ASPLOS 2023, doi 10.1145/3623278.3624752): a header ``id,lower,upper,size`` with
half-open live intervals ``[lower, upper)``, rows in any order. Synonyms: ``buffer``/``buffer_id`` for id,
``begin``/``start`` for lower, ``end`` for an inclusive upper (read as end + 1). Optional ``alignment`` (their lcm is
used), ``hint`` and ``gaps`` (both read and ignored: a gapped buffer is treated as live throughout, which is
conservative) and ``offset`` (a solution; empty = left in slow memory). The capacity is taken from file names of the
form ``NAME.<capacity>.csv`` unless given.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from memmap.instance import SLOW, Instance

_SYNONYMS = {"buffer": "id", "buffer_id": "id", "begin": "lower", "start": "lower", "end": "end"}
_KNOWN = {"id", "lower", "upper", "end", "size", "alignment", "hint", "gaps", "offset"}


def capacity_from_name(path: str | Path) -> int | None:
  """``A.1048576.csv`` -> 1048576; None when the name carries no capacity."""
  parts = Path(path).name.split(".")
  return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def read_csv(path: str | Path, capacity: int | None = None) -> tuple[Instance, np.ndarray | None]:
  """Reads a MiniMalloc problem (or solution) file.

  Returns:
    (instance, offsets): offsets is int64[N] with ``SLOW`` for empty cells when the file has an ``offset`` column,
    else None. Capacity: the argument, else the file name's, else the sum of sizes (no limit).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such MiniMalloc CSV file: {path}")
  with path.open(newline="") as fh:
    reader = csv.reader(fh)
    header = [h.strip().lower() for h in next(reader, [])]
    cols = [_SYNONYMS.get(h, h) for h in header]
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes:
      raise ValueError(f"{path}: duplicate column(s) {dupes} (synonyms count as the same column).")
    unknown = sorted(set(cols) - _KNOWN)
    if unknown:
      raise ValueError(f"{path}: unknown column(s) {unknown}; allowed: {sorted(_KNOWN | set(_SYNONYMS))}.")
    need = {"id", "size", "lower"}
    if not need <= set(cols) or ("upper" in cols) == ("end" in cols):
      raise ValueError(f"{path}: header {header} needs id, lower, size and exactly one of upper / end.")
    rows = [dict(zip(cols, (c.strip() for c in r))) for r in reader if r and any(c.strip() for c in r)]
  try:
    lower = np.array([int(r["lower"]) for r in rows], dtype=np.int64)
    upper = np.array([int(r["upper"]) if "upper" in r else int(r["end"]) + 1 for r in rows], dtype=np.int64)
    size = np.array([int(r["size"]) for r in rows], dtype=np.int64)
    align = [int(r["alignment"]) for r in rows if r.get("alignment")]
  except ValueError as e:
    raise ValueError(f"{path}: a lower/upper/size/alignment cell is not an integer ({e}).") from None
  cap = capacity or capacity_from_name(path) or int(size.sum()) or 1
  inst = Instance(ids=tuple(r["id"] for r in rows), lower=lower, upper=upper, size=size, capacity=cap,
                  alignment=math.lcm(*align) if align else 1)
  offsets = None
  if "offset" in cols:
    offsets = np.array([int(r["offset"]) if r["offset"] else SLOW for r in rows], dtype=np.int64)
  return inst, offsets


def write_csv(path: str | Path, inst: Instance, offsets: np.ndarray | None = None) -> None:
  """Writes ``id,lower,upper,size`` (plus ``offset``, empty for slow-memory buffers, when offsets are given)."""
  with Path(path).open("w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["id", "lower", "upper", "size"] + (["offset"] if offsets is not None else []))
    for i in range(inst.n):
      row = [inst.ids[i], int(inst.lower[i]), int(inst.upper[i]), int(inst.size[i])]
      if offsets is not None:
        row.append("" if offsets[i] == SLOW else int(offsets[i]))
      w.writerow(row)
