"""Latency probes for a Mosaic GPU keys' recurrence of the Miras MLP memories (issue 14's speed item).

"It's All Connected" (Behrouz et al., arXiv 2504.13173): the only sequential work of a chunkwise 2-layer MLP memory
is its keys' recurrence. Our Triton kernels (``layers/kernels/miras/pallas_tiles.py``) run it as three
latency-bound kernels a chunk and direction. These probes time the design meant to replace them: one Pallas Mosaic
GPU kernel per direction, a CTA per head walking every chunk, one warpgroup per hidden tile of 64 columns holding
its tile of the float32 state (forward) or of its cotangent (backward) in wgmma accumulators across all chunks,
the bf16 operands in shared memory, at the real shapes (c = d = 64, E = 256: four warpgroups), with the row-wise
work (LayerNorm, the attentional bias' gradient and their pull-backs) reduced to a stand-in with one row reduction,
n(x) = x / rms(x):

forward, per chunk (as F1, E, F2):
  per tile t:  z_t = K W2_tᵀ, h_t = gelu(z_t), s_t = gelu'(z_t)                      (sync S1: every h_t, W1_t)
  e1 = n(Σ_t h_t W1_tᵀ − V)                                                        (sync S2: h, W1 read)
  per tile:  e2_t = (e1 W1_t) ⊙ s_t;  W2_t ← b W2_t − (e2_t ⊙ c)ᵀ K,  W1_t ← b W1_t − (e1 ⊙ c)ᵀ h_t,
             the bf16 start state stacked for the backward;
backward, per chunk in reverse (as B1, R, B2), from the stacked bf16 start state W and the cotangent G:
  per tile:  ĝ_t = g_e2,t − (K ⊙ c) G2_tᵀ                                           (sync S1: every ĝ_t ⊙ s_t)
  g_u = n(Σ_t (ĝ_t ⊙ s_t) W1_tᵀ − c ⊙ Σ_t h_t G1_tᵀ)                                (sync S2)
  per tile:  g_z = ĝ_t ⊙ (e1 W1_t) ⊙ gelu''(z_t) + (g_h,t − (e1 ⊙ c) G1_t + g_u W1_t) ⊙ s_t;
             G2_t ← b G2_t + g_zᵀ K + the reads' own,
             G1_t ← b G1_t + e1ᵀ (ĝ_t ⊙ s_t) + g_uᵀ h_t + the reads' own;
             K's share g_z W2_t (summed over the tiles after the kernel),

with b the chunk's per-head decay and c = η B/B_i a coefficient per token. The cross-tile sums are computed by
every warpgroup from the shared bf16 operands (no partial sums exchanged); the next chunk's shared inputs are
prefetched by TMA after S1. The same steps in jnp (``forward_reference``, ``pullback_reference``, with the
kernels' bf16 roundings) are the checks. Run on the GPU it prints µs per chunk, to set against pallas_tiles'
kernels (forward F1 + E + F2 ≈ 49 µs a chunk, backward B1 + R + B2 ≈ 190 µs on an H100, docs/benchmarks.md); on a
CPU it checks the kernels in Mosaic GPU interpret mode (``--interpret``) or lowers them for an abstract H100
(``--lower``: layout, wgmma-shape and shared-memory errors, before any device time).

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
from benchmarks.triton_compile import lowered_for_h100
from layers.kernels.miras.mosaic_keys import Warpgroup, per_head_kernel
from layers.kernels.miras.pallas_triton import erf as polynomial_erf, kernel_gelu_grad
from layers.miras.memory import gelu, gelu_grad, gelu_grad2, normal_pdf

C, D, E, TILE = 64, 64, 256, 64  # chunk, head dim, hidden width (expansion 4), hidden tile
BF16 = jnp.bfloat16
EPS = 1e-6


def row_normalised(x):
  scale = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + EPS)
  return x * jax.lax.broadcast_in_dim(scale, x.shape, tuple(range(x.ndim - 1)))


_f32_einsum = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)


def gelu_and_slope(z, erf=polynomial_erf):
  """(gelu(z), gelu'(z)) from one erf."""
  cdf = 0.5 * (1.0 + erf(z * 2 ** -0.5))
  return z * cdf, cdf + z * normal_pdf(z)


def forward_reference(k, v, coef, decay, w2, w1):
  """The forward probe's steps in jnp: k and v [n, N, c, d] bf16, the tokens' coefficients coef [n, N, c], decay
  [N, n], w2 [N, E, d], w1 [N, d, E] (float32). Returns (e1 [n, N, c, d] float32, start states in bf16 [n, N, E, d] /
  [n, N, d, E], end state in float32)."""
  f32 = _f32_einsum

  def step(state, xs):
    w2, w1 = state
    k, v, coef, b = xs
    b, c = b[:, None, None], coef[..., None]
    w2b, w1b = w2.astype(BF16), w1.astype(BF16)
    h, slope = gelu_and_slope(f32("ncd,ned->nce", k, w2b), jax.lax.erf)
    h, slope = h.astype(BF16), slope.astype(BF16)
    e1 = row_normalised(f32("nce,nde->ncd", h, w1b) - v.astype(jnp.float32))
    e2 = f32("ncd,nde->nce", e1.astype(BF16), w1b) * slope.astype(jnp.float32)
    e2n, e1n = (-(e2 * c)).astype(BF16), (-(e1 * c)).astype(BF16)
    new = (b * w2 + f32("nce,ncd->ned", e2n, k), b * w1 + f32("ncd,nce->nde", e1n, h))
    return new, (e1, w2b, w1b)

  (end2, end1), (e1, starts2, starts1) = jax.lax.scan(step, (w2, w1), (k, v, coef, decay.T))
  return e1, (starts2, starts1), (end2, end1)


def pullback_reference(k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1):
  """The backward probe's steps in jnp, chunk by chunk in reverse: k [n, N, c, d] bf16, e1 [n, N, c, d] float32,
  h and the reads' cotangents ge2, gh [n, N, c, E] bf16, coef [n, N, c], decay [N, n], the start states in bf16
  [n, N, E, d] / [n, N, d, E] and the reads' cotangents of them in float32, the end state's cotangent (g2 [N, E, d],
  g1 [N, d, E], float32). Returns (K's share through z [n, N, c, d], u's cotangent [n, N, c, d], the initial
  state's cotangent). The kernel keeps two [c, E] terms in bf16 registers (the slope and ĝ ⊙ p ⊙ gelu''(z)); so
  does this."""
  f32 = _f32_einsum

  def step(g, xs):
    g2, g1 = g
    k, e1, h, ge2, gh, coef, b, w2b, w1b, gs2, gs1 = xs
    b, c = b[:, None, None], coef[..., None]
    g2b, g1b = g2.astype(BF16), g1.astype(BF16)
    e1b, e1n, kc = e1.astype(BF16), (-(e1 * c)).astype(BF16), (k.astype(jnp.float32) * c).astype(BF16)
    z = f32("ncd,ned->nce", k, w2b)
    slope = gelu_grad(z)
    ghat = ge2.astype(jnp.float32) - f32("ncd,ned->nce", kc, g2b)
    ghat_slope = (ghat * slope).astype(BF16)
    curvature = (ghat * f32("ncd,nde->nce", e1b, w1b) * gelu_grad2(z)).astype(BF16)
    gu = row_normalised(f32("nce,nde->ncd", ghat_slope, w1b) - c * f32("nce,nde->ncd", h, g1b))
    gub = gu.astype(BF16)
    g_h = gh.astype(jnp.float32) + f32("ncd,nde->nce", e1n, g1b) + f32("ncd,nde->nce", gub, w1b)
    gz = (curvature.astype(jnp.float32) + g_h * slope.astype(BF16).astype(jnp.float32)).astype(BF16)
    new = (b * g2 + gs2 + f32("nce,ncd->ned", gz, k),
           b * g1 + gs1 + f32("ncd,nce->nde", e1b, ghat_slope) + f32("ncd,nce->nde", gub, h))
    return new, (f32("nce,ned->ncd", gz, w2b), gu)

  xs = (k, e1, h, ge2, gh, coef, decay.T, starts2, starts1, gs2, gs1)
  (g2, g1), (kz, gu) = jax.lax.scan(step, (g2, g1), xs, reverse=True)
  return kz, gu, (g2, g1)


def _check_chunks(n: int) -> None:
  if n % 4:
    raise ValueError(f"the chunk count must be a multiple of 4 (each head's decays [n] float32 are one TMA copy, "
                     f"whose rows take 16-byte strides), got {n}")


def forward_kernel(k, v, coef, decay, w2, w1, interpret: bool = False):
  """The forward probe kernel (shapes and returns as ``forward_reference``): a CTA per head of one warpgroup per
  hidden tile, each holding its tile of the float32 state in registers across all chunks. Per chunk: the bf16
  start state's tile out by TMA; z_t, h_t and the slope gelu'(z_t) (one erf) into shared memory; sync S1; e1 from
  every tile (every warpgroup, redundantly); warpgroup 0 writes −e1 ⊙ c for the W1 update; sync S2 (nobody reads
  this chunk's h or W1 any more); e2_t; the state update and the new bf16 copies. Warpgroup 0 prefetches the next
  chunk's keys, values and coefficients after S1."""
  n, heads = k.shape[:2]
  _check_chunks(n)
  tiles = E // TILE
  wg_ops = Warpgroup(interpret)
  operand = wg_ops.operand

  def body(k_g, v_g, coef_g, decay_g, w2_g, w1_g, e1_g, starts2_g, starts1_g, end2_g, end1_g,
           k_s, v_s, coef_s, decay_s, w2b_s, w1b_s, h_s, e2n_s, e1n_s, loaded, synced):
    head, wg = jax.lax.axis_index("head"), jax.lax.axis_index("wg")
    cols = pl.ds(wg * TILE, TILE)

    def fetch(j, slot):
      for i, (src, dst) in enumerate(((k_g, k_s), (v_g, v_s), (coef_g, coef_s))):
        plgpu.copy_gmem_to_smem(src.at[j, head], dst.at[slot], loaded.at[3 * slot + i])

    @pl.when(wg == 0)
    def _first():
      plgpu.copy_gmem_to_smem(decay_g.at[head], decay_s, loaded.at[6])
      fetch(0, 0)

    w2, w1 = wg_ops.load(w2_g.at[head, cols]), wg_ops.load(w1_g.at[head, :, cols])
    w2b_s.at[wg][...], w1b_s.at[wg][...] = w2.astype(BF16), w1.astype(BF16)
    plgpu.commit_smem()
    plgpu.barrier_wait(loaded.at[6])

    def chunk(j, state):
      w2, w1 = state
      slot = j % 2
      for i in range(3):
        plgpu.barrier_wait(loaded.at[3 * slot + i])
      plgpu.copy_smem_to_gmem(w2b_s.at[wg], starts2_g.at[j, head, cols])
      plgpu.copy_smem_to_gmem(w1b_s.at[wg], starts1_g.at[j, head, :, cols])
      h, slope = gelu_and_slope(wg_ops.product((C, TILE), (k_s.at[slot], w2b_s.at[wg].T)))
      h_s.at[wg][...], e2n_s.at[wg][...] = h.astype(BF16), slope.astype(BF16)
      plgpu.commit_smem()
      plgpu.barrier_arrive(synced.at[0])
      plgpu.barrier_wait(synced.at[0])

      @pl.when(jnp.logical_and(wg == 0, j + 1 < n))
      def _prefetch():
        fetch(j + 1, 1 - slot)

      e1 = wg_ops.product((C, D), *((h_s.at[t], w1b_s.at[t].T) for t in range(tiles)))
      e1 = row_normalised(e1 - wg_ops.layout(v_s.at[slot][...]).astype(jnp.float32))
      e1b = e1.astype(BF16)

      @pl.when(wg == 0)
      def _rows():
        e1_g.at[j, head][...] = e1
        e1n_s[...] = (-(e1 * wg_ops.along(coef_s.at[slot], (C, D), 0))).astype(BF16)
        plgpu.commit_smem()

      plgpu.barrier_arrive(synced.at[1])
      slope = wg_ops.layout(e2n_s.at[wg][...]).astype(jnp.float32)
      e2 = wg_ops.product((C, TILE), (e1b, w1b_s.at[wg])) * slope
      e2n_s.at[wg][...] = (-(e2 * wg_ops.along(coef_s.at[slot], (C, TILE), 0))).astype(BF16)
      plgpu.commit_smem()
      plgpu.barrier_wait(synced.at[1])
      b = decay_s[j]
      w2 = wg_ops.accumulate(b * w2, (e2n_s.at[wg].T, k_s.at[slot]))
      w1 = wg_ops.accumulate(b * w1, (e1n_s.T, h_s.at[wg]))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the start state's copies have been read
      w2b_s.at[wg][...], w1b_s.at[wg][...] = w2.astype(BF16), w1.astype(BF16)
      plgpu.commit_smem()
      return w2, w1

    w2, w1 = jax.lax.fori_loop(0, n, chunk, (w2, w1))
    end2_g.at[head, cols][...] = w2
    end1_g.at[head, :, cols][...] = w1
    plgpu.wait_smem_to_gmem(0)

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, BF16)
  out_type = (f32(n, heads, C, D), bf16(n, heads, E, D), bf16(n, heads, D, E), f32(heads, E, D), f32(heads, D, E))
  scratch = [operand(2, C, D), plgpu.SMEM((2, C, D), BF16), plgpu.SMEM((2, C), jnp.float32),
             plgpu.SMEM((n,), jnp.float32), operand(tiles, TILE, D), operand(tiles, D, TILE),
             operand(tiles, C, TILE), operand(tiles, C, TILE), operand(C, D), plgpu.Barrier(num_barriers=7),
             plgpu.Barrier(num_arrivals=tiles, num_barriers=2)]
  run = per_head_kernel(body, out_type, scratch, heads, tiles, interpret)
  e1, starts2, starts1, end2, end1 = run(k, v, coef, decay, w2, w1)
  return e1, (starts2, starts1), (end2, end1)


