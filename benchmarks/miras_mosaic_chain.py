"""Latency probe for a Mosaic GPU keys' recurrence of the Miras MLP memories (issue 14's speed item).

"It's All Connected" (Behrouz et al., arXiv 2504.13173): the only sequential work of a chunkwise 2-layer MLP memory
is its keys' recurrence. Our Triton kernels (``layers/kernels/miras/pallas_tiles.py``) run it as several
latency-bound kernels a chunk; the design that can meet the target keeps one CTA per head walking every chunk with
the float32 state in L2 and its bf16 copy in shared memory (docs/benchmarks.md, "Twelfth session"). Before writing
that kernel in full, this script times its skeleton: one Pallas Mosaic GPU kernel, a CTA per head, a loop over the
chunks doing a forward keys' step's products and state traffic at the real shapes (c = d = 64, E = 256):

  per hidden tile t of 64 columns:  z_t = K W2_tᵀ, h_t = gelu(z_t)                    (wgmma, [c, 64])
  u = Σ_t h_t W1_tᵀ; e1 = n(u − V), n a row-wise RMS normalisation (stand-in for the
      LayerNorm and the attentional bias' gradient: one row reduction)                (wgmma, [c, d])
  per tile:  e2_t = (e1 W1_t) ⊙ gelu'(z_t)                                             (wgmma ×2, [c, 64])
  per tile:  W2_t ← b W2_t − e2_tᵀ (K ⊙ c),  W1_t ← b W1_t − (e1 ⊙ c)ᵀ h_t             (wgmma, [64, 64] each)
             with each float32 tile read from and written to global memory (L2) and stacked as the chunk's start
             state (what the reads and the backward need), its bf16 copy rewritten in shared memory,

with b the chunk's per-head decay and c = η B/B_i broadcast [c, d]. The same steps in jnp (``reference``) are the
check. Every copy is waited for before the next step (no overlap of loads, stores and products yet), so the time
is an upper bound for this much work. Run on the GPU it prints per-chunk µs next to pallas_tiles' forward kernels (F1 + E + F2 ≈ 49 µs a chunk
on an H100, docs/benchmarks.md); on a CPU it checks the kernel in Mosaic GPU interpret mode (``--interpret``) or
lowers it for an abstract H100 (``--lower``: layout and wgmma-shape errors, before any device time).

  PYTHONPATH=. python benchmarks/miras_mosaic_chain.py --heads 128 --chunks 64 --json mosaic_chain.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.linear_attention import _median_ms
from layers.kernels.miras.pallas_triton import erf as polynomial_erf

C, D, E, TILE = 64, 64, 256, 64  # chunk, head dim, hidden width (expansion 4), hidden tile
BF16 = jnp.bfloat16
SWIZZLE = 128  # bytes: 64 bf16 columns, the width of every wgmma operand here
WGMMA_OPERAND = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
EPS = 1e-6


def gelu(x, erf=polynomial_erf):
  return 0.5 * x * (1.0 + erf(x * 2 ** -0.5))


def gelu_grad(x, erf=polynomial_erf):
  return 0.5 * (1.0 + erf(x * 2 ** -0.5)) + x * jnp.exp(-0.5 * x * x) * (2.0 * jnp.pi) ** -0.5


def row_normalised(x):
  scale = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + EPS)
  return x * jax.lax.broadcast_in_dim(scale, x.shape, tuple(range(x.ndim - 1)))


def reference(k, v, coef, decay, w2, w1):
  """The probe's steps in jnp: k [n, N, c, d] bf16, v and coef [n, N, c, d], decay [N, n], w2 [N, E, d], w1 [N, d, E]
  (float32). Returns (e1 [n, N, c, d], start states [n, N, E, d] / [n, N, d, E], end state)."""
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def step(state, xs):
    w2, w1 = state
    k, v, coef, b = xs
    b = b[:, None, None]
    z = f32("ncd,ned->nce", k, w2.astype(BF16))
    h = gelu(z, jax.lax.erf).astype(BF16)
    e1 = row_normalised(f32("nce,nde->ncd", h, w1.astype(BF16)) - v.astype(jnp.float32))
    e2 = (f32("ncd,nde->nce", e1.astype(BF16), w1.astype(BF16)) * gelu_grad(z, jax.lax.erf)).astype(BF16)
    kc, e1c = (k.astype(jnp.float32) * coef).astype(BF16), (e1 * coef).astype(BF16)
    new = (b * w2 - f32("nce,ncd->ned", e2, kc), b * w1 - f32("ncd,nce->nde", e1c, h))
    return new, (e1, w2, w1)

  (end2, end1), (e1, starts2, starts1) = jax.lax.scan(step, (w2, w1), (k, v, coef, decay.T))
  return e1, (starts2, starts1), (end2, end1)


def chain(k, v, coef, decay, w2, w1, interpret: bool = False):
  """The probe kernel (shapes and returns as ``reference``)."""
  n, heads = k.shape[:2]
  if n % 4:
    raise ValueError(f"the chunk count must be a multiple of 4 (each head's decays [n] float32 are one TMA copy, "
                     f"whose rows take 16-byte strides), got {n}")
  tiles = E // TILE
  operand = lambda shape: plgpu.SMEM(shape, BF16, transforms=() if interpret else WGMMA_OPERAND)

  def body(k_g, v_g, coef_g, decay_g, w2_g, w1_g, e1_g, starts2_g, starts1_g, end2_g, end1_g,
           k_s, kc_s, e1_s, e1c_s, h_s, e2_s, w2b_s, w1b_s, rows_s, coef_s, decay_s, tile_s, loads):
    head = jax.lax.axis_index("head")
    wgmma_layout = lambda x: x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

    def load(src, dst, slot=0):
      plgpu.copy_gmem_to_smem(src, dst, loads.at[slot])
      plgpu.barrier_wait(loads.at[slot])

    def store(src, dst):
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(src, dst)
      plgpu.wait_smem_to_gmem(0)

    def product(shape, a, b):
      def run(acc):
        plgpu.wgmma(acc, a, b)
        plgpu.wgmma_wait(0)
        return acc[...]
      return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

    load(decay_g.at[head], decay_s)
    for t in range(tiles):  # the end state starts as the initial one; its bf16 copy lives in shared memory
      cols = pl.ds(t * TILE, TILE)
      load(w2_g.at[head, cols], tile_s)
      w2b_s[cols] = wgmma_layout(tile_s[...]).astype(BF16)
      store(tile_s, end2_g.at[head, cols])
      load(w1_g.at[head, :, cols], tile_s)
      w1b_s[:, cols] = wgmma_layout(tile_s[...]).astype(BF16)
      store(tile_s, end1_g.at[head, :, cols])

    @pl.loop(0, n)
    def _chunk(j):
      load(k_g.at[j, head], k_s)
      load(v_g.at[j, head], rows_s)
      load(coef_g.at[j, head], coef_s)
      coef = wgmma_layout(coef_s[...])
      kc_s[...] = (wgmma_layout(k_s[...]).astype(jnp.float32) * coef).astype(BF16)
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        h_s[:, cols] = gelu(product((C, TILE), k_s, w2b_s.at[cols].T)).astype(BF16)
      plgpu.commit_smem()
      e1 = row_normalised(product((C, D), h_s, w1b_s.T) - wgmma_layout(rows_s[...]))
      e1_s[...], e1c_s[...] = e1.astype(BF16), (e1 * coef).astype(BF16)
      rows_s[...] = e1
      store(rows_s, e1_g.at[j, head])
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        z = product((C, TILE), k_s, w2b_s.at[cols].T)
        e2_s[:, cols] = (product((C, TILE), e1_s, w1b_s.at[:, cols]) * gelu_grad(z)).astype(BF16)
      plgpu.commit_smem()
      b = decay_s[j]
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        load(end2_g.at[head, cols], tile_s)
        store(tile_s, starts2_g.at[j, head, cols])
        tile_s[...] = b * wgmma_layout(tile_s[...]) - product((TILE, D), e2_s.at[:, cols].T, kc_s)
        w2b_s[cols] = wgmma_layout(tile_s[...]).astype(BF16)
        store(tile_s, end2_g.at[head, cols])
        load(end1_g.at[head, :, cols], tile_s)
        store(tile_s, starts1_g.at[j, head, :, cols])
        tile_s[...] = b * wgmma_layout(tile_s[...]) - product((D, TILE), e1c_s.T, h_s.at[:, cols])
        w1b_s[:, cols] = wgmma_layout(tile_s[...]).astype(BF16)
        store(tile_s, end1_g.at[head, :, cols])
      plgpu.commit_smem()

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  run = plgpu.kernel(
      body,
      out_type=(f32(n, heads, C, D), f32(n, heads, E, D), f32(n, heads, D, E), f32(heads, E, D), f32(heads, D, E)),
      scratch_types=[operand((C, D)), operand((C, D)), operand((C, D)), operand((C, D)), operand((C, E)),
                     operand((C, E)), operand((E, D)), operand((D, E)), plgpu.SMEM((C, D), jnp.float32),
                     plgpu.SMEM((C, D), jnp.float32), plgpu.SMEM((n,), jnp.float32),
                     plgpu.SMEM((TILE, TILE), jnp.float32), plgpu.Barrier(num_barriers=1)],
      grid=(heads,), grid_names=("head",),
      interpret=plgpu.InterpretGPUParams() if interpret else None)
  e1, starts2, starts1, end2, end1 = run(k, v, coef, decay, w2, w1)
  return e1, (starts2, starts1), (end2, end1)


def inputs(heads: int, chunks: int, seed: int = 0):
  """Random probe inputs at the memory's scales (unit-RMS keys and values, decays near 1)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  k = (jax.random.normal(keys[0], (chunks, heads, C, D)) / D ** 0.5).astype(BF16)
  v = jax.random.normal(keys[1], (chunks, heads, C, D))
  coef = 0.01 * jax.random.uniform(keys[2], (chunks, heads, C, D))
  decay = 1.0 - 0.01 * jax.random.uniform(keys[3], (heads, chunks))
  w2 = jax.random.normal(keys[4], (heads, E, D)) / D ** 0.5
  w1 = jax.random.normal(keys[5], (heads, D, E)) / E ** 0.5
  return k, v, coef, decay, w2, w1


