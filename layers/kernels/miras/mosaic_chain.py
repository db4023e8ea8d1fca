"""Miras MLP memories: the chain of :mod:`keys_chain`'s keys' backward as ONE Pallas Mosaic GPU kernel (Hopper).

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4). :func:`keys_chain.chain_scan` walks the chunks in
reverse with the state's cotangent G; everything that does not take G was formed before (all chunks at once), so a
chunk of the chain is a few products, a row step in closed form and Moneta's scales' share. This kernel walks every
chunk of a head in one CTA of one warpgroup per hidden tile of 64 columns (E = 256: four), as
:mod:`mosaic_keys` does; warpgroup t owns the tile G2_t [64, d], G1_t [d, 64] of the cotangent, which waits in the
output (L2) between its reads, its bf16 copy in shared memory for the products. Per chunk j:

  * (S0) ĝ_e2,t = g_e2,t − (K ⊙ c) G2_tᵀ; (ĝ_e2 ⊙ gelu'(z)) s₁ to shared memory; ĝ_e2 ⊙ curvature held (bf16),
    gelu'(z) and the curvature s₁ (e1 W1_t) ⊙ gelu''(z) formed from z's tile (e1 W1_t: operands in shared memory);
    G2_t's bf16 copy out by TMA (K ⊙ c's cotangent −e2 G2 is a batched product after the chain);
  * (S1) e1's cotangent on a block of 32 columns of the rows from every tile's h and (ĝ_e2 ⊙ gelu'(z)) s₁ in shared
    memory (warpgroups 2 and 3, past the blocks, only keep step with the syncs), out; the row step's pull-back
    (:func:`keys_chain.row_pullback`, two exchanges of row sums through shared memory), s₁ g_u's blocks meeting in
    L2 (warpgroup 0 copies the whole into shared memory for the transposed product, one more sync);
  * (S2) g_h,t = g_h,t' − (e1 ⊙ c) G1_t + s₁ g_u W1_t, g_z,t = ĝ_e2 ⊙ curvature + g_h ⊙ gelu'(z) (to shared memory
    and out by TMA); the updates ΔG: s₂ g_zᵀ K and s₁ e1ᵀ (ĝ_e2 ⊙ gelu'(z)) + s₁ g_uᵀ h, held in registers, and
    Moneta's scales' sums Σ ΔG ⊙ W to shared memory;
  * (S3) the next chunk's operands come in by TMA; one layer at a time, G_t read once: the decays' shares Σ G ⊙ W
    out, G_t ← B G_t + ΔG_t + g_S,t' + the scales' share (from every tile's sums) written once and published
    (output and bf16 copy).

Its products have bf16 operands and float32 accumulation (wgmma), as ``pallas_tiles``' ``bfloat16`` mode. Covers
what :func:`mosaic_keys.unsupported` accepts. Runs in Mosaic GPU interpret mode on any backend (the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from layers.kernels.miras import keys_chain, pallas_chain_inputs, pallas_chain_outputs
from layers.kernels.miras.mosaic_keys import (BF16, LINE, TILE, Warpgroup, _scalar_sums, _sync, loop_zero,
                                              per_head_kernel, publish_tiles, row_sums, scale_share, zeros)
from layers.kernels.miras.pallas_triton import kernel_gelu_grad
from layers.miras.memory import gelu_grad2
from layers.miras.spec import MemorySpec

F32 = jnp.float32


def chain(spec: MemorySpec, inputs: keys_chain.ChainInputs, g_end: dict, *,
          interpret: bool | plgpu.InterpretGPUParams = False, profile_dir: str = ""):
  """:func:`keys_chain.chain_scan` as one kernel: the same arguments (``inputs`` stacked [n, N, ...], per-head
  gates, c = d = 64) and returns. ``profile_dir``: time the steps of each chunk (the named scopes below) with Mosaic
  GPU's profiler, a trace written there per call (:func:`mosaic_keys.per_head_kernel`; GPU only)."""
  x = inputs
  n, heads, c, d = x.k.shape
  e = x.w2.shape[2]
  tiles = e // TILE
  parts = max(p for p in range(1, tiles + 1) if d % p == 0 and (d // p) % LINE == 0)  # as mosaic_keys' backward
  block = d // parts
  ret = spec.retention
  wg_ops = Warpgroup(bool(interpret))
  # [n, N, 7]: s₂ s₁, their summed terms t₂ t₁, the reads' cotangents of s₂ s₁, the chunk-end decay
  scalars = jnp.concatenate([x.scales, x.totals, x.g_scales, x.decay[..., None]], axis=-1)

  def body(nkc_g, ne1c_g, k_g, e1_g, h_g, w1_g, w2_g, z_g, ge2_g, gh_g, ge1_g, gw2_g, gw1_g,
           n_g, a_g, ehat_g, rcurve_g, rstd_g, na_g, coef_g, scalars_g, zero_g, gend2_g, gend1_g,
           out2_g, out1_g, ge1_out, via_out, g2end_out, gz_out, gdec_out, gu_g,
           nkc_s, ne1c_s, k_s, e1_s, h_s, w1_s, g2b_s, g1b_s, gs_s, gu_s, sums_s, terms_s, loaded, synced):
    head, wg = jax.lax.axis_index("head"), jax.lax.axis_index("wg")
    cols, mine, writes = pl.ds(wg * TILE, TILE), pl.ds(wg % parts * block, block), wg < parts
    load, product, accumulate = wg_ops.load, wg_ops.product, wg_ops.accumulate
    rows = lambda vector: jax.lax.broadcast_in_dim(vector, (c, block), (0,))
    exchanges = []  # the row step's row-sum exchanges as traced, alternating between two buffers

    def means(*xs):
      """The whole rows' means of [c, block] arrays from every block's partial sums (one sync), broadcast."""
      exchanges.append(len(exchanges) % 2)
      sums = row_sums(wg_ops, sums_s.at[exchanges[-1]], wg, parts, synced.at[1], [jnp.sum(a, axis=1) for a in xs])
      return [rows(total / d) for total in sums]

    def fetch(j):
      """Chunk j's shared operands: K ⊙ c (negated), e1 ⊙ c (negated), K, e1 and every tile of h and W1 (warpgroup
      0 issues the copies; one barrier takes them all)."""
      @pl.when(wg == 0)
      def _copies():
        for src, dst in ((nkc_g, nkc_s), (ne1c_g, ne1c_s), (k_g, k_s), (e1_g, e1_s)):
          plgpu.copy_gmem_to_smem(src.at[j, head], dst.at[0], loaded.at[0])
        for t in range(tiles):
          tile = pl.ds(t * TILE, TILE)
          plgpu.copy_gmem_to_smem(h_g.at[j, head, :, tile], h_s.at[t], loaded.at[0])
          plgpu.copy_gmem_to_smem(w1_g.at[j, head, :, tile], w1_s.at[t], loaded.at[0])

    publish_tiles((out2_g.at[head, cols], out1_g.at[head, :, cols]), (g2b_s.at[wg], g1b_s.at[wg]),
                  load(gend2_g.at[head, cols]), load(gend1_g.at[head, :, cols]))
    fetch(n - 1)

    @pl.loop(0, n)
    def _chunk(i):
      j = n - 1 - i
      s2, s1, t2, t1, g_read2, g_read1, b = (scalars_g[j, head, q] for q in range(7))
      zero = loop_zero(zero_g, j)
      me, hd = wg + zero, head + zero
      nkc, ne1c, keys, e1, gu_op = (ref.at[zero] for ref in (nkc_s, ne1c_s, k_s, e1_s, gu_s))
      tile_of = lambda ref: load(ref.at[j, hd, :, cols])
      with jax.named_scope("wait: cotangent, operands"):
        _sync(synced.at[0])  # every tile's cotangent published
        plgpu.barrier_wait(loaded.at[0])  # chunk j's operands

      # S0: e2's cotangent and its products' operand; G2's tile out (K ⊙ c's cotangent −e2 G2 is formed after)
      with jax.named_scope("S0 e2"):
        ge2 = accumulate(tile_of(ge2_g), (nkc, g2b_s.at[me].T))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's g_z copied out of gs_s
        plgpu.copy_smem_to_gmem(g2b_s.at[wg], g2end_out.at[j, head, cols])  # waited for before S3 writes it
        z = tile_of(z_g)
        gs_s.at[me][...] = (s1 * ge2 * kernel_gelu_grad(z)).astype(BF16)
        plgpu.commit_smem()
      with jax.named_scope("sync"):
        _sync(synced.at[1])

      # S1: e1's cotangent on this warpgroup's block of columns, and the row step's pull-back; warpgroups past the
      # blocks (E = 256: 2 and 3) would repeat the first ones' work, so they only keep step with the exchanges' syncs
      traced = len(exchanges)

      @pl.when(writes)
      def _row_step():
        with jax.named_scope("S1 e1"):
          read = load(ge1_g.at[j, hd, :, mine])
          via_end, via_e2 = wg_ops.products(
              ((c, block), [(h_s.at[t + zero], g1b_s.at[t + zero, mine].T) for t in range(tiles)]),
              ((c, block), [(gs_s.at[t + zero], w1_s.at[t + zero, mine].T) for t in range(tiles)]))
          via_end = -via_end
          g_e1 = read + via_e2 + wg_ops.along(coef_g.at[j, hd], (c, block), 0) * via_end
          ge1_out.at[j, hd, :, mine][...], via_out.at[j, hd, :, mine][...] = g_e1, via_end

        with jax.named_scope("S1 row pull-back"):
          block_of = lambda ref: load(ref.at[j, hd, :, mine]).astype(F32)
          terms = keys_chain.RowTerms(block_of(n_g), block_of(a_g), block_of(ehat_g), block_of(rcurve_g),
                                      wg_ops.vector(rstd_g.at[j, hd], 0), wg_ops.vector(na_g.at[j, hd], 0))
          gu_g.at[hd, :, mine][...] = s1 * keys_chain.row_pullback(terms, g_e1, means, rows)  # meet in L2

      @pl.when(jnp.logical_not(writes))
      def _row_step_syncs():
        for _ in exchanges[traced:]:
          _sync(synced.at[1])

      with jax.named_scope("S1 g_u exchange"):
        _sync(synced.at[1])

      # S2: z's cotangent and the tile's update
      with jax.named_scope("S2 g_h"):
        # the curvature's share of g_z, ĝ_e2 s₁ (e1 W1) ⊙ gelu''(z), formed here (ĝ_e2 again: G2's bf16 copy is
        # unchanged until S3) rather than held through S1
        ge2 = accumulate(tile_of(ge2_g), (nkc, g2b_s.at[me].T))
        praw = product((c, TILE), (e1, w1_s.at[me]))
        gz_part = (ge2 * s1 * praw * gelu_grad2(tile_of(z_g))).astype(BF16)
        gu = load(gu_g.at[hd]).astype(BF16)

        @pl.when(wg == 0)
        def _gu_operand():  # for the transposed product, after the next sync
          gu_op[...] = gu
          plgpu.commit_smem()
        g_h = accumulate(tile_of(gh_g), (ne1c, g1b_s.at[me]), (gu, w1_s.at[me]))
        _sync(synced.at[2])
      with jax.named_scope("S2 products"):
        step1 = product((d, TILE), (e1.T, gs_s.at[me]), (gu_op.T, h_s.at[me]))
        slope = kernel_gelu_grad(tile_of(z_g))  # formed again from z: held, it would take 32 registers a thread
        gs_s.at[me][...] = (gz_part.astype(F32) + g_h * slope).astype(BF16)  # now g_z's
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(gs_s.at[wg], gz_out.at[j, head, :, cols])
        raw2 = product((TILE, d), (gs_s.at[me].T, keys))  # s₂'s cotangent Σ g_z ⊙ K W2ᵀ is Σ raw2 ⊙ W2
        starts = (w2_g.at[j, hd, cols], w1_g.at[j, hd, :, cols])  # read where used (L2), not held
        if ret.scaled:
          terms_s.at[wg, 0][...] = jnp.sum(raw2 * load(starts[0]), axis=1)
          terms_s.at[wg, 1][...] = jnp.sum(step1 * load(starts[1]), axis=1) / s1
      with jax.named_scope("sync, prefetch"):
        _sync(synced.at[3])  # every tile's sums; chunk j's shared operands read by all

        @pl.when(j > 0)
        def _prefetch():
          fetch(j - 1)

      # S3: G_t <- B G_t + ΔG_t + g_S,t' + the scales' share, read and written once, and published
      with jax.named_scope("S3 update, publish"):
        if ret.scaled:
          sums = _scalar_sums(terms_s, range(tiles), 2)
          g_totals = (sums[0] + g_read2, sums[1] + g_read1)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # S0's copy of G2's tile (S2's of g_z may still run)
        steps = ((1, step1, out1_g.at[hd, :, cols], gw1_g.at[j, hd, :, cols], g1b_s.at[me]),
                 (0, s2 * raw2, out2_g.at[hd, cols], gw2_g.at[j, hd, cols], g2b_s.at[me]))
        for layer, step, out, g_read, operand in steps:  # W1's first: raw2 waits in registers
          w, g = load(starts[layer]), load(out)
          gdec_out.at[j, hd, wg, layer][...] = jnp.sum(g * w, axis=1)
          g = b * g + step + load(g_read)
          if ret.scaled:
            g = g + scale_share(ret, (t2, t1)[layer], g_totals[layer], w)
          out[...], operand[...] = g, g.astype(BF16)
        plgpu.commit_smem()

    plgpu.wait_smem_to_gmem(0)

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, F32)
  bf16_out = lambda *shape: jax.ShapeDtypeStruct(shape, BF16)
  out_type = (f32(heads, e, d), f32(heads, d, e), f32(n, heads, c, d), f32(n, heads, c, d), bf16_out(n, heads, e, d),
              bf16_out(n, heads, c, e), f32(n, heads, tiles, 2, TILE), f32(heads, c, d))
  operand = wg_ops.operand
  scratch = [operand(1, c, d), operand(1, c, d), operand(1, c, d), operand(1, c, d), operand(tiles, c, TILE),
             operand(tiles, d, TILE), operand(tiles, TILE, d), operand(tiles, d, TILE), operand(tiles, c, TILE),
             operand(1, c, d), plgpu.SMEM((2, tiles, 3, c), F32), plgpu.SMEM((tiles, 2, TILE), F32),
             plgpu.Barrier(num_arrivals=4 + 2 * tiles, num_barriers=1),
             plgpu.Barrier(num_arrivals=tiles, num_barriers=4)]
  kernel = per_head_kernel(body, out_type, scratch, heads, tiles, interpret, profile_dir)
  bf16 = lambda a: a.astype(BF16)
  r = x.rows  # its [c, d] terms as bf16 (rounded once; the row step takes them in float32): half their HBM traffic
  g2, g1, g_e1, via_end, g2_end, g_z, g_dec, _ = kernel(
      bf16(x.nkc), bf16(x.ne1c), bf16(x.k), bf16(x.e1), bf16(x.h), bf16(x.w1), bf16(x.w2), x.z, x.g_e2,
      x.g_h, x.g_e1, x.g_w2, x.g_w1, *map(bf16, (r.n, r.a, r.ehat, r.curve)), r.rstd, r.na, x.coef, scalars,
      zeros(n), g_end["w2"], g_end["w1"])
  outputs = keys_chain.ChainOutputs(g_e1, via_end, g2_end, g_z, jnp.sum(g_dec, axis=(2, 4)))
  return {"w2": g2, "w1": g1}, outputs


def keys_backward(spec: MemorySpec, residuals, cotangents, *, interpret: bool | plgpu.InterpretGPUParams = False,
                  profile_dir: str = ""):
  """:func:`keys_chain.keys_backward` with this kernel as its chain, :mod:`pallas_chain_inputs`' as its first pass
  and :mod:`pallas_chain_outputs`' as its last (arguments and returns as there; ``interpret`` and ``profile_dir``
  as :func:`chain`'s)."""
  return keys_chain.keys_backward(
      spec, residuals, cotangents,
      inputs_pass=functools.partial(pallas_chain_inputs.chain_inputs, interpret=bool(interpret)),
      chain=functools.partial(chain, interpret=interpret, profile_dir=profile_dir),
      outputs_pass=functools.partial(pallas_chain_outputs.chain_outputs, interpret=bool(interpret)))