def pullback_kernel(k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1, interpret: bool = False):
  """The backward probe kernel (shapes and returns as ``pullback_reference``): a CTA per head of one warpgroup per
  hidden tile, each holding its tile of the float32 state cotangent in registers across all chunks, walked in
  reverse. Per chunk: z_t, the slope, ĝ_t and its bf16 ĝ_t ⊙ slope in shared memory; sync S1; u's cotangent from
  every tile (every warpgroup, redundantly); warpgroup 0 writes it and e1 in bf16 for the W1 products; sync S2;
  g_z, K's share per tile (summed over the tiles after the kernel), the cotangent update, the tile's next start
  state and h by TMA. Warpgroup 0 prefetches the next chunk's keys and coefficients after S1."""
  n, heads = k.shape[:2]
  _check_chunks(n)
  tiles = E // TILE
  wg_ops = Warpgroup(interpret)
  operand = wg_ops.operand

  def body(k_g, e1_g, h_g, ge2_g, gh_g, coef_g, decay_g, starts2_g, starts1_g, gs2_g, gs1_g, g2_g, g1_g,
           kz_g, gu_g, out2_g, out1_g,
           k_s, e1b_s, gub_s, w2b_s, w1b_s, h_s, gs_s, g2b_s, g1b_s, loaded, tile_loaded, synced):
    head, wg = jax.lax.axis_index("head"), jax.lax.axis_index("wg")
    cols = pl.ds(wg * TILE, TILE)
    load = wg_ops.load

    def fetch(j, slot):
      plgpu.copy_gmem_to_smem(k_g.at[j, head], k_s.at[slot], loaded.at[slot])

    def fetch_tile(j):
      for src, dst in ((starts2_g.at[j, head, cols], w2b_s), (starts1_g.at[j, head, :, cols], w1b_s),
                       (h_g.at[j, head, :, cols], h_s)):
        plgpu.copy_gmem_to_smem(src, dst.at[wg], tile_loaded.at[wg])

    @pl.when(wg == 0)
    def _first():
      fetch(n - 1, 0)

    fetch_tile(n - 1)
    g2, g1 = load(g2_g.at[head, cols]), load(g1_g.at[head, :, cols])
    g2b_s.at[wg][...], g1b_s.at[wg][...] = g2.astype(BF16), g1.astype(BF16)
    plgpu.commit_smem()

    def chunk(i, cotangent):
      g2, g1 = cotangent
      j, slot = n - 1 - i, i % 2
      plgpu.barrier_wait(loaded.at[slot])
      plgpu.barrier_wait(tile_loaded.at[wg])
      c = wg_ops.along(coef_g.at[j, head], (C, D), 0)
      kc = (wg_ops.layout(k_s.at[slot][...]).astype(jnp.float32) * c).astype(BF16)
      z = wg_ops.product((C, TILE), (k_s.at[slot], w2b_s.at[wg].T))
      slope = kernel_gelu_grad(z)
      ghat = load(ge2_g.at[j, head, :, cols]) - wg_ops.product((C, TILE), (kc, g2b_s.at[wg].T))
      gs_s.at[wg][...] = (ghat * slope).astype(BF16)
      plgpu.commit_smem()
      e1b = load(e1_g.at[j, head]).astype(BF16)  # e1 is read again where needed: registers are full
      curvature = (ghat * wg_ops.product((C, TILE), (e1b, w1b_s.at[wg])) * gelu_grad2(z)).astype(BF16)
      slope = slope.astype(BF16)
      plgpu.barrier_arrive(synced.at[0])
      plgpu.barrier_wait(synced.at[0])

      @pl.when(wg == 0)
      def _next():
        e1b_s[...] = load(e1_g.at[j, head]).astype(BF16)

        @pl.when(i + 1 < n)
        def _prefetch():
          fetch(j - 1, 1 - slot)

      via_end = wg_ops.product((C, D), *((h_s.at[t], g1b_s.at[t].T) for t in range(tiles)))

      def through_e2(acc):  # a loop over the tiles: run_state takes no static indices of shared memory
        @pl.loop(0, tiles)
        def _tile(t):
          plgpu.wgmma(acc, gs_s.at[t], w1b_s.at[t].T)
        plgpu.wgmma_wait(0)

      gu = row_normalised(pl.run_state(through_e2)(plgpu.ACC.init(-c * via_end)))
      gub = gu.astype(BF16)

      @pl.when(wg == 0)
      def _rows():
        gu_g.at[j, head][...] = gu
        gub_s[...] = gub
        plgpu.commit_smem()

      plgpu.barrier_arrive(synced.at[1])
      e1n = (-(load(e1_g.at[j, head]) * c)).astype(BF16)
      g_h = wg_ops.accumulate(load(gh_g.at[j, head, :, cols]), (e1n, g1b_s.at[wg]), (gub, w1b_s.at[wg]))
      gz = (curvature.astype(jnp.float32) + g_h * slope.astype(jnp.float32)).astype(BF16)
      kz_g.at[j, head, wg][...] = wg_ops.product((C, D), (gz, w2b_s.at[wg]))
      b = decay_g[head, j]  # a scalar from global memory: shared memory is full
      plgpu.barrier_wait(synced.at[1])
      g1 = wg_ops.accumulate(b * g1 + load(gs1_g.at[j, head, :, cols]), (e1b_s.T, gs_s.at[wg]),
                             (gub_s.T, h_s.at[wg]))
      gs_s.at[wg][...] = gz
      plgpu.commit_smem()
      g2 = wg_ops.accumulate(b * g2 + load(gs2_g.at[j, head, cols]), (gs_s.at[wg].T, k_s.at[slot]))
      g2b_s.at[wg][...], g1b_s.at[wg][...] = g2.astype(BF16), g1.astype(BF16)
      plgpu.commit_smem()

      @pl.when(i + 1 < n)
      def _next_tile():
        fetch_tile(j - 1)

      return g2, g1

    g2, g1 = jax.lax.fori_loop(0, n, chunk, (g2, g1))
    out2_g.at[head, cols][...] = g2
    out1_g.at[head, :, cols][...] = g1

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_type = (f32(n, heads, tiles, C, D), f32(n, heads, C, D), f32(heads, E, D), f32(heads, D, E))
  scratch = [operand(2, C, D), operand(C, D), operand(C, D), operand(tiles, TILE, D), operand(tiles, D, TILE),
             operand(tiles, C, TILE), operand(tiles, C, TILE), operand(tiles, TILE, D), operand(tiles, D, TILE),
             plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=3, num_barriers=tiles),
             plgpu.Barrier(num_arrivals=tiles, num_barriers=2)]
  kz, gu, g2, g1 = per_head_kernel(body, out_type, scratch, heads, tiles, interpret)(
      k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1)
  return kz.sum(axis=2), gu, (g2, g1)


