"""Latency probes for a Mosaic GPU keys' recurrence of the Miras MLP memories (issue 14's speed item).

"It's All Connected" (Behrouz et al., arXiv 2504.13173): the only sequential work of a chunkwise 2-layer MLP memory
is its keys' recurrence. Our Triton kernels (``layers/kernels/miras/pallas_tiles.py``) run it as three
latency-bound kernels a chunk and direction; the design that can meet the target keeps one CTA per head walking
every chunk with the float32 state (or its cotangent) in L2 and bf16 copies in shared memory
(docs/benchmarks.md, "Twelfth session"). Before writing those kernels in full, this script times skeletons:
one Pallas Mosaic GPU kernel per direction, a CTA per head, a loop over the chunks doing that direction's products
and state traffic at the real shapes (c = d = 64, E = 256), with the row-wise work (LayerNorm, the attentional
bias' gradient and their pull-backs) reduced to a stand-in with one row reduction, n(x) = x / rms(x):

forward, per chunk (as F1, E, F2):
  per hidden tile t of 64 columns:  z_t = K W2_tᵀ, h_t = gelu(z_t)
  e1 = n(Σ_t h_t W1_tᵀ − V)
  per tile:  e2_t = (e1 W1_t) ⊙ gelu'(z_t)
  per tile:  W2_t ← b W2_t − e2_tᵀ (K ⊙ c),  W1_t ← b W1_t − (e1 ⊙ c)ᵀ h_t, each float32 tile read from and
             written to global memory (L2) and stacked as the chunk's start state, its bf16 copy rewritten;
backward, per chunk in reverse (as B1, R, B2), from the stacked start state S and the cotangent G (in L2):
  per tile:  ĝ_t = g_e2,t − (K ⊙ c) G2_tᵀ; e1's cotangent from Σ_t (ĝ_t ⊙ gelu'(z_t)) W1_tᵀ and −Σ_t h_t G1_tᵀ
  g_u = n(through e2 + c ⊙ through the chunk end)
  per tile:  g_z = ĝ_t ⊙ (e1 W1_t) ⊙ gelu''(z_t) + (g_h,t − (e1 ⊙ c) G1_t + g_u W1_t) ⊙ gelu'(z_t);
             G2_t ← b G2_t + g_zᵀ K + the reads' own, G1_t ← b G1_t + e1ᵀ (ĝ_t ⊙ gelu'(z_t)) + g_uᵀ h_t +
             the reads' own; K's share g_z W2_t,

with b the chunk's per-head decay and c = η B/B_i broadcast [c, d]. The same steps in jnp (``forward_reference``,
``pullback_reference``) are the checks. Loads are issued together where they can be and waited for at once,
stores are not waited for, but nothing is prefetched across steps, so the times are upper bounds for this much
work. Run on the GPU it prints µs per chunk, to set against pallas_tiles' kernels (forward F1 + E + F2 ≈ 49 µs a
chunk, backward B1 + R + B2 ≈ 190 µs on an H100, docs/benchmarks.md); on a CPU it checks the kernels in Mosaic
GPU interpret mode (``--interpret``) or lowers them for an abstract H100 (``--lower``: layout and wgmma-shape
errors, before any device time).

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


def gelu_grad2(x):
  return (2.0 - x * x) * jnp.exp(-0.5 * x * x) * (2.0 * jnp.pi) ** -0.5


_f32_einsum = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)


def forward_reference(k, v, coef, decay, w2, w1):
  """The forward probe's steps in jnp: k [n, N, c, d] bf16, v and coef [n, N, c, d], decay [N, n], w2 [N, E, d],
  w1 [N, d, E] (float32). Returns (e1 [n, N, c, d], start states [n, N, E, d] / [n, N, d, E], end state)."""
  f32 = _f32_einsum

  def step(state, xs):
    w2, w1 = state
    k, v, coef, b = xs
    b = b[:, None, None]
    z = f32("ncd,ned->nce", k, w2.astype(BF16))
    h = gelu(z, jax.lax.erf).astype(BF16)
    e1 = row_normalised(f32("nce,nde->ncd", h, w1.astype(BF16)) - v)
    e2 = (f32("ncd,nde->nce", e1.astype(BF16), w1.astype(BF16)) * gelu_grad(z, jax.lax.erf)).astype(BF16)
    kc, e1c = (k.astype(jnp.float32) * coef).astype(BF16), (e1 * coef).astype(BF16)
    new = (b * w2 - f32("nce,ncd->ned", e2, kc), b * w1 - f32("ncd,nce->nde", e1c, h))
    return new, (e1, w2, w1)

  (end2, end1), (e1, starts2, starts1) = jax.lax.scan(step, (w2, w1), (k, v, coef, decay.T))
  return e1, (starts2, starts1), (end2, end1)


def pullback_reference(k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1):
  """The backward probe's steps in jnp, chunk by chunk in reverse: k [n, N, c, d] bf16, e1 and coef [n, N, c, d],
  h and the reads' cotangents ge2, gh [n, N, c, E] bf16, decay [N, n], the start states and the reads' cotangents
  of them [n, N, E, d] / [n, N, d, E], the end state's cotangent (g2 [N, E, d], g1 [N, d, E]) (float32). Returns
  (K's share through z [n, N, c, d], u's cotangent [n, N, c, d], the initial state's cotangent)."""
  f32 = _f32_einsum

  def step(g, xs):
    g2, g1 = g
    k, e1, h, ge2, gh, coef, b, s2, s1, gs2, gs1 = xs
    b = b[:, None, None]
    w2b, w1b, g2b, g1b = (a.astype(BF16) for a in (s2, s1, g2, g1))
    e1b, e1c, kc = e1.astype(BF16), (e1 * coef).astype(BF16), (k.astype(jnp.float32) * coef).astype(BF16)
    z = f32("ncd,ned->nce", k, w2b)
    slope, praw = gelu_grad(z, jax.lax.erf), f32("ncd,nde->nce", e1b, w1b)
    ghat = ge2.astype(jnp.float32) - f32("ncd,ned->nce", kc, g2b)
    ghat_slope = (ghat * slope).astype(BF16)
    via_e2, via_end = f32("nce,nde->ncd", ghat_slope, w1b), -f32("nce,nde->ncd", h, g1b)
    gu = row_normalised(via_e2 + coef * via_end)
    gub = gu.astype(BF16)
    g_h = gh.astype(jnp.float32) - f32("ncd,nde->nce", e1c, g1b) + f32("ncd,nde->nce", gub, w1b)
    gz = (ghat * praw * gelu_grad2(z) + g_h * slope).astype(BF16)
    new = (b * g2 + f32("nce,ncd->ned", gz, k) + gs2,
           b * g1 + f32("ncd,nce->nde", e1b, ghat_slope) + f32("ncd,nce->nde", gub, h) + gs1)
    return new, (f32("nce,ned->ncd", gz, w2b), gu)

  xs = (k, e1, h, ge2, gh, coef, decay.T, starts2, starts1, gs2, gs1)
  (g2, g1), (kz, gu) = jax.lax.scan(step, (g2, g1), xs, reverse=True)
  return kz, gu, (g2, g1)


class _Steps:
  """What both probe kernels do between their products (inside a kernel body): loads issued together (a barrier
  each) and waited for at once, stores issued without waiting (a later write to a staging buffer first waits until
  every issued store has read its shared memory, and :meth:`settle` until they have landed), wgmma products into a
  scoped accumulator, and the WGMMA layout pinned on values loaded from shared memory (not in interpret mode)."""

  def __init__(self, interpret: bool, barrier):
    self.interpret, self.barrier = interpret, barrier

  def layout(self, x):
    return x if self.interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

  def load(self, *copies):
    """(source in global memory, destination in shared memory) pairs, in flight together."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # a destination may be an issued store's source
    for i, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, self.barrier.at[i])
    for i in range(len(copies)):
      plgpu.barrier_wait(self.barrier.at[i])

  def load_values(self, *copies):
    """Float32 arrays from global memory, through their staging buffers, in registers."""
    self.load(*copies)
    return [self.layout(staging[...]) for _, staging in copies]

  @staticmethod
  def store(src, dst):
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(src, dst)

  def store_value(self, x, staging, dst):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    staging[...] = x
    self.store(staging, dst)

  @staticmethod
  def settle():
    """Wait until every issued store has landed: before reading back what an earlier chunk stored, and at the end."""
    plgpu.wait_smem_to_gmem(0)

  @staticmethod
  def product(shape, a, b):
    def run(acc):
      plgpu.wgmma(acc, a, b)
      plgpu.wgmma_wait(0)
      return acc[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _operand(interpret: bool):
  return lambda shape: plgpu.SMEM(shape, BF16, transforms=() if interpret else WGMMA_OPERAND)


def _check_chunks(n: int) -> None:
  if n % 4:
    raise ValueError(f"the chunk count must be a multiple of 4 (each head's decays [n] float32 are one TMA copy, "
                     f"whose rows take 16-byte strides), got {n}")


def _launch(body, out_type, scratch_types, heads: int, interpret: bool):
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, grid=(heads,), grid_names=("head",),
                      interpret=plgpu.InterpretGPUParams() if interpret else None)


def forward_kernel(k, v, coef, decay, w2, w1, interpret: bool = False):
  """The forward probe kernel (shapes and returns as ``forward_reference``)."""
  n, heads = k.shape[:2]
  _check_chunks(n)
  tiles = E // TILE
  operand = _operand(interpret)

  def body(k_g, v_g, coef_g, decay_g, w2_g, w1_g, e1_g, starts2_g, starts1_g, end2_g, end1_g,
           k_s, kc_s, e1_s, e1c_s, h_s, e2_s, w2b_s, w1b_s, rows_s, coef_s, decay_s, tile_s, barrier):
    head, op = jax.lax.axis_index("head"), _Steps(interpret, barrier)
    op.load((decay_g.at[head], decay_s))
    for t in range(tiles):  # the end state starts as the initial one; its bf16 copy lives in shared memory
      cols = pl.ds(t * TILE, TILE)
      (w2,) = op.load_values((w2_g.at[head, cols], tile_s))
      w2b_s[cols] = w2.astype(BF16)
      op.store(tile_s, end2_g.at[head, cols])
      (w1,) = op.load_values((w1_g.at[head, :, cols], tile_s))
      w1b_s[:, cols] = w1.astype(BF16)
      op.store(tile_s, end1_g.at[head, :, cols])

    @pl.loop(0, n)
    def _chunk(j):
      op.settle()  # the state tiles the previous chunk stored
      coef, v = op.load_values((k_g.at[j, head], k_s), (coef_g.at[j, head], coef_s), (v_g.at[j, head], rows_s))[1:]
      kc_s[...] = (op.layout(k_s[...]).astype(jnp.float32) * coef).astype(BF16)
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        h_s[:, cols] = gelu(op.product((C, TILE), k_s, w2b_s.at[cols].T)).astype(BF16)
      plgpu.commit_smem()
      e1 = row_normalised(op.product((C, D), h_s, w1b_s.T) - v)
      e1_s[...], e1c_s[...] = e1.astype(BF16), (e1 * coef).astype(BF16)
      op.store_value(e1, rows_s, e1_g.at[j, head])
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        z = op.product((C, TILE), k_s, w2b_s.at[cols].T)
        e2_s[:, cols] = (op.product((C, TILE), e1_s, w1b_s.at[:, cols]) * gelu_grad(z)).astype(BF16)
      plgpu.commit_smem()
      b = decay_s[j]
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        (w2,) = op.load_values((end2_g.at[head, cols], tile_s))
        op.store(tile_s, starts2_g.at[j, head, cols])
        w2 = b * w2 - op.product((TILE, D), e2_s.at[:, cols].T, kc_s)
        w2b_s[cols] = w2.astype(BF16)
        op.store_value(w2, tile_s, end2_g.at[head, cols])
        (w1,) = op.load_values((end1_g.at[head, :, cols], tile_s))
        op.store(tile_s, starts1_g.at[j, head, :, cols])
        w1 = b * w1 - op.product((D, TILE), e1c_s.T, h_s.at[:, cols])
        w1b_s[:, cols] = w1.astype(BF16)
        op.store_value(w1, tile_s, end1_g.at[head, :, cols])
      plgpu.commit_smem()

    op.settle()

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_type = (f32(n, heads, C, D), f32(n, heads, E, D), f32(n, heads, D, E), f32(heads, E, D), f32(heads, D, E))
  scratch = [operand((C, D)), operand((C, D)), operand((C, D)), operand((C, D)), operand((C, E)), operand((C, E)),
             operand((E, D)), operand((D, E)), plgpu.SMEM((C, D), jnp.float32), plgpu.SMEM((C, D), jnp.float32),
             plgpu.SMEM((n,), jnp.float32), plgpu.SMEM((TILE, TILE), jnp.float32), plgpu.Barrier(num_barriers=5)]
  e1, starts2, starts1, end2, end1 = _launch(body, out_type, scratch, heads, interpret)(k, v, coef, decay, w2, w1)
  return e1, (starts2, starts1), (end2, end1)


def pullback_kernel(k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1, interpret: bool = False):
  """The backward probe kernel (shapes and returns as ``pullback_reference``): per chunk in reverse, the start
  state's bf16 copy from the stacked start states, a first pass over the hidden tiles for the cotangents that need
  every tile (B1), the row-wise step (R), and a second pass that updates the state's cotangent tile by tile (B2)."""
  n, heads = k.shape[:2]
  _check_chunks(n)
  tiles = E // TILE
  operand = _operand(interpret)

  def body(k_g, e1_g, h_g, ge2_g, gh_g, coef_g, decay_g, starts2_g, starts1_g, gs2_g, gs1_g, g2_g, g1_g,
           kz_g, gu_g, out2_g, out1_g,
           k_s, kc_s, e1b_s, e1c_s, gub_s, w2b_s, w1b_s, ghat_slope_s, g2t_s, g1t_s, ge2t_s, ght_s, ht_s, gzt_s,
           decay_s, tile_s, add_s, barrier):
    head, op = jax.lax.axis_index("head"), _Steps(interpret, barrier)
    op.load((decay_g.at[head], decay_s))
    for t in range(tiles):  # the cotangent starts as the end state's and is updated in place in global memory
      cols = pl.ds(t * TILE, TILE)
      op.load((g2_g.at[head, cols], tile_s))
      op.store(tile_s, out2_g.at[head, cols])
      op.load((g1_g.at[head, :, cols], tile_s))
      op.store(tile_s, out1_g.at[head, :, cols])

    def tile_inputs(j, cols):
      """Tile ``cols`` of the chunk's state cotangent (bf16 operands), of h and of the reads' cotangents."""
      g2, g1 = op.load_values((out2_g.at[head, cols], tile_s), (out1_g.at[head, :, cols], add_s),
                              *((src.at[j, head, :, cols], dst) for src, dst in ((h_g, ht_s), (ge2_g, ge2t_s),
                                                                                  (gh_g, ght_s))))[:2]
      g2t_s[...], g1t_s[...] = g2.astype(BF16), g1.astype(BF16)
      plgpu.commit_smem()
      z = op.product((C, TILE), k_s, w2b_s.at[cols].T)
      ghat = op.layout(ge2t_s[...]).astype(jnp.float32) - op.product((C, TILE), kc_s, g2t_s.T)
      return z, ghat

    @pl.loop(0, n)
    def _chunk(i):
      j = n - 1 - i
      op.settle()  # the cotangent tiles the previous chunk stored
      coef, e1 = op.load_values((k_g.at[j, head], k_s), (coef_g.at[j, head], tile_s), (e1_g.at[j, head], add_s))[1:]
      kc_s[...] = (op.layout(k_s[...]).astype(jnp.float32) * coef).astype(BF16)
      e1b_s[...], e1c_s[...] = e1.astype(BF16), (e1 * coef).astype(BF16)
      for t in range(tiles):
        cols = pl.ds(t * TILE, TILE)
        w2, w1 = op.load_values((starts2_g.at[j, head, cols], tile_s), (starts1_g.at[j, head, :, cols], add_s))
        w2b_s[cols], w1b_s[:, cols] = w2.astype(BF16), w1.astype(BF16)
      plgpu.commit_smem()
      via_e2 = via_end = jnp.zeros((C, D), jnp.float32)
      for t in range(tiles):  # B1
        cols = pl.ds(t * TILE, TILE)
        z, ghat = tile_inputs(j, cols)
        ghat_slope_s[:, cols] = (ghat * gelu_grad(z)).astype(BF16)
        plgpu.commit_smem()
        via_e2 = via_e2 + op.product((C, D), ghat_slope_s.at[:, cols], w1b_s.at[:, cols].T)
        via_end = via_end - op.product((C, D), ht_s, g1t_s.T)
      gu = row_normalised(via_e2 + coef * via_end)  # R
      gub_s[...] = gu.astype(BF16)
      op.store_value(gu, add_s, gu_g.at[j, head])
      kz = jnp.zeros((C, D), jnp.float32)
      b = decay_s[j]
      for t in range(tiles):  # B2
        cols = pl.ds(t * TILE, TILE)
        z, ghat = tile_inputs(j, cols)
        praw = op.product((C, TILE), e1b_s, w1b_s.at[:, cols])
        g_h = (op.layout(ght_s[...]).astype(jnp.float32) - op.product((C, TILE), e1c_s, g1t_s)
               + op.product((C, TILE), gub_s, w1b_s.at[:, cols]))
        gzt_s[...] = (ghat * praw * gelu_grad2(z) + g_h * gelu_grad(z)).astype(BF16)
        plgpu.commit_smem()
        g2, gs2 = op.load_values((out2_g.at[head, cols], tile_s), (gs2_g.at[j, head, cols], add_s))
        op.store_value(b * g2 + op.product((TILE, D), gzt_s.T, k_s) + gs2, tile_s, out2_g.at[head, cols])
        g1, gs1 = op.load_values((out1_g.at[head, :, cols], tile_s), (gs1_g.at[j, head, :, cols], add_s))
        g1 = (b * g1 + op.product((D, TILE), e1b_s.T, ghat_slope_s.at[:, cols])
              + op.product((D, TILE), gub_s.T, ht_s) + gs1)
        op.store_value(g1, tile_s, out1_g.at[head, :, cols])
        kz = kz + op.product((C, D), gzt_s, w2b_s.at[cols])
      op.store_value(kz, add_s, kz_g.at[j, head])

    op.settle()

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_type = (f32(n, heads, C, D), f32(n, heads, C, D), f32(heads, E, D), f32(heads, D, E))
  scratch = ([operand((C, D))] * 5 + [operand((E, D)), operand((D, E)), operand((C, E))] + [operand((TILE, TILE))] * 6
             + [plgpu.SMEM((n,), jnp.float32), plgpu.SMEM((TILE, TILE), jnp.float32),
                plgpu.SMEM((TILE, TILE), jnp.float32), plgpu.Barrier(num_barriers=5)])
  run = _launch(body, out_type, scratch, heads, interpret)
  kz, gu, g2, g1 = run(k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1)
  return kz, gu, (g2, g1)


def forward_inputs(heads: int, chunks: int, seed: int = 0):
  """Random forward probe inputs at the memory's scales (unit-RMS keys and values, decays near 1)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  k = (jax.random.normal(keys[0], (chunks, heads, C, D)) / D ** 0.5).astype(BF16)
  v = jax.random.normal(keys[1], (chunks, heads, C, D))
  coef = 0.01 * jax.random.uniform(keys[2], (chunks, heads, C, D))
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
  h = gelu(_f32_einsum("jncd,jned->jnce", k, starts2.astype(BF16)), jax.lax.erf).astype(BF16)
  ge2, gh = (normal(key, h.shape).astype(BF16) for key in keys[:2])
  gs2, gs1 = normal(keys[2], starts2.shape, 0.1), normal(keys[3], starts1.shape, 0.1)
  g2, g1 = normal(keys[4], w2.shape), normal(keys[5], w1.shape)
  return k, e1, h, ge2, gh, coef, decay, starts2, starts1, gs2, gs1, g2, g1


DIRECTIONS = {"forward": (forward_kernel, forward_reference, forward_inputs),
              "backward": (pullback_kernel, pullback_reference, pullback_inputs)}


def max_relative_error(got, want) -> float:
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  return max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in leaves)


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
