"""The Miras MLP memory's keys' recurrence alone, either direction: the Mosaic GPU kernel
(``layers/kernels/miras/mosaic_keys.py``) against ``pallas_tiles``' Triton kernels (forward: F1, E, F2 a chunk in an
XLA scan; backward: B1, R, B2 a chunk), and the backward also as ``keys_chain``'s passes, on the same random inputs
in one process.

"It's All Connected" (Behrouz et al., arXiv 2504.13173): the keys' recurrence is the sequential part of a chunkwise
MLP memory. Prints, per implementation, the median time and µs a chunk, and each other implementation's largest
relative error against the Triton one per output (the same bf16 operands summed in another order), and writes JSON.
The backward pulls back random cotangents through the Triton forward's residuals (every backward takes them, each
with the chunk inputs' pull-back around it). GPU only.

  PYTHONPATH=. python benchmarks/miras_keys.py --heads 128 --chunks 64 --json keys_forward.json
  PYTHONPATH=. python benchmarks/miras_keys.py --direction backward --json keys_backward.json
  PYTHONPATH=. python benchmarks/miras_keys.py --direction backward --regions /tmp/chain_trace  # + inside the chain
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_profile import format_regions, region_table
from benchmarks.linear_attention import _median_ms
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import keys_chain, mosaic_chain, mosaic_keys, pallas_tiles
from layers.kernels.miras.chunked import with_matmul
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import LqNorm
from layers.miras.spec import MemorySpec

OUTPUTS = ("starts2", "starts1", "end", "e2", "h", "e1", "u", "scales", "totals", "z")
MONETA = with_matmul(MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0)), "bfloat16")  # the timed memory


def parse_layer_shape(text: str) -> tuple[int, int]:
  """``BxT`` (a Miras benchmark's ``--shape``: 16 heads of 64, chunk 64) as (B, T); ValueError unless B ≥ 1 and T
  is a positive multiple of the chunk."""
  try:
    batch, tokens = map(int, text.split("x"))
  except ValueError:
    raise ValueError(f"a shape is BxT (e.g. 8x4096), got {text!r}") from None
  if batch < 1 or tokens < 64 or tokens % 64:
    raise ValueError(f"a shape's T must be a positive multiple of the chunk, 64, and B positive; got {text!r}")
  return batch, tokens


def keys_inputs(n: int, heads: int, c: int = 64, d: int = 64, e: int = 256, seed: int = 0):
  """(state, ln, keys' inputs) as ``flat.miras_flat`` hands them to a key scan: unit keys, decays near 1, small
  step coefficients, every chunk complete."""
  ks = jax.random.split(jax.random.key(seed), 8)
  k = jax.random.normal(ks[0], (n, heads, c, d))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  xs = (k, jax.random.normal(ks[1], (n, heads, c, d)), jnp.zeros((n, heads, c)),
        1.0 - 0.05 * jax.random.uniform(ks[2], (n, heads, 1)), 0.1 * jax.random.uniform(ks[3], (n, heads, c, 1)),
        jnp.ones((n, heads), bool))
  state = {"w2": jax.random.normal(ks[4], (heads, e, d)) / d ** 0.5,
           "w1": jax.random.normal(ks[5], (heads, d, e)) / e ** 0.5}
  ln = (1.0 + 0.1 * jax.random.normal(ks[6], (heads, 1, d)), 0.1 * jax.random.normal(ks[7], (heads, 1, d)))
  return state, ln, xs


def max_relative_errors(got, want) -> dict:
  """Each output's largest |got − want| over max |want|."""
  return {name: max_relative_error(g, w) for name, g, w in zip(OUTPUTS, got, want, strict=True)}


def backward_inputs(spec, chunks: int, heads: int, interpret: bool = False, seed: int = 5):
  """(residuals, cotangents) of ``pallas_tiles``' keys' recurrence: its Triton forward's residuals on
  :func:`keys_inputs` (``interpret``: in Pallas interpret mode), and random cotangents (0.1 N(0, 1)) of its
  outputs."""
  tiling = pallas_tiles.Tiling(interpret=interpret)
  outputs, residuals = jax.jit(functools.partial(pallas_tiles._recurrence_fwd, spec, tiling))(
      *keys_inputs(chunks, heads))
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(outputs))))
  cotangents = jax.tree.map(lambda a: (0.1 * jax.random.normal(next(keys), a.shape)).astype(a.dtype), outputs)
  return residuals, cotangents


