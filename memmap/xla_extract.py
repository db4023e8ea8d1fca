"""Buffer sets of real XLA-compiled JAX programs, read from XLA's per-module dumps.

The temporaries XLA packs into its ``preallocated-temp`` allocation are the buffers a memory mapper places (Wang et
al., arXiv 2305.07440, map the buffers of compiled XLA programs). We compile with ``compiler_options={"xla_dump_to":
DIR, "xla_dump_hlo_as_text": True}`` and read three files:
  ``*-buffer-assignment.txt`` (openxla/xla ``buffer_assignment.cc``): allocations with their kind and each value's
    size and offset inside its allocation (XLA's own layout);
  ``*-live-range.txt`` (``hlo_live_range.cc``): the schedule and each value's live range ``name{index}:start-end``,
    read as half-open ``[start, end)`` (with that reading XLA's own temp layout has no overlaps);
  ``*-buffer-assignment-values.txt``: each value's uses, for the per-op traffic of ``memmap.cost_model``.
Totals are cross-checked against ``compiled.memory_analysis()``: argument = sum of parameter allocations, output =
sum of maybe-live-out ones, alias = both, temp = sum of preallocated-temp ones. (On CPU ``peak_memory_in_bytes``
excludes temps, so it is never used as an oracle.)

Decision (cost model inputs): an op writes the values it defines and reads the values it uses; compute is
``flops / F`` with ``flops = 2 * |out| * K`` for a top-level ``dot`` and ``|out|`` otherwise (fusions hide their
internals, so this undercounts fused matmuls).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
from pathlib import Path

import jax
import numpy as np

from memmap.cost_model import Program, ridge_compute
from memmap.instance import Instance, PlacementError, validate

_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*):\s*$")
_VALUE = re.compile(r"^ value: <(\d+) ([^\s>{]+)(\{[\d,]*\})?(?: \(phi\))?(?: @(\d+))?> \(size=(\d+),offset=(\d+)\):"
                    r" (.*)$")
_RANGE = re.compile(r"^\s+(\S+?)(\{[\d,]*\}):(\d+)-(\d+)\s*$")
_SEQ = re.compile(r"^\s+(\d+):(\S+)\s*$")
_SHAPE = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_DTYPE_BYTES = re.compile(r"^[a-z]+(\d+)")


class ExtractError(RuntimeError):
  """XLA wrote no dump (e.g. a compilation-cache hit) or a dump could not be parsed."""


@dataclasses.dataclass(frozen=True)
class Allocation:
  index: int
  size: int
  kinds: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Value:
  key: str
  allocation: int
  size: int
  offset: int
  shape: str


@dataclasses.dataclass(frozen=True, eq=False)
class XlaBuffers:
  """The temporaries of one compiled module as a placement instance, XLA's layout of them and a cost program."""
  instance: Instance
  xla_offsets: np.ndarray
  program: Program
  allocations: tuple[Allocation, ...]
  memory_analysis: dict[str, int]
  schedule: tuple[str, ...]

  @property
  def xla_height(self) -> int:
    return int(sum(a.size for a in self.allocations if "preallocated-temp" in a.kinds))

  def totals(self) -> dict[str, tuple[int, int]]:
    """name -> (from the buffer assignment, from memory_analysis()) for argument/output/alias/temp bytes."""
    def total(*kinds):
      return sum(a.size for a in self.allocations if all(k in a.kinds for k in kinds))
    ours = {"argument": total("parameter"), "output": total("maybe-live-out"),
            "alias": total("parameter", "maybe-live-out"), "temp": total("preallocated-temp")}
    return {k: (v, self.memory_analysis[f"{k}_size_in_bytes"]) for k, v in ours.items()}


