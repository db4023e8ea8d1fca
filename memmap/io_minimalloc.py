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

MAX_VALUE = 2**48  # bytes or time ticks: 256 TiB; larger numbers are input errors (and would overflow int64 sums)
_SYNONYMS = {"buffer": "id", "buffer_id": "id", "begin": "lower", "start": "lower", "end": "end"}
_KNOWN = {"id", "lower", "upper", "end", "size", "alignment", "hint", "gaps", "offset"}


def capacity_from_name(path: str | Path) -> int | None:
  """``A.1048576.csv`` -> 1048576; None when the name carries no capacity."""
  parts = Path(path).name.split(".")
  if len(parts) < 3 or not parts[-2].isdecimal():
    return None
  cap = int(parts[-2])
  if not 1 <= cap <= MAX_VALUE:
    raise ValueError(f"{path}: the capacity {parts[-2]} in the file name must be in [1, {MAX_VALUE}].")
  return cap


def _integer(text: str, column: str, line: int, path: Path) -> int:
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f"{path} line {line}: {column} {text!r} is not an integer.") from None
  if not -MAX_VALUE <= value <= MAX_VALUE:
    raise ValueError(f"{path} line {line}: {column} {text[:30]}{'...' if len(text) > 30 else ''} is out of range "
                     f"(|value| <= {MAX_VALUE}).")
  return value


def read_csv(path: str | Path, capacity: int | None = None) -> tuple[Instance, np.ndarray | None]:
  """Reads a MiniMalloc problem (or solution) file.

  Returns:
    (instance, offsets): offsets is int64[N] with ``SLOW`` for empty cells when the file has an ``offset`` column,
    else None. Capacity: the argument, else the file name's, else the sum of sizes (no limit).
  """
  path = Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"{path} is a folder, not a MiniMalloc CSV file.")
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
    rows, lines = [], []
    for r in reader:
      if not r or not any(c.strip() for c in r):
        continue
      if len(r) != len(cols):
        raise ValueError(f"{path} line {reader.line_num}: {len(r)} cells for {len(cols)} columns {header}.")
      rows.append(dict(zip(cols, (c.strip() for c in r))))
      lines.append(reader.line_num)
  value = lambda r, line, col: _integer(r[col], col, line, path)
  lower = np.array([value(r, ln, "lower") for r, ln in zip(rows, lines)], dtype=np.int64)
  upper = np.array([value(r, ln, "upper") if "upper" in r else value(r, ln, "end") + 1 for r, ln in zip(rows, lines)],
                   dtype=np.int64)
  size = np.array([value(r, ln, "size") for r, ln in zip(rows, lines)], dtype=np.int64)
  align = [value(r, ln, "alignment") for r, ln in zip(rows, lines) if r.get("alignment")]
  if any(a < 1 for a in align) or math.lcm(*align) > MAX_VALUE:
    raise ValueError(f"{path}: alignments must be positive integers whose lcm is at most {MAX_VALUE}.")
  name_cap = capacity_from_name(path)
  cap = capacity if capacity is not None else name_cap if name_cap is not None else max(int(size.sum()), 1)
  inst = Instance(ids=tuple(r["id"] for r in rows), lower=lower, upper=upper, size=size, capacity=cap,
                  alignment=math.lcm(*align) if align else 1)
  offsets = None
  if "offset" in cols:
    offsets = np.array([value(r, ln, "offset") if r["offset"] else SLOW for r, ln in zip(rows, lines)],
                       dtype=np.int64)
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