def forward_inputs(heads: int, chunks: int, seed: int = 0):
  """Random forward probe inputs at the memory's scales (unit-RMS keys and values, decays near 1)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  k = (jax.random.normal(keys[0], (chunks, heads, C, D)) / D ** 0.5).astype(BF16)
  v = jax.random.normal(keys[1], (chunks, heads, C, D)).astype(BF16)
  coef = 0.01 * jax.random.uniform(keys[2], (chunks, heads, C))
  decay = 1.0 - 0.01 * jax.random.uniform(keys[3], (heads, chunks))
  w2 = jax.random.normal(keys[4], (heads, E, D)) / D ** 0.5
  w1 = jax.random.normal(keys[5], (heads, D, E)) / E ** 0.5
  return k, v, coef, decay, w2, w1


def pullback_inputs(heads: int, chunks: int, seed: int = 0):
  """Backward probe inputs: the forward reference's e1 and start states on random inputs, h, and random reads'
  cotangents and end-state cotangent."""
  k, v, coef, decay, w2, w1 = forward_inputs(heads, chunks, seed)
  e1, (starts2, starts1), _ = jax.jit(forward_reference)(k, v, coef, decay, w2, w1)
  keys = jax.random.split(jax.random.key(seed + 1), 7)
  normal = lambda key, shape, scale=1.0: scale * jax.random.normal(key, shape)
  h = gelu(_f32_einsum("jncd,jned->jnce", k, starts2.astype(BF16))).astype(BF16)
  ge2, gh = (normal(key, h.shape).astype(BF16) for key in keys[:2])
  gs2, gs1 = normal(keys[2], starts2.shape, 0.1), normal(keys[3], starts1.shape, 0.1)
  g2, g1 = normal(keys[4], w2.shape), normal(keys[5], w1.shape)
  return k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1


DIRECTIONS = {"forward": (forward_kernel, forward_reference, forward_inputs),
              "backward": (pullback_kernel, pullback_reference, pullback_inputs)}


def max_relative_error(got, want) -> float:
  """The largest max |got − want| / max |want| over the two trees' leaves, in float32."""
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))) / jnp.max(jnp.abs(w)))
             for g, w in leaves)


