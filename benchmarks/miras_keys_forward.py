"""The Miras MLP memory's keys' forward alone: the Mosaic GPU kernel (``layers/kernels/miras/mosaic_keys.py``) against
``pallas_tiles``' Triton kernels (F1, E, F2 a chunk in an XLA scan), on the same random inputs in one process.

"It's All Connected" (Behrouz et al., arXiv 2504.13173): the keys' recurrence is the sequential part of a chunkwise
MLP memory. Prints, per implementation, the median time and µs a chunk, and the Mosaic kernel's largest relative
error against the Triton one per output (the same bf16 operands summed in another order), and writes JSON. GPU only.

  PYTHONPATH=. python benchmarks/miras_keys_forward.py --heads 128 --chunks 64 --json keys_forward.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.linear_attention import _median_ms
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import mosaic_keys, pallas_tiles
from layers.kernels.miras.chunked import with_matmul
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import LqNorm
from layers.miras.spec import MemorySpec

OUTPUTS = ("starts2", "starts1", "end", "e2", "h", "e1", "u", "scales", "totals")


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=128, help="batch × heads (8 × 16 at issue 14's shape)")
  parser.add_argument("--chunks", type=int, default=64, help="chunks of 64 tokens (64: T = 4096)")
  parser.add_argument("--json", default="keys_forward.json")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    sys.exit("the Mosaic GPU kernel needs a GPU (tests/layers/test_miras_mosaic_keys.py checks it on a CPU)")
  if args.heads < 1 or args.chunks < 1:
    sys.exit("--heads and --chunks must be positive")
  spec = with_matmul(MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0)), "bfloat16")  # Moneta
  args_ = keys_inputs(args.chunks, args.heads)
  runs = {"mosaic": jax.jit(functools.partial(mosaic_keys.keys_forward, spec)),
          "triton": jax.jit(functools.partial(pallas_tiles._triton_keys_forward, spec, pallas_tiles.Tiling()))}
  outputs = {name: run(*args_) for name, run in runs.items()}
  row = {"device": jax.devices()[0].device_kind, "heads": args.heads, "chunks": args.chunks,
         "mosaic_max_rel_vs_triton": max_relative_errors(outputs["mosaic"], outputs["triton"])}
  for name, run in runs.items():
    row[f"{name}_ms"] = _median_ms(functools.partial(run, *args_))
    row[f"{name}_us_per_chunk"] = 1e3 * row[f"{name}_ms"] / args.chunks
  print(json.dumps(row), flush=True)
  with open(args.json, "w") as f:
    json.dump({"argv": sys.argv, "rows": [row]}, f, indent=1)


if __name__ == "__main__":
  main()