def chain_arguments(spec, bf16: bool, n: int = 3, heads: int = 2, seed: int = 0):
  """(residuals, :class:`keys_chain.ChainInputs`, :class:`keys_chain.ChainOutputs`): :func:`keys_inputs`' LayerNorm
  and chunk inputs, random activations and cotangents in the shapes and dtypes of ``pallas_tiles``' keys'
  recurrence (NumPy's generator: no compiles; positive read scales and summed terms), the chain's inputs and the
  XLA chain's outputs. ``bf16``: K, V and the start states in bfloat16, and G2 and g_z rounded to it (as the Mosaic
  GPU kernels leave them)."""
  state, ln, xs = jax.jit(functools.partial(keys_inputs, n, heads, seed=seed))()
  ends, shapes = jax.eval_shape(functools.partial(pallas_tiles._recurrence_fwd, spec, pallas_tiles.Tiling()),
                                state, ln, xs)
  if bf16:
    xs = (xs[0].astype(jnp.bfloat16), xs[1].astype(jnp.bfloat16), *xs[2:])
  rng = np.random.default_rng(seed)
  normal = lambda a, scale=1.0: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype)
  positive = lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
  _, _, starts, activations, u, scales, totals, z = shapes
  starts = jax.tree.map(lambda a: normal(a, a.shape[-1] ** -0.5).astype(jnp.bfloat16 if bf16 else a.dtype), starts)
  residuals = (ln, xs, starts, jax.tree.map(normal, activations), normal(u), positive(scales), positive(totals),
               normal(z))
  cotangents = jax.tree.map(lambda a: normal(a, 0.1), ends)
  inputs = jax.jit(functools.partial(keys_chain.chain_inputs, spec))(residuals, cotangents)
  outputs = jax.jit(functools.partial(keys_chain.chain_scan, spec))(inputs, cotangents[0])[1]
  if bf16:
    outputs = outputs._replace(g2_end=outputs.g2_end.astype(jnp.bfloat16), g_z=outputs.g_z.astype(jnp.bfloat16))
  return residuals, inputs, outputs


def _runs(spec, direction: str) -> dict:
  """The jitted Mosaic and Triton kernels of one direction."""
  if direction == "forward":
    return {"mosaic": jax.jit(functools.partial(mosaic_keys.keys_forward, spec)),
            "triton": jax.jit(functools.partial(pallas_tiles._triton_keys_forward, spec, pallas_tiles.Tiling()))}
  return {kernel: jax.jit(functools.partial(pallas_tiles._recurrence_bwd, spec,
                                            pallas_tiles.Tiling(keys_backward=kernel)))
          for kernel in pallas_tiles.KEYS_BACKWARDS}


def _backward_errors(got, want) -> dict:
  """Each float cotangent's largest relative error, by its path in the backward's output (but δ's: Moneta has no
  δ, so it is zero in both)."""
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  return {jax.tree_util.keystr(path): max_relative_error(g, w)
          for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True)
          if w.dtype != jax.dtypes.float0 and bool(jnp.any(w != 0))}


def chain_regions(spec, inputs, trace_dir: str) -> dict:
  """The chain kernel's steps timed inside it by Mosaic GPU's profiler (one call; its trace kept in
  ``trace_dir``): :func:`kernel_profile.region_table` of the warpgroups' first ranges (the chunks walked first)."""
  os.makedirs(trace_dir, exist_ok=True)
  before = set(os.listdir(trace_dir))
  run = jax.jit(functools.partial(mosaic_chain.keys_backward, spec, profile_dir=trace_dir))
  jax.block_until_ready(run(*inputs))
  written = sorted(set(os.listdir(trace_dir)) - before)
  if not written:
    sys.exit(f"Mosaic GPU's profiler wrote no trace into {trace_dir}")
  with open(os.path.join(trace_dir, written[-1])) as f:
    return region_table(json.load(f))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--direction", choices=("forward", "backward"), default="forward")
  parser.add_argument("--heads", type=int, default=128, help="batch × heads (8 × 16 at issue 14's shape)")
  parser.add_argument("--chunks", type=int, default=64, help="chunks of 64 tokens (64: T = 4096)")
  parser.add_argument("--json", default="keys.json")
  parser.add_argument("--regions", default="", metavar="DIR", help="backward: also time the chain kernel's steps "
                      "inside it (Mosaic GPU's profiler; its trace is written into DIR)")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    sys.exit("the Mosaic GPU kernels need a GPU (tests/layers/test_miras_mosaic_keys.py checks them on a CPU)")
  if args.heads < 1 or args.chunks < 1:
    sys.exit("--heads and --chunks must be positive")
  if args.regions and args.direction != "backward":
    sys.exit("--regions times the chain kernel's steps: it needs --direction backward")
  spec = MONETA
  forward = args.direction == "forward"
  inputs = keys_inputs(args.chunks, args.heads) if forward else backward_inputs(spec, args.chunks, args.heads)
  runs = _runs(spec, args.direction)
  outputs = {name: run(*inputs) for name, run in runs.items()}
  row = {"device": jax.devices()[0].device_kind, "direction": args.direction, "heads": args.heads,
         "chunks": args.chunks}
  for name in runs.keys() - {"triton"}:
    row[f"{name}_max_rel_vs_triton"] = (max_relative_errors if forward else _backward_errors)(
        outputs[name], outputs["triton"])
  for name, run in runs.items():
    row[f"{name}_ms"] = _median_ms(functools.partial(run, *inputs))
    row[f"{name}_us_per_chunk"] = 1e3 * row[f"{name}_ms"] / args.chunks
  if args.regions:
    row["chain_mosaic_regions"] = chain_regions(spec, inputs, args.regions)
    print(format_regions(row["chain_mosaic_regions"], f"chain kernel's steps, {row['device']}"), flush=True)
  print(json.dumps(row), flush=True)
  with open(args.json, "w") as f:
    json.dump({"argv": sys.argv, "rows": [row]}, f, indent=1)


if __name__ == "__main__":
  main()
