"""The Miras MLP memory keys' backward's two batched passes around its chain, alone: XLA's (``keys_chain.chunk_terms``
and ``keys_chain.chain_outputs``) against the Pallas Triton kernels that replace them in ``pallas_mosaic_chain_bf16``
(``pallas_chain_inputs``, ``pallas_chain_outputs``), on the same random inputs in one process.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4). Both passes are a program per chunk and head that reads
each block once and writes each output once, so their floor is HBM traffic: the table gives each one's least bytes
(every argument it reads, every output it writes, once), the bandwidth that time implies and its fraction of the card's
(3.35 TB/s on an H100 SXM). Inputs as the layer hands them over at issue 14's shape (8 × 4096, 16 heads of 64, chunk 64,
E = 256: :func:`layer_arguments`). Median ms of 10 calls and the largest relative error against XLA over every output.
GPU only (tests/layers/test_miras_chain_*.py check the kernels on a CPU).

  PYTHONPATH=. python benchmarks/miras_chain_passes.py --warps 4,8 --json chain_passes.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.linear_attention import _median_ms
from benchmarks.miras_keys import MONETA, chain_arguments, parse_layer_shape
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import keys_chain, pallas_chain_inputs, pallas_chain_outputs

HBM_TBPS = 3.35  # H100 SXM; the H200's is 4.8


def nbytes(tree) -> int:
  """Bytes of a tree's array leaves."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def passes(spec, residuals, inputs, outputs, warps: list[int], interpret: bool = False) -> dict:
  """{name: (fn, least bytes)} of both passes, XLA's first, then each kernel at every Triton warp count in
  ``warps``; each fn takes no argument (its inputs bound). The least bytes: the arrays a pass reads (the chunk
  terms: u, K, V, e1, the coefficients and the LayerNorm; the outputs pass: the rows' n and rstd, K, V, the
  LayerNorm, e1, e2, W2, the scales, g_e1, −h G1ᵀ, g_z and G2) and those it writes, each once."""
  ln, xs, _, keys, u, *_ = residuals
  reads = {"chunk terms": (ln, xs[0], xs[1], xs[4], keys.e1, u),
           "chain outputs": (ln, xs[0], xs[1], inputs.rows.n, inputs.rows.rstd, inputs.e1, inputs.e2, inputs.w2,
                             inputs.scales, outputs.g_e1, outputs.via_end, outputs.g_z, outputs.g2_end)}
  runs = {}
  for name, reference, kernel, args in (
      ("chunk terms", keys_chain.chunk_terms, pallas_chain_inputs.chunk_terms, (residuals,)),
      ("chain outputs", keys_chain.chain_outputs, pallas_chain_outputs.chain_outputs, (residuals, inputs, outputs))):
    moved = nbytes(reads[name]) + nbytes(jax.eval_shape(functools.partial(kernel, spec, interpret=interpret), *args))
    runs[f"{name}: xla"] = (functools.partial(jax.jit(functools.partial(reference, spec)), *args), moved)
    for w in warps:
      fn = jax.jit(functools.partial(kernel, spec, interpret=interpret, num_warps=w))
      runs[f"{name}: pallas, {w} warps"] = (functools.partial(fn, *args), moved)
  return runs


def layer_arguments(batch: int, tokens: int, seed: int = 0) -> tuple:
  """``miras_keys.chain_arguments`` at B × T (16 heads, chunk 64) with bf16 K, V and states, the rows' n in bf16
  as ``pallas_chain_inputs`` leaves it for the outputs pass."""
  residuals, inputs, outputs = chain_arguments(MONETA, True, n=tokens // 64, heads=batch * 16, seed=seed)
  rows = inputs.rows._replace(n=inputs.rows.n.astype(jnp.bfloat16))
  return residuals, inputs._replace(rows=rows), outputs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="8x4096", help="BxT (16 heads of 64, chunk 64, E = 256)")
  parser.add_argument("--warps", default="4,8", help="comma list of the kernels' Triton num_warps")
  parser.add_argument("--json", default="chain_passes.json")
  args = parser.parse_args()
  try:
    batch, tokens = parse_layer_shape(args.shape)
    warps = [int(w) for w in args.warps.split(",")]
  except ValueError as err:
    sys.exit(f"bad argument: {err}")
  if any(w not in (1, 2, 4, 8, 16) for w in warps):
    sys.exit("--warps: powers of two up to 16")
  if jax.default_backend() != "gpu":
    sys.exit("the kernels' timings need a GPU (tests/layers/test_miras_chain_*.py check them on a CPU)")
  device = jax.devices()[0].device_kind
  runs = passes(MONETA, *layer_arguments(batch, tokens), warps)
  rows, want = [], {}
  print(f"| pass ({device}, {args.shape}) | ms | least GB | GB/s | of HBM's {HBM_TBPS} TB/s | max rel vs xla |")
  print("|-|-|-|-|-|-|")
  for name, (fn, moved) in runs.items():
    stage = name.split(":")[0]
    got = jax.tree.leaves(fn())
    err = None if stage not in want else max(max_relative_error(g, w) for g, w in zip(got, want[stage], strict=True))
    want.setdefault(stage, got)
    row = {"pass": name, "device": device, "shape": args.shape, "ms": _median_ms(fn), "least_bytes": moved,
           "max_rel_vs_xla": err}
    row["gbps"] = moved / row["ms"] / 1e6
    rows.append(row)
    print(f"| {name} | {row['ms']:.3f} | {moved / 1e9:.2f} | {row['gbps']:.0f} | {row['gbps'] / 1e3 / HBM_TBPS:.0%} | "
          f"{'-' if err is None else f'{err:.1e}'} |", flush=True)
    with open(args.json, "w") as f:
      json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