def compile_with_dump(lowered: jax.stages.Lowered, dump_dir: str | os.PathLike | None = None):
  """Compiles ``lowered`` with XLA dumps into a fresh folder; returns (compiled, {suffix: path})."""
  dump_dir = Path(dump_dir or tempfile.mkdtemp(prefix="memmap_xla_"))
  if dump_dir.exists() and any(dump_dir.iterdir()):
    raise ExtractError(f"dump folder {dump_dir} is not empty; use a fresh one so old dumps are not mixed in.")
  compiled = lowered.compile(compiler_options={"xla_dump_to": str(dump_dir), "xla_dump_hlo_as_text": True})
  files = {}
  for suffix in ("-buffer-assignment.txt", "-live-range.txt", "-buffer-assignment-values.txt"):
    found = sorted(glob.glob(str(dump_dir / f"*after_optimizations{suffix}")))
    if not found:
      raise ExtractError(f"XLA wrote no *{suffix} into {dump_dir} (a compilation-cache hit writes nothing; disable "
                         "the persistent cache or change the function).")
    files[suffix] = Path(found[-1])
  return compiled, files


def parse_buffer_assignment(text: str) -> tuple[list[Allocation], list[Value]]:
  allocs, values, current = [], [], None
  for line in text.splitlines():
    if m := _ALLOC.match(line):
      flags = {f.strip().split(" ")[0] for f in m.group(3).split(",") if f.strip()}
      current = int(m.group(1))
      allocs.append(Allocation(current, int(m.group(2)), frozenset(flags)))
    elif (m := _VALUE.match(line)) and current is not None:
      key = m.group(2) + (m.group(3) or "{}")
      values.append(Value(key, current, int(m.group(5)), int(m.group(6)), m.group(7)))
  if not allocs:
    raise ExtractError("no 'allocation N: size S' lines in the buffer-assignment dump.")
  return allocs, values


