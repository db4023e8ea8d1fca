"""Compile the Miras Pallas (Triton) kernels for an H100 on a machine without a GPU: shared memory, registers, time.

The kernels (``--impl pallas_triton``: ``layers/kernels/miras/pallas_triton.py``'s forward and backward;
``--impl pallas_tiles``: ``pallas_tiles.py``'s and ``pallas_reads.py``'s, each by its name) are lowered for an
abstract H100 to Triton IR
(``layers.kernels.jax_compat.triton_modules``), and each IR module is compiled to a cubin for sm_90a by the
``triton`` package (OpenAI's compiler, which is what XLA runs on that IR too; its bundled ptxas). Reported per
kernel (forward, backward) and launch setting: the shared memory the kernel needs, against the 227 KiB a block may
use on H100/H200 (a kernel above it fails at launch), the compile time, and with ``--ptxas-info`` ptxas's registers
per thread and spill bytes. This is what a GPU would say before it says anything about time; on an H100 the spill
bytes of the tiled kernels have tracked their time (docs/benchmarks.md, "Sixteenth session").

Needs ``pip install triton`` (not a memlab dependency; CPU-only is fine). Example:
  PYTHONPATH=. python benchmarks/triton_compile.py --gates head,channel --hidden-tile 64,32 --warps 4,8 \\
      --json triton_compile.json --ptxas-info
  PYTHONPATH=. python benchmarks/triton_compile.py --impl pallas_tiles --gates head --warps 4,8 --ptxas-info \\
      --keys-forward mosaic
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.ptx_spills import ptxas_report

H100_SHARED_BYTES = 232_448  # 227 KiB: the most dynamic shared memory one block may opt into on sm_90


def lowered_for_h100(fun, *args):
  """``fun`` jitted, traced at ``args`` (arrays or ShapeDtypeStructs) and lowered for an abstract H100, on any
  machine: the module with every kernel as the GPU would receive it (Triton IR, Mosaic GPU)."""
  import jax

  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=h100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fun).trace(*args).lower(lowering_platforms=("cuda",))


def triton_ir(spec, gates: str, chunk: int, head_dim: int, tuning, matmul: str) -> dict[str, str]:
  """The Triton IR of the kernels of one fwd+bwd, lowered for an abstract H100: {"forward": IR, "backward": IR}
  for ``pallas_triton`` (``tuning`` a ``pallas_triton.Tuning``), {kernel name: IR} for ``pallas_tiles`` (a
  ``pallas_tiles.Tiling``)."""
  import jax
  import jax.numpy as jnp

  from layers.kernels.jax_compat import triton_modules
  from layers.kernels.miras import pallas_tiles, pallas_triton
  from layers.miras.spec import Gates

  g = head_dim if gates == "channel" else 1
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  x = shape(1, 2 * chunk, 1, head_dim)
  gate = Gates(eta=shape(1, 2 * chunk, 1, g), log_alpha=shape(1, 2 * chunk, 1, g), delta=None)
  state = {n: shape(1, 1, *s) for n, s in spec.memory.shapes(head_dim).items()}
  tiled = isinstance(tuning, pallas_tiles.Tiling)
  run = (functools.partial(pallas_tiles.miras_tiles, tiling=tuning) if tiled
         else functools.partial(pallas_triton.miras_pallas, tuning=tuning))
  run = functools.partial(run, spec=spec, chunk_size=chunk, matmul=matmul)
  loss = lambda q, k, v, gate, state: jnp.sum(run(q, k, v, gate, initial_state=state)[0])
  with triton_modules() as modules:
    lowered_for_h100(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), x, x, x, gate, state)
  if tiled:
    return {re.match(r"module @(\w+)", ir).group(1): ir for ir in modules}
  if len(modules) != 2:
    raise RuntimeError(f"expected the forward and backward kernels, lowered {len(modules)} Triton modules")
  return dict(zip(("forward", "backward"), modules, strict=True))


def compile_ir(ir: str, num_warps: int, ptxas_info: bool, num_stages: int = 1) -> dict:
  """Compile one Triton IR module for sm_90a at ``num_warps`` and ``num_stages`` (Triton's software pipelining):
  shared bytes, seconds, and ptxas's registers and spills if asked."""
  import triton
  from triton.backends.compiler import GPUTarget

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ir)
    start = time.perf_counter()
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
    row = {"compile_s": time.perf_counter() - start, "shared_bytes": kernel.metadata.shared,
           "wgmma": kernel.asm["ptx"].count("wgmma.mma_async")}
    if ptxas_info:
      row |= _ptxas_info(kernel.asm["ptx"], tmp)
  row["fits_h100"] = row["shared_bytes"] <= H100_SHARED_BYTES
  return row


