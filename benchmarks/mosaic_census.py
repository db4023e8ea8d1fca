"""Where a Miras Mosaic GPU kernel's arithmetic goes, by named scope, lowered on any machine (no GPU needed).

A Mosaic GPU kernel lowers to one thread's code: every array op is split into ops on the registers the thread holds
(``vector<2xf32>`` pairs for a float32 array in the WGMMA layout), each located in the ``jax.named_scope`` that
traced it. This counts the floating-point ops (and among them divisions and exponentials) and the loads and stores
in each scope of the chunk loop, per thread and chunk, from the module lowered for an abstract H100 on this CPU.
Counts are taken before LLVM and ptxas: address arithmetic folds away there, float ops mostly stay, and each
``arith.divf`` becomes a whole IEEE division (div.rn.f32, a subroutine of about ten instructions) unless its divisor
is a power of two. Ops in a ``pl.when`` body count under the scopes opened inside it. So compare scopes and versions
of a kernel with it, and time them on a GPU (``benchmarks/miras_keys.py``): the twenty-first session found 80 of the
chain kernel's 126 vector divisions a chunk this way, all by constants (docs/benchmarks.md).

  PYTHONPATH=. python benchmarks/mosaic_census.py --kernel chain --json census.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import re
import sys

import jax

from benchmarks.miras_keys import MONETA, backward_inputs, keys_inputs
from benchmarks.triton_compile import lowered_for_h100
from layers.kernels.miras import mosaic_chain, mosaic_keys

KERNELS = ("forward", "chain")
OUTSIDE = "(outside the named scopes)"
_FLOAT = re.compile(r"^(arith\.(add|sub|mul|div|neg|cmp|maximum|minimum)f|arith\.(select|truncf|extf)|math\.\w+)$")
_MEMORY = re.compile(r"^(llvm|memref|vector)\.(load|store)$")
_SCOPE = re.compile(r'"([^"/]+)/')


def _traced(kernel: str):
  """The kernel's function and abstract arguments (two chunks of one head)."""
  if kernel == "forward":
    return functools.partial(mosaic_keys.keys_forward, MONETA), jax.eval_shape(functools.partial(keys_inputs, 2, 1))
  return (functools.partial(mosaic_chain.keys_backward, MONETA),
          jax.eval_shape(functools.partial(backward_inputs, MONETA, 2, 1)))


def _nested(op):
  """op and every op in its regions, depth first."""
  yield op
  for region in op.regions:
    for block in region:
      for inner in block:
        yield from _nested(inner.operation)


def mosaic_modules(lowered) -> list:
  """The Mosaic GPU modules (parsed, with their locations) of every Mosaic GPU call in a lowered jit."""
  from jax._src.interpreters import mlir
  from jax._src.lib import mosaic_gpu_dialect
  from jax._src.lib.mlir import ir

  calls = [op.attributes["mhlo.backend_config"]["module"].value_bytes
           for op in _nested(lowered.compiler_ir("stablehlo").operation)
           if op.name == "stablehlo.custom_call" and "mosaic_gpu" in str(op.attributes["call_target_name"])]
  context = mlir.make_ir_context()
  mosaic_gpu_dialect.register_dialect(context)
  context.allow_unregistered_dialects = True
  with context:
    return [ir.Module.parse(module) for module in calls]


def census(module) -> dict:
  """{scope: {"float": n, "divf": n, "exp": n, "memory": n}} over the module's ops (one thread's code); ops of the
  serialised module carry the dialect prefix ``stable_mosaic_gpu.``, dropped here. With ``approx_math`` (the
  kernels' setting) an exponential is an inline ex2.approx a value (two a float32 pair), each counted."""
  counts = collections.defaultdict(collections.Counter)
  for op in _nested(module.operation):
    name = op.name.removeprefix("stable_mosaic_gpu.")
    approx_exp = name == "llvm.inline_asm" and "ex2.approx" in str(op.attributes["asm_string"])
    if not (_FLOAT.match(name) or _MEMORY.match(name) or approx_exp):
      continue
    scope = _SCOPE.search(str(op.location))
    row = counts[scope.group(1) if scope else OUTSIDE]
    if _MEMORY.match(name):
      row["memory"] += 1
    else:
      row["float"] += 1
      row["divf"] += name == "arith.divf"
      row["exp"] += name == "math.exp" or approx_exp
  return {scope: dict(row) for scope, row in sorted(counts.items())}


def kernel_census(kernel: str) -> dict:
  """:func:`census` of the kernel's (only) Mosaic GPU module."""
  fun, args = _traced(kernel)
  (module,) = mosaic_modules(lowered_for_h100(fun, *args))
  return census(module)


def format_table(kernel: str, rows: dict) -> str:
  lines = [f"{kernel}: ops a thread issues for one chunk, before LLVM (vector ops count once)",
           "| scope | float | divf | exp | loads and stores |", "|-|-|-|-|-|"]
  for scope, row in sorted(rows.items(), key=lambda kv: -kv[1].get("float", 0)):
    lines.append(f"| {scope} | {row.get('float', 0)} | {row.get('divf', 0)} | {row.get('exp', 0)} | "
                 f"{row.get('memory', 0)} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kernel", choices=KERNELS, action="append", help=f"any of {KERNELS} (default: all)")
  parser.add_argument("--json", default="", help="write the counts here")
  args = parser.parse_args()
  results = {kernel: kernel_census(kernel) for kernel in args.kernel or KERNELS}
  for kernel, rows in results.items():
    print(format_table(kernel, rows), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"argv": sys.argv, "census": results}, f, indent=1)


if __name__ == "__main__":
  main()