def max_relative_error(got, want) -> float:
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  return max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in leaves)


def lower_for_h100(heads: int, chunks: int) -> int:
  """Lower the kernel for an abstract H100 on any machine; returns the lowered module's length."""
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=h100)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs(heads, chunks)]
  with jax.sharding.use_abstract_mesh(mesh):
    return len(jax.jit(chain).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=128, help="batch × heads (8 × 16 at issue 14's shape)")
  parser.add_argument("--chunks", type=int, default=64, help="chunks of 64 tokens (64: T = 4096)")
  parser.add_argument("--interpret", action="store_true", help="check in Mosaic GPU interpret mode (any backend)")
  parser.add_argument("--lower", action="store_true", help="only lower for an abstract H100 (any backend)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", default="mosaic_chain.json")
  args = parser.parse_args()
  if args.heads < 1 or args.chunks < 4 or args.chunks % 4:
    sys.exit("--heads must be positive and --chunks a positive multiple of 4")
  if args.lower:
    print(f"lowered for an abstract H100: {lower_for_h100(args.heads, args.chunks)} characters of StableHLO")
    return
  on_gpu = jax.default_backend() == "gpu"
  if not (on_gpu or args.interpret):
    sys.exit("no GPU here: pass --interpret (or --lower)")
  xs = inputs(args.heads, args.chunks)
  kernel = jax.jit(functools.partial(chain, interpret=args.interpret))
  err = max_relative_error(kernel(*xs), jax.jit(reference)(*xs))
  row = {"device": jax.devices()[0].device_kind, "heads": args.heads, "chunks": args.chunks,
         "interpret": args.interpret, "max_rel_vs_reference": err}
  if on_gpu and not args.interpret:
    row["kernel_ms"] = _median_ms(functools.partial(kernel, *xs), iters=args.repeats)
    row["us_per_chunk"] = 1e3 * row["kernel_ms"] / args.chunks
    row["reference_ms"] = _median_ms(functools.partial(jax.jit(reference), *xs), iters=args.repeats)
  print(json.dumps(row))
  with open(args.json, "w") as f:
    json.dump({"argv": sys.argv, "rows": [row]}, f, indent=1)


if __name__ == "__main__":
  main()