def _ptxas_info(ptx: str, tmp: str) -> dict:
  """Registers per thread, spill bytes and stack frame from ``ptxas -v`` (the newest ptxas triton bundles)."""
  import triton

  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  ptxas = max((os.path.join(bin_dir, n) for n in os.listdir(bin_dir) if n.startswith("ptxas")),
              key=lambda p: subprocess.run([p, "--version"], capture_output=True, text=True).stdout.split()[-1])
  path = os.path.join(tmp, "kernel.ptx")
  with open(path, "w") as f:
    f.write(ptx)
  log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True).stderr
  return ptxas_report(log)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", default="pallas_triton", choices=("pallas_triton", "pallas_tiles"))
  parser.add_argument("--model", default="moneta", help="a Miras mixer (moneta, yaad)")
  parser.add_argument("--gates", default="head,channel", help="comma list of head, channel")
  parser.add_argument("--hidden-tile", default="64", help="comma list (Tuning / Tiling.hidden_tile)")
  parser.add_argument("--warps", default="4", help="comma list of Triton num_warps")
  parser.add_argument("--stages", default="1", help="comma list of Triton num_stages (the reads run at 3)")
  parser.add_argument("--matmul", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--kernels", default="", help="comma list of the kernels to compile (default: all): forward, "
                      "backward (pallas_triton); the kernels' names (pallas_tiles, e.g. _close_kernel)")
  parser.add_argument("--keys-forward", default="triton", choices=("triton", "mosaic"),
                      help="pallas_tiles: the keys' forward whose residuals the other kernels take (mosaic: bf16 "
                      "stacked start states, as pallas_mosaic_bf16 runs them)")
  parser.add_argument("--ptxas-info", action="store_true", help="also run ptxas -v for registers and spills")
  parser.add_argument("--json", default="triton_compile.json")
  args = parser.parse_args()
  try:
    import triton  # noqa: F401
  except ImportError:
    sys.exit("benchmarks/triton_compile.py needs the triton package: pip install triton")
  from layers.kernels.miras.pallas_tiles import Tiling
  from layers.kernels.miras.pallas_triton import Tuning
  from research.models.registry import MIXERS

  split = lambda s: [x for x in s.split(",") if x]
  rows = []
  for gates in split(args.gates):
    spec = MIXERS.config_class(args.model)(gates=gates, chunk_size=args.chunk).memory_spec()
    for tile in (int(m) for m in split(args.hidden_tile)):
      settings = (Tiling(hidden_tile=tile, keys_forward=args.keys_forward) if args.impl == "pallas_tiles"
                  else Tuning(hidden_tile=tile))
      modules = triton_ir(spec, gates, args.chunk, args.head_dim, settings, args.matmul)
      if unknown := set(split(args.kernels)) - set(modules):
        sys.exit(f"no kernels {sorted(unknown)} in {args.impl}; it has {sorted(modules)}")
      for kernel in split(args.kernels) or list(modules):
        for warps, stages in itertools.product((int(w) for w in split(args.warps)),
                                               [int(n) for n in split(args.stages)]):
          row = {"impl": args.impl, "model": args.model, "gates": gates, "kernel": kernel,
                 **dataclasses.asdict(dataclasses.replace(settings, num_warps=warps, num_stages=stages)),
                 "matmul": args.matmul, "chunk": args.chunk, "head_dim": args.head_dim, "target": "sm_90a"}
          try:
            row |= compile_ir(modules[kernel], warps, args.ptxas_info, stages)
          except Exception as e:  # noqa: BLE001 - report and go on with the other settings
            row["error"] = repr(e)[:400]
          print(json.dumps(row), flush=True)
          rows.append(row)
  with open(args.json, "w") as f:
    json.dump({"argv": sys.argv, "h100_shared_bytes": H100_SHARED_BYTES, "rows": rows}, f, indent=1)
  keys = ("gates", "kernel", "num_warps", "num_stages", "hidden_tile", "shared_bytes", "fits_h100", "compile_s",
          "registers", "spill_store_bytes", "stack_frame_bytes", "error")
  print("| " + " | ".join(keys) + " |\n|" + "-|" * len(keys))
  for row in rows:
    print("| " + " | ".join(f"{row[k]:.0f}" if isinstance(row.get(k), float) else str(row.get(k, "-"))
                            for k in keys) + " |")


if __name__ == "__main__":
  main()