def parse_live_ranges(text: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
  """(schedule, {value key: (start, end)}) from an HloLiveRange dump."""
  schedule, ranges, section = [], {}, None
  for line in text.splitlines():
    s = line.strip()
    if s.startswith("InstructionSequence"):
      section = "seq"
    elif s.startswith("BufferLiveRange"):
      section = "ranges"
    elif s.startswith("Live ranges at"):
      section = None
    elif section == "seq" and (m := _SEQ.match(line)):
      schedule.append(m.group(2))
    elif section == "ranges" and (m := _RANGE.match(line)):
      ranges[m.group(1) + m.group(2)] = (int(m.group(3)), int(m.group(4)))
  if not schedule:
    raise ExtractError("no InstructionSequence in the live-range dump.")
  return schedule, ranges


def parse_values(text: str) -> dict[str, tuple[list[str], str]]:
  """{instruction name: (users, defining HLO line)} from the buffer-assignment-values dump."""
  out, name, mode = {}, None, None
  for line in text.splitlines():
    if line.startswith("<"):
      name = line[1:].split()[1].split("{")[0]
      out.setdefault(name, ([], ""))
      mode = None
    elif name is None:
      continue
    elif line.strip() in ("positions:", "uses:"):
      mode = line.strip()
    elif line.startswith(" from instruction:"):
      out[name] = (out[name][0], line.split(":", 1)[1].strip())
    elif mode == "uses:" and line.startswith("  "):
      out[name][0].append(line.strip().split(",")[0])
  return out


def _dims(shape: str) -> list[int]:
  m = _SHAPE.match(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _flops(hlo: str, out_elems: int, shapes: dict[str, str]) -> float:
  m = re.search(r"\bdot\(%([^,\s]+), %[^)\s]+\).*lhs_contracting_dims=\{([\d,]*)\}", hlo)
  if not m or m.group(1) not in shapes:
    return float(out_elems)
  lhs = _dims(shapes[m.group(1)])
  k = math.prod(lhs[int(d)] for d in m.group(2).split(",") if d and int(d) < len(lhs))
  return 2.0 * out_elems * k


def build(compiled, files: dict[str, Path], capacity_fraction: float = 1.0) -> XlaBuffers:
  """Turns the dumps of one module into an :class:`XlaBuffers` (capacity = fraction * XLA's temp height)."""
  allocs, values = parse_buffer_assignment(files["-buffer-assignment.txt"].read_text())
  schedule, ranges = parse_live_ranges(files["-live-range.txt"].read_text())
  uses = parse_values(files["-buffer-assignment-values.txt"].read_text())
  kinds = {a.index: a.kinds for a in allocs}
  temp_base, base = {}, 0
  for a in allocs:
    if "preallocated-temp" in a.kinds:
      temp_base[a.index], base = base, base + a.size
  temps = [v for v in values if "preallocated-temp" in kinds[v.allocation]]
  missing = [v.key for v in temps if v.key not in ranges]
  if missing:
    raise ExtractError(f"temp values without a live range: {missing[:5]}")
  lower = np.array([ranges[v.key][0] for v in temps], dtype=np.int64)
  upper = np.array([max(ranges[v.key][1], ranges[v.key][0] + 1) for v in temps], dtype=np.int64)
  size = np.array([v.size for v in temps], dtype=np.int64)
  xla_offsets = np.array([temp_base[v.allocation] + v.offset for v in temps], dtype=np.int64)

  pos = {name: k for k, name in enumerate(schedule)}
  shapes = {v.key.split("{")[0]: v.shape for v in values}
  p, n = len(schedule), len(temps)
  reads, writes, other, out_elems = np.zeros((p, n)), np.zeros((p, n)), np.zeros(p), np.zeros(p)
  temp_index = {v.key.split("{")[0]: i for i, v in enumerate(temps)}
  for v in values:
    name = v.key.split("{")[0]
    users = [pos[u] for u in uses.get(name, ([], ""))[0] if u in pos]
    at = pos.get(name)
    if at is not None:
      out_elems[at] += math.prod(_dims(v.shape)) if _dims(v.shape) else 1
    i = temp_index.get(name) if "preallocated-temp" in kinds[v.allocation] else None
    for k in users:
      if i is None:
        other[k] += v.size
      else:
        reads[k, i] += v.size
    if at is not None:
      if i is None:
        other[at] += v.size
      else:
        writes[at, i] += v.size
  flops = np.array([_flops(uses.get(name, ([], ""))[1], int(out_elems[k]), shapes) for k, name in enumerate(schedule)])
  mem_slow = reads.sum(1) + writes.sum(1) + other
  program = Program(compute=ridge_compute(flops, mem_slow), mult=np.ones(p), reads=reads, writes=writes, other=other)
  height = int(sum(a.size for a in allocs if "preallocated-temp" in a.kinds))
  capacity = int(capacity_fraction * height)
  if height and capacity < 1:
    raise ValueError(f"capacity fraction {capacity_fraction} of XLA's temp height ({height} B) is below one byte.")
  inst = Instance(ids=tuple(v.key for v in temps), lower=lower, upper=upper, size=size,
                  capacity=max(capacity, 1), benefit=program.additive_benefit())  # 1: a program without temps
  ma = compiled.memory_analysis()
  memory = {f: int(getattr(ma, f)) for f in dir(ma) if f.endswith("_in_bytes") and not f.startswith("_")}
  return XlaBuffers(inst, xla_offsets, program, tuple(allocs), memory, tuple(schedule))


def extract(lowered: jax.stages.Lowered, capacity_fraction: float = 1.0,
            dump_dir: str | os.PathLike | None = None) -> XlaBuffers:
  """Compiles ``lowered`` with dumps and returns its temporaries; XLA's layout is checked with the validator."""
  compiled, files = compile_with_dump(lowered, dump_dir)
  bufs = build(compiled, files, capacity_fraction)
  try:
    validate(bufs.instance, bufs.xla_offsets, capacity=bufs.xla_height)
  except PlacementError as e:
    raise ExtractError(f"XLA's own temp layout fails the half-open validator: {e}") from None
  return bufs