def lower_for_h100(direction: str, heads: int, chunks: int) -> int:
  """Lower a direction's kernel for an abstract H100 on any machine; returns the lowered module's length."""
  kernel, _, make_inputs = DIRECTIONS[direction]
  return len(lowered_for_h100(kernel, *jax.eval_shape(functools.partial(make_inputs, heads, chunks))).as_text())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--directions", default="forward,backward", help="comma list of forward, backward")
  parser.add_argument("--heads", type=int, default=128, help="batch × heads (8 × 16 at issue 14's shape)")
  parser.add_argument("--chunks", type=int, default=64, help="chunks of 64 tokens (64: T = 4096)")
  parser.add_argument("--interpret", action="store_true", help="check in Mosaic GPU interpret mode (any backend)")
  parser.add_argument("--lower", action="store_true", help="only lower for an abstract H100 (any backend)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", default="mosaic_chain.json")
  args = parser.parse_args()
  directions = [x for x in args.directions.split(",") if x]
  if unknown := set(directions) - set(DIRECTIONS):
    sys.exit(f"unknown directions {sorted(unknown)}; choose from {sorted(DIRECTIONS)}")
  if args.heads < 1 or args.chunks < 4 or args.chunks % 4:
    sys.exit("--heads must be positive and --chunks a positive multiple of 4")
  on_gpu = jax.default_backend() == "gpu"
  if not (on_gpu or args.interpret or args.lower):
    sys.exit("no GPU here: pass --interpret (or --lower)")
  rows = []
  for direction in directions:
    row = {"direction": direction, "device": jax.devices()[0].device_kind, "heads": args.heads,
           "chunks": args.chunks}
    if args.lower:
      row["lowered_chars"] = lower_for_h100(direction, args.heads, args.chunks)
    else:
      kernel, reference, make_inputs = DIRECTIONS[direction]
      xs = make_inputs(args.heads, args.chunks)
      kernel = jax.jit(functools.partial(kernel, interpret=args.interpret))
      row["interpret"] = args.interpret
      row["max_rel_vs_reference"] = max_relative_error(kernel(*xs), jax.jit(reference)(*xs))
      if on_gpu and not args.interpret:
        row["kernel_ms"] = _median_ms(functools.partial(kernel, *xs), iters=args.repeats)
        row["us_per_chunk"] = 1e3 * row["kernel_ms"] / args.chunks
        row["reference_ms"] = _median_ms(functools.partial(jax.jit(reference), *xs), iters=args.repeats)
    print(json.dumps(row), flush=True)
    rows.append(row)
    with open(args.json, "w") as f:
      json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
