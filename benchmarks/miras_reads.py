"""The Miras MLP memory's per-token reads alone: ``pallas_reads``' Triton kernels at several launch settings against
XLA's reads (``flat.read_u`` over every chunk), forward and fwd+bwd, on the same random inputs in one process.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4): in the split form the reads of every chunk are
independent of each other (a program per chunk and head). Inputs as the ``pallas_mosaic_chain_bf16`` layer hands
them over at issue 14's shape (8 × 4096, 16 heads of 64, chunk 64, E = 256): bf16 start states, e2, h, queries and
keys; per-head gates; read scales per row. Prints a table (median ms of 10 calls, fwd+bwd FLOPs of the matmuls and
the fraction of the card's dense bf16 peak, each setting's largest relative error against XLA's over u and every
gradient) and writes JSON. GPU only (the kernels' values are checked on a CPU in tests/layers/test_miras.py).

  PYTHONPATH=. python benchmarks/miras_reads.py --tilings 4/8/1/64,4/8/2/64,4/4/1/32 --json reads.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.linear_attention import _median_ms
from benchmarks.miras_keys import MONETA, parse_layer_shape
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import flat, pallas_reads
from layers.miras.spec import Gates

H100_BF16_PEAK_TFLOPS = 989.0  # dense; the H200's is the same


def read_inputs(batch: int, tokens: int, heads: int = 16, d: int = 64, e: int = 256, c: int = 64, seed: int = 0):
  """(start states, ``KeyPass``es, q, k, v, per-head gates, read scales per row), stacked over n = tokens / c
  chunks as ``flat.miras_flat`` hands them to its ``chunk_reads`` (bf16 where the layer's are)."""
  n, big = tokens // c, batch * heads
  ks = iter(jax.random.split(jax.random.key(seed), 12))
  normal = lambda *shape: jax.random.normal(next(ks), shape)
  unit = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(jnp.bfloat16)
  q, k = (unit(normal(batch, tokens, heads, d)) for _ in range(2))
  v = normal(batch, tokens, heads, d)
  gates = Gates(eta=0.1 * jax.nn.sigmoid(normal(batch, tokens, heads, 1)),
                log_alpha=jax.nn.log_sigmoid(3.0 + normal(batch, tokens, heads, 1)))
  bf16 = lambda x: x.astype(jnp.bfloat16)
  starts = {"w2": bf16(normal(n, big, e, d) / d ** 0.5), "w1": bf16(normal(n, big, d, e) / e ** 0.5)}
  keys = flat.KeyPass(None, 0.1 * normal(n, big, c, d), bf16(0.1 * normal(n, big, c, e)), bf16(normal(n, big, c, e)))
  scale = {name: 0.5 + jnp.abs(normal(n, big, c, 1)) for name in ("w2", "w1")}
  return starts, keys, q, k, v, gates, scale


def read_flops(n: int, big: int, c: int, d: int, e: int) -> float:
  """Matmul FLOPs of every chunk's reads, forward (Q̃ W2ᵀ, S_q e2, hq hᵀ, hq W1ᵀ, (hq hᵀ ⊙ C) e1, q kᵀ) and
  backward (twice the forward's)."""
  forward = 2 * (2 * c * d * e + 2 * c * c * e + 2 * c * c * d)
  return 3.0 * forward * n * big


def _xla_reads(spec, starts, keys, x, scale):
  return jax.vmap(functools.partial(flat.read_u, spec))(starts, keys, x.q * x.decay, x.decay, x.w1_coef, x.scores_q,
                                                        scale)


def _runs(spec, reads, inputs, c: int):
  """(forward, fwd+bwd) of ``reads`` on ``inputs``, jitted: u, and the gradients of Σ u ⊙ weights in every input."""
  starts, keys, q, k, v, gates, scale = inputs
  weights = jax.random.normal(jax.random.key(7), (q.shape[1] // c, q.shape[0] * q.shape[2], c, q.shape[-1]))

  def forward(starts, keys, q, k, gates, scale):
    return reads(starts, keys, flat.chunk_inputs(spec, q, k, v, gates, c, None), scale)

  loss = lambda *args: jnp.sum(forward(*args) * weights)
  args = (starts, keys, q, k, gates, scale)
  return (functools.partial(jax.jit(forward), *args),
          functools.partial(jax.jit(jax.value_and_grad(loss, argnums=range(len(args)))), *args))


def parse_tilings(text: str) -> list[pallas_reads.ReadTiling]:
  """``fwd_warps/bwd_warps/stages/tile,...`` as ``ReadTiling``s."""
  tilings = []
  for item in filter(None, text.split(",")):
    parts = item.split("/")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
      raise ValueError(f"a tiling is fwd_warps/bwd_warps/stages/tile (e.g. 4/8/1/64), got {item!r}")
    fwd, bwd, stages, tile = map(int, parts)
    tilings.append(pallas_reads.ReadTiling(hidden_tile=tile, num_warps=fwd, backward_warps=bwd, num_stages=stages))
  return tilings


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="8x4096", help="BxT (16 heads of 64, chunk 64, E = 256)")
  parser.add_argument("--tilings", default="4/8/1/64", help="comma list of fwd_warps/bwd_warps/stages/hidden_tile")
  parser.add_argument("--json", default="reads.json")
  args = parser.parse_args()
  try:
    batch, tokens = parse_layer_shape(args.shape)
    tilings = parse_tilings(args.tilings)
  except ValueError as err:
    sys.exit(f"bad argument: {err}")
  if jax.default_backend() != "gpu":
    sys.exit("the reads' Triton kernels need a GPU (tests/layers/test_miras.py checks them on a CPU)")
  inputs = read_inputs(batch, tokens)
  device = jax.devices()[0].device_kind
  flops = read_flops(tokens // 64, batch * 16, 64, 64, 256)
  candidates = {"xla": functools.partial(_xla_reads, MONETA)}
  candidates.update({f"pallas {t.num_warps}/{t.backward_warps}/{t.num_stages}/{t.hidden_tile}":
                     functools.partial(pallas_reads.ChunkReads(t), MONETA) for t in tilings})
  rows, want = [], None
  print(f"| reads ({device}, {args.shape}) | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | of bf16 peak | max rel vs xla |")
  print("|-|-|-|-|-|-|")
  for name, reads in candidates.items():
    forward, both = _runs(MONETA, reads, inputs, 64)
    got = jax.tree.leaves((forward(), both()))
    err = None if want is None else max(max_relative_error(g, w) for g, w in zip(got, want, strict=True))
    want = got if want is None else want
    row = {"impl": name, "device": device, "shape": args.shape, "fwd_ms": _median_ms(forward),
           "fwd_bwd_ms": _median_ms(both), "max_rel_vs_xla": err}
    row["tflops"] = flops / row["fwd_bwd_ms"] / 1e9
    rows.append(row)
    print(f"| {name} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['tflops']:.1f} | "
          f"{row['tflops'] / H100_BF16_PEAK_TFLOPS:.1%} | {'-' if err is None else f'{err:.1e}'} |", flush=True)
    with open(args.json, "w") as f:
      json.dump({"argv": sys.argv, "flops_fwd_bwd": flops, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
