"""Where a GPU kernel's register spills are, by source line, from its PTX on any machine (ptxas and nvdisasm).

Mosaic GPU writes a kernel's PTX when asked (on the GPU: ``MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=DIR``), with the
Python source lines that traced each instruction (``.loc``). This assembles the PTX for sm_90a (``ptxas -v
-lineinfo``: registers, spill bytes, stack) and disassembles the cubin with its line table (``nvdisasm -g``), then
counts the spill stores (STL) and reloads (LDL) under each source line in the order of the code, marking those
before the kernel's main loop (its longest backward branch): values computed before the loop and spilled there are
loop-invariant values held across it, reloaded in every iteration. That is how the twenty-second session found
that LLVM had hoisted every wgmma descriptor of the Miras chain kernel out of its chunk loop (107 of its 208 spill
stores before the loop; ``mosaic_keys.loop_zero``; docs/benchmarks.md).

Needs ptxas and nvdisasm of CUDA ≥ 13 (Mosaic GPU's PTX is version 9.0): a CUDA toolkit on ``PATH`` or in
``$CUDA_HOME/bin``, or the pip wheels ``nvidia-cuda-nvcc`` and ``nvidia-cuda-nvdisasm`` (not memlab dependencies).

  PYTHONPATH=. python benchmarks/ptx_spills.py DIR/body_0.ptx --json spills.json
Prints ptxas's report and a table; writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import linecache
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

_LOCATION = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_TARGET = re.compile(r"\((\.L_x_\d+)\)")
_PTXAS = {"registers": r"Used (\d+) registers", "spill_store_bytes": r"(\d+) bytes spill stores",
          "spill_load_bytes": r"(\d+) bytes spill loads", "stack_frame_bytes": r"(\d+) bytes stack frame"}


@dataclasses.dataclass
class LineSpills:
  """The spill instructions of one source line: stores, reloads, stores before the main loop, and the address of
  its first spill instruction."""

  file: str
  line: int
  stores: int = 0
  loads: int = 0
  stores_before_loop: int = 0
  first_address: int = 0


def find_tool(name: str) -> str | None:
  """A CUDA tool's path: ``$CUDA_HOME/bin``, ``PATH``, or the ``nvidia`` pip wheels' ``cu*/bin``; None if absent."""
  home = os.environ.get("CUDA_HOME")
  candidates = [pathlib.Path(home, "bin", name)] if home else []
  if (on_path := shutil.which(name)) is not None:
    candidates.append(pathlib.Path(on_path))
  if (spec := importlib.util.find_spec("nvidia")) is not None:
    for root in spec.submodule_search_locations or []:
      candidates += sorted(pathlib.Path(root).glob(f"cu*/bin/{name}"), reverse=True)
  return next((str(path) for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def ptxas_report(text: str) -> dict:
  """ptxas -v's registers, spill bytes and stack frame as numbers (absent ones are 0); also
  ``benchmarks/triton_compile.py``'s reading of the Triton kernels' ptxas."""
  found = {key: re.search(pattern, text) for key, pattern in _PTXAS.items()}
  return {key: int(match.group(1)) if match else 0 for key, match in found.items()}


def main_loop(sass: str) -> tuple[int, int] | None:
  """(first, last) line index of the code's longest backward branch's span in ``nvdisasm -g`` text, or None."""
  labels, spans = {}, []
  for i, text in enumerate(sass.splitlines()):
    if (label := _LABEL.match(text)) is not None:
      labels[label.group(1)] = i
    elif (branch := _INSTRUCTION.search(text)) is not None and branch.group(2).startswith("BRA"):
      target = _TARGET.search(branch.group(3))
      if target is not None and labels.get(target.group(1), i) < i:
        spans.append((labels[target.group(1)], i))
  return max(spans, key=lambda span: span[1] - span[0], default=None)


def spills_by_line(sass: str) -> list[LineSpills]:
  """Every source line with spill instructions in ``nvdisasm -g`` text, in the order of its first one."""
  loop = main_loop(sass)
  rows, where = {}, ("?", 0)
  for i, text in enumerate(sass.splitlines()):
    if (location := _LOCATION.search(text)) is not None:
      where = (location.group(1), int(location.group(2)))
      continue
    instruction = _INSTRUCTION.search(text)
    if instruction is None or instruction.group(2)[:3] not in ("STL", "LDL"):
      continue
    row = rows.setdefault(where, LineSpills(*where, first_address=int(instruction.group(1), 16)))
    if instruction.group(2).startswith("STL"):
      row.stores += 1
      row.stores_before_loop += loop is not None and i < loop[0]
    else:
      row.loads += 1
  return sorted(rows.values(), key=lambda row: row.first_address)


def assemble(ptx: str, arch: str = "sm_90a") -> tuple[dict, str]:
  """(ptxas's report, ``nvdisasm -g`` text) of a PTX file, assembled in a temporary directory."""
  ptxas, nvdisasm = find_tool("ptxas"), find_tool("nvdisasm")
  if ptxas is None or nvdisasm is None:
    raise FileNotFoundError("needs ptxas and nvdisasm of CUDA ≥ 13: a CUDA toolkit on PATH or in $CUDA_HOME/bin, "
                            "or pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm")
  with tempfile.TemporaryDirectory() as tmp:
    cubin = os.path.join(tmp, "kernel.cubin")
    assembled = subprocess.run([ptxas, f"-arch={arch}", "-v", "-lineinfo", ptx, "-o", cubin],
                               capture_output=True, text=True, check=False)
    if assembled.returncode:
      raise RuntimeError(f"ptxas failed on {ptx}:\n{assembled.stderr}")
    sass = subprocess.run([nvdisasm, "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
  return ptxas_report(assembled.stdout + assembled.stderr), sass


def format_table(name: str, report: dict, rows: list[LineSpills]) -> str:
  """A markdown table of the spills by source line, under ptxas's report."""
  lines = [f"{name}: {report['registers']} registers, {report['spill_store_bytes']} B spill stores, "
           f"{report['spill_load_bytes']} B spill loads, {report['stack_frame_bytes']} B stack frame",
           "| first address | source line | STL (before the main loop) | LDL | code |", "|-|-|-|-|-|"]
  for row in rows:
    code = linecache.getline(row.file, row.line).strip()[:80].replace("|", "\\|")
    lines.append(f"| {row.first_address:#x} | {os.path.basename(row.file)}:{row.line} | {row.stores} "
                 f"({row.stores_before_loop}) | {row.loads} | `{code}` |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("ptx", nargs="+", help="PTX files (Mosaic GPU's dumps)")
  parser.add_argument("--arch", default="sm_90a")
  parser.add_argument("--json", default="", help="write {file: {ptxas, lines}} here")
  args = parser.parse_args(argv)
  results = {}
  for ptx in args.ptx:
    report, sass = assemble(ptx, args.arch)
    rows = spills_by_line(sass)
    print(format_table(ptx, report, rows), flush=True)
    results[ptx] = {"ptxas": report, "lines": [dataclasses.asdict(row) for row in rows]}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
