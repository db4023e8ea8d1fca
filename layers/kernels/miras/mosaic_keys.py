"""Miras MLP memories: the keys' recurrence as ONE Pallas Mosaic GPU kernel per direction (Hopper: wgmma, TMA).

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4) in the split form of :mod:`pallas_tiles`: the only
sequential work of a chunkwise MLP memory is its keys' recurrence S_{j+1} = f_j(S_j). :mod:`pallas_tiles` runs each
chunk as three Triton kernels (F1, E, F2): 4.5 ms for 128 heads × 64 chunks on an H100. This kernel walks every
chunk of a head in one CTA of one warpgroup per hidden tile of 64 columns (E = 256: four), the bf16 copies of the
state that every product reads in shared memory: 1.9 ms (``benchmarks/miras_keys.py``, docs/benchmarks.md).
Warpgroup t owns its tile of the float32 state (W2_t [64, d], W1_t [d, 64]); between its publication and its update
the tile waits in the end state's output (in L2), leaving the registers to the chunk's other work, and goes out to
the stacked start states as bf16 (half the bytes for every later pass over them: the reads, both directions, and
the backward). Per chunk j, as F1, E and F2 compute it:

  * the start state's scales (s₂, s₁) from every tile's rows' scale terms (sync S0), out with their summed terms;
  * z = s₂ K W2_tᵀ, h_t = gelu(z) to shared memory and out, z out (bf16, for the chain backward; sync S1);
  * u = s₁ Σ_t h_t W1_tᵀ and the keys' errors e1 = ∂ℓ/∂u row-wise (LayerNorm, bias gradient, LayerNorm backward:
    :func:`pallas_triton.keys_errors` with the row means as ``broadcast_in_dim``) on whole [c, d] rows in warpgroup
    0 alone, which writes e1, −(K ⊙ c) and −(e1 ⊙ c) in bf16 for the products and e1, u out; gelu'(z) (sync S2:
    nobody reads this chunk's h, W1, K or V any more; the next chunk's K, V and c come in by TMA);
  * e2_t = s₁ (e1 W1_t) ⊙ gelu'(z), out; W2_t ← B W2_t − e2_tᵀ (K ⊙ c), W1_t ← B W1_t − (e1 ⊙ c)ᵀ h_t from the
    waiting float32 tile into the accumulators, published as chunk j + 1's start (or left as the end state).

:func:`keys_backward` walks the chunks in reverse the same way, with B1, R and B2 of :mod:`pallas_tiles`' backward
and the read scales' share in one kernel, each warpgroup owning its tile of the state's cotangent. Its first form
equalled the Triton backward on an H100 but was slower (21.1 against 14.9 ms for 128 heads × 64 chunks: 5.5 KB of
register spills a thread, its row step on whole [c, d] rows in every warpgroup); this one splits the row step into
blocks of columns and holds nothing [c, d] across a sync: 16.6 against 14.4 ms, still slower, so no implementation
name selects it (``pallas_tiles.Tiling(keys_backward="mosaic")`` does; docs/benchmarks.md, "Fourteenth session").

Every product has bf16 operands and float32 accumulation with the operands :mod:`pallas_tiles` rounds (its
``bfloat16`` matmul mode); wgmma has no float32 products, so the float32 mode stays Triton's. The forward's outputs
are those of :mod:`pallas_tiles`' forward scan (but the stacked start states in bf16) and the backward takes them
(either direction pairs with either kernel of the other). Covers what :func:`unsupported` accepts: per-head gates,
c = d = 64, E a multiple of 64 up to 256, biases without δ. Runs in Mosaic GPU interpret mode on any backend (the
tests).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend import core as jex_core
from jax.extend.core import primitives

from layers.kernels.miras import pallas_triton
from layers.miras.memory import broadcast_row_mean, gelu_grad2
from layers.miras.spec import MemorySpec

LINE = 32  # float32 values in a 128-byte line
TILE = 64  # columns of E per warpgroup: the M (W2) and N (W1) of its state tile's wgmma, 128 bytes of bf16
_MAX_TILES = 4  # warpgroups a CTA: 512 threads keep 128 registers each
_OPERAND = (plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(2 * TILE))  # 128-byte swizzled bf16 rows
BF16 = jnp.bfloat16


def unsupported(spec: MemorySpec, chunk_size: int, head_dim: int, per_head_gates: bool) -> str | None:
  """Why this kernel cannot run the keys' forward of this memory, or None if it can (in the bfloat16 matmul mode:
  wgmma has no float32 products)."""
  if (why := pallas_triton.unsupported(spec, chunk_size, head_dim)) is not None:
    return why
  if not per_head_gates:
    return "it covers per-head gates only"
  if chunk_size != 64 or head_dim != 64:
    return f"it needs c = d = 64 (one wgmma tile), got c = {chunk_size}, d = {head_dim}"
  hidden = spec.memory.expansion * head_dim
  if hidden % TILE or hidden // TILE > _MAX_TILES:
    return f"the hidden width must be a multiple of {TILE} up to {TILE * _MAX_TILES} (a warpgroup a tile), got {hidden}"
  if spec.bias.needs_delta:
    return f"its row-wise step takes no δ ({type(spec.bias).__name__})"
  return None


class Warpgroup:
  """A warpgroup's arrays: pinned to the WGMMA layout when compiled (rows of [c] and columns of [d] vectors to its
  reductions), read from global or shared memory straight into registers, and wgmma products."""

  def __init__(self, interpret: bool):
    self.interpret = interpret

  def _pinned(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def layout(self, x):
    return self._pinned(x, plgpu.Layout.WGMMA)

  def operand(self, *shape):
    """A bf16 wgmma operand buffer in shared memory (128-byte swizzled rows when compiled)."""
    return plgpu.SMEM(shape, BF16, transforms=() if self.interpret else _OPERAND)

  def load(self, ref):
    """A [r, s] array of global (or shared) memory, as float32."""
    return self._pinned(plgpu.load(ref, optimized=False), plgpu.Layout.WGMMA).astype(jnp.float32)

  def vector(self, ref, axis: int):
    """A vector in memory laid out as axis ``axis`` of a WGMMA-layout array (0: one value a row; 1: one a column)."""
    return self._pinned(plgpu.load(ref, optimized=False), plgpu.Layout.WGMMA.reduce(1 - axis))

  def along(self, ref, shape, axis: int):
    """A vector in memory broadcast along ``axis`` of a 2-D ``shape`` (0: one value a row; 1: one a column)."""
    return jax.lax.broadcast_in_dim(self.vector(ref, axis), shape, (axis,))

  @classmethod
  def product(cls, shape, *pairs):
    """Σ a @ b over the (a, b) operand pairs, into a fresh float32 accumulator."""
    return cls.products((shape, pairs))[0]

  @staticmethod
  def products(*groups):
    """[Σ a @ b over a group's (a, b) operand pairs] for each (shape, pairs) group, each into a fresh float32
    accumulator, every group's wgmmas issued together and waited for once."""
    def run(*accs):
      for acc, (_, pairs) in zip(accs, groups, strict=True):
        for a, b in pairs:
          plgpu.wgmma(acc, a, b)
      plgpu.wgmma_wait(0)
      return [acc[...] for acc in accs]
    return pl.run_scoped(run, *(plgpu.ACC(shape, jnp.float32) for shape, _ in groups))

  @staticmethod
  def accumulate(init, *pairs):
    """init + Σ a @ b over the (a, b) operand pairs, in an accumulator that starts as ``init`` (a state tile's
    update). The operands may not index shared memory with Python ints (``run_state`` then fails to lower)."""
    def run(acc):
      for a, b in pairs:
        plgpu.wgmma(acc, a, b)
      plgpu.wgmma_wait(0)
    return pl.run_state(run)(plgpu.ACC.init(init))


def _scalar_sums(ref, slots, count: int) -> list:
  """[Σ over t in ``slots`` and the rows r of ref[t, i, r] for i < count] (ref in shared memory, [slots, ≥ count,
  rows]), the same in every thread, by scalar reads: a warpgroup's array reduced to one scalar comes out as per-warp
  partial sums on the GPU (an H100; interpret mode does not show it)."""
  add_row = lambda r, sums: [x + sum(ref[t, i, r] for t in slots) for i, x in enumerate(sums)]
  return jax.lax.fori_loop(0, ref.shape[-1], add_row, [jnp.float32(0.0)] * count, unroll=8)


def row_sums(wg_ops: Warpgroup, buffer, wg, parts: int, barrier, partials) -> list:
  """The whole rows' sums [c] of arrays split into blocks of columns across the first ``parts`` warpgroups, from
  this warpgroup's partial sums over its block (``partials``, [c] each), exchanged through ``buffer`` [warpgroups,
  ≥ len(partials), c] in shared memory with one sync (``barrier``)."""
  for i, partial in enumerate(partials):
    buffer.at[wg, i][...] = partial
  _sync(barrier)
  return [sum(wg_ops.vector(buffer.at[t, i], 0) for t in range(parts)) for i in range(len(partials))]


def publish_tiles(outputs, operands, g2, g1):
  """A warpgroup's tiles of the state's cotangent (G2 [TILE, d], G1 [d, TILE]) into the output where they wait
  (``outputs``: the two refs of its tiles) and as bf16 into its shared operands (``operands``), committed."""
  for out, operand, g in zip(outputs, operands, (g2, g1), strict=True):
    out[...], operand[...] = g, g.astype(BF16)
  plgpu.commit_smem()


def scale_share(ret, total, g_scale, w):
  """The read scale's share of a warpgroup's tile of one layer's state cotangent at its tile of the state w
  (float32), from the layer's summed scale terms t and its scale's cotangent g_s (numbers):
  ∂scale_term_rows/∂w · ∂s/∂t · g_s."""
  g_t = _mosaic_lowerable(jax.vjp(ret.scale_from, total)[1])(g_scale)[0]
  return _mosaic_lowerable(jax.vjp(ret.scale_term_rows, w)[1])(jnp.broadcast_to(g_t, w.shape[:1]))[0]


def scales_share(ret, totals, g_scales, w2, w1) -> list:
  """:func:`scale_share` of both layers' tiles (W2 [TILE, d], W1 [d, TILE]), [(W2's), (W1's)]."""
  return [scale_share(ret, t, g_s, w) for t, g_s, w in zip(totals, g_scales, (w2, w1), strict=True)]


PROFILE_RANGES = 250  # named ranges a warpgroup records when profiled: what the chain kernel's shared memory leaves


def per_head_kernel(body, out_type, scratch_types, heads: int, tiles: int,
                    interpret: bool | plgpu.InterpretGPUParams = False, profile_dir: str = ""):
  """``body`` as a Mosaic GPU kernel of one CTA per head (axis "head") and one warpgroup per hidden tile (axis
  "wg"); ``interpret``: Mosaic GPU interpret mode, with default or the given parameters; ``profile_dir``: record the
  body's ``jax.named_scope`` ranges with Mosaic GPU's profiler (the first :data:`PROFILE_RANGES` of each warpgroup,
  in shared memory) and write them there as a Chrome trace at each call (GPU only). Exponentials are approximate
  (``approx_math``: ex2.approx, as Triton's): with :func:`loop_zero` the forward 2.01 → 1.88 ms and the chain's keys'
  backward even (one H100, same call; docs/benchmarks.md, "Twenty-second session")."""
  profile = ({"profile_space": PROFILE_RANGES, "profile_dir": profile_dir, "profile_bounds_check": True}
             if profile_dir else {})
  params = plgpu.CompilerParams(approx_math=True, **profile)
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, grid=(heads,), grid_names=("head",),
                      num_threads=tiles, thread_name="wg", compiler_params=params,
                      interpret=plgpu.InterpretGPUParams() if interpret is True else interpret or None)


def loop_zero(zeros_g, j):
  """A zero read from global memory for chunk j (``zeros_g``: int32 [n] zeros, :func:`zeros`). The kernels index
  their shared buffers (and their head in global memory) with it inside the chunk loop, so that LLVM cannot hoist
  the products' wgmma descriptors and the tiles' addresses out of the loop: held across it, they outnumbered the
  registers (ptxas for sm_90a: the chain kernel spilled 1124 B a thread, this module's forward 460 B; with the zero
  332 and 16 B), and the spills' round trips through L2 were the chain kernel's largest stall (Nsight Compute: half
  of its warps' cycles waiting on L1TEX). The keys' backward took 10.34 → 9.23 ms, the forward 2.48 → 2.01 ms (one
  H100, same call; docs/benchmarks.md, "Twenty-second session")."""
  return zeros_g[j]


def zeros(n: int) -> jax.Array:
  """The :func:`loop_zero` input of an n-chunk kernel."""
  return jnp.zeros((n,), jnp.int32)


def _sync(barrier):
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def row_errors(spec: MemorySpec, u, k, v, gamma, beta):
  """The row step of both kernels: the keys' errors e1 [c, d] from u, K, V and the LayerNorm's (γ, β) broadcast
  [c, d] (:func:`pallas_triton.keys_errors` in the form Mosaic GPU lowers: row means by ``broadcast_in_dim``, no
  vjps traced)."""
  return pallas_triton.keys_errors(spec, u, k, v, None, (gamma, beta), broadcast_row_mean, pullbacks=False)[0]


def row_step_vjp(spec: MemorySpec, u, k, v, gamma, beta, g):
  """:func:`row_errors` pulled back from g: the cotangents of (u, K, V, γ, β), [c, d] each."""
  return jax.vjp(functools.partial(row_errors, spec), u, k, v, gamma, beta)[1](g)


def keys_forward(spec: MemorySpec, state: dict, ln, xs, *, interpret: bool | plgpu.InterpretGPUParams = False):
  """The keys' recurrence of every chunk and head: ``state`` {w2: [N, E, d], w1: [N, d, E]} float32, ln (γ, β)
  [N, 1, d], ``xs`` as :func:`layers.kernels.miras.flat.miras_flat`'s keys' inputs (K, V, δ [n, N, c, ...], the
  chunk-end decay [n, N, 1] and coefficients [n, N, c, 1], completeness). Returns the stacked start states W2
  [n, N, E, d] and W1 [n, N, d, E] (slot j: chunk j's, bf16: only the products take them, and the products' bf16
  operands are what a float32 copy would be cast to; the state recurs in float32), the end state's (W2, W1)
  float32, e2 and h [n, N, c, E] (bf16), e1 and u [n, N, c, d], the start states' scales and summed scale terms
  [n, N, 2] (W2's, W1's), and z = s₂ K W2ᵀ [n, N, c, E] (bf16: the chain backward's GELU slopes, instead of a
  batched product and a float32 array in XLA). ``interpret``: Mosaic GPU interpret mode (any backend), with default
  or the given parameters (race detection, say)."""
  k, v = (x.astype(jnp.float32) for x in xs[:2])  # bf16 chunks (``miras_flat``'s keep_dtype) too
  _, _, _, end_decay, end_coef, _ = xs
  n, heads, c, d = k.shape
  e = state["w2"].shape[1]
  tiles = e // TILE
  ret = spec.retention
  wg_ops = Warpgroup(bool(interpret))

  def body(k_g, v_g, decay_g, coef_g, ln_g, w2_g, w1_g, zero_g,
           starts2_g, starts1_g, end2_g, end1_g, e2_g, h_g, e1_g, u_g, scalars_g, z_g,
           k_s, v_s, coef_s, ln_s, w2b_s, w1b_s, h_s, e2_s, kcn_s, e1cn_s, e1b_s, terms_s, loaded, ln_loaded,
           synced):
    head, wg = jax.lax.axis_index("head"), jax.lax.axis_index("wg")
    cols = pl.ds(wg * TILE, TILE)
    load = wg_ops.load
    rows = lambda ref, width: wg_ops.along(ref, (c, width), 0)

    def fetch(j):
      """Chunk j's keys, values and coefficients into shared memory (warpgroup 0; a barrier each)."""
      for i, (src, dst) in enumerate(((k_g, k_s), (v_g, v_s), (coef_g, coef_s))):
        plgpu.copy_gmem_to_smem(src.at[j, head], dst, loaded.at[i])

    def publish(j, w2, w1, zero=0):
      """Chunk j's start state: into the end state's output (float32: where the state waits while the registers do
      the chunk's other work), stacked out and into shared memory as bf16 (the reads' and the products' operands),
      and its rows' scale terms for its scales (``zero``: the chunk loop's, see there)."""
      end2_g.at[head + zero, cols][...], end1_g.at[head + zero, :, cols][...] = w2, w1
      w2b_s.at[wg + zero][...], w1b_s.at[wg + zero][...] = w2.astype(BF16), w1.astype(BF16)
      if ret.scaled:
        terms_s.at[wg, 0][...], terms_s.at[wg, 1][...] = ret.scale_term_rows(w2), ret.scale_term_rows(w1)
      plgpu.commit_smem()
      # out by TMA (a store of bf16 registers would not fill whole 32-byte sectors); the copies are waited for
      # with the next chunk's h and e2's, before these buffers are written again
      plgpu.copy_smem_to_gmem(w2b_s.at[wg], starts2_g.at[j, head, cols])
      plgpu.copy_smem_to_gmem(w1b_s.at[wg], starts1_g.at[j, head, :, cols])

    def scale_totals():
      """Every tile's rows' terms summed (W2's, W1's)."""
      return _scalar_sums(terms_s, range(tiles), 2) if ret.scaled else [jnp.float32(0.0)] * 2

    @pl.when(wg == 0)
    def _first():
      plgpu.copy_gmem_to_smem(ln_g.at[head], ln_s, ln_loaded.at[0])
      fetch(0)

    publish(0, load(w2_g.at[head, cols]), load(w1_g.at[head, :, cols]))
    plgpu.barrier_wait(ln_loaded.at[0])

    @pl.loop(0, n)
    def _chunk(j):
      zero = loop_zero(zero_g, j)
      me, hd = wg + zero, head + zero
      kcn, e1cn, e1b = (ref.at[zero] for ref in (kcn_s, e1cn_s, e1b_s))
      with jax.named_scope("F0 scales"):
        _sync(synced.at[0])  # every tile's scale terms and bf16 copies
        totals = scale_totals()
        s2, s1 = (ret.scale_from(t) for t in totals)

        @pl.when(wg == 0)
        def _scalars():
          for i, x in enumerate((s2, s1, *totals)):
            scalars_g[j, head, i] = x

      with jax.named_scope("F1 h"):
        for i in range(3):  # chunk j's keys, values and coefficients
          plgpu.barrier_wait(loaded.at[i])
        keys = lambda: wg_ops.layout(k_s[...])  # read from shared memory where needed, not held in registers
        z = lambda: s2 * wg_ops.product((c, TILE), (keys().astype(BF16), w2b_s.at[me].T))
        z_tile = z()
        h = pallas_triton.kernel_gelu(z_tile)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's h, z, e2 and this start state copied out
        # z goes out through e2's buffer (a buffer of its own would take the shared memory's last 32 KiB from L1)
        h_s.at[me][...], e2_s.at[me][...] = h.astype(BF16), z_tile.astype(BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_s.at[wg], h_g.at[j, head, :, cols])
        plgpu.copy_smem_to_gmem(e2_s.at[wg], z_g.at[j, head, :, cols])
        _sync(synced.at[1])  # every h tile

      @pl.when(wg == 0)
      def _rows():  # warpgroup 0's alone (the others would repeat it): out, and the products' operands
        with jax.named_scope("F2 rows"):
          u = s1 * wg_ops.product((c, d), *((h_s.at[t + zero], w1b_s.at[t + zero].T) for t in range(tiles)))
          ln_rows = tuple(wg_ops.along(ln_s.at[i], (c, d), 1) for i in range(2))
          e1 = row_errors(spec, u, keys(), wg_ops.layout(v_s[...]), *ln_rows)
          coef = rows(coef_s, d)
          e1_g.at[j, hd][...], u_g.at[j, hd][...] = e1, u
          kcn[...], e1cn[...] = (-(keys() * coef)).astype(BF16), (-(e1 * coef)).astype(BF16)
          e1b[...] = e1.astype(BF16)
          plgpu.commit_smem()

      with jax.named_scope("F3 e2, update"):
        slope = pallas_triton.kernel_gelu_grad(z())  # recomputed: held, it would take 32 registers a thread
        # S2: this chunk's h, W1, K and V read by all (the next chunk's K, V and c may come in), −(K ⊙ c) and
        # −(e1 ⊙ c) written. A full sync: with the wait deferred past the e2 product, interpret mode's race detector
        # flags the prefetch against the last reads of K.
        _sync(synced.at[2])
        e2 = s1 * wg_ops.product((c, TILE), (e1b, w1b_s.at[me])) * slope
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # z copied out of e2's buffer (long since, in F1)
        e2_s.at[me][...] = e2.astype(BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(e2_s.at[wg], e2_g.at[j, head, :, cols])

        @pl.when(jnp.logical_and(wg == 0, j + 1 < n))
        def _prefetch():
          fetch(j + 1)

        b = decay_g[j, head, 0]
        w2 = wg_ops.accumulate(b * load(end2_g.at[hd, cols]), (e2_s.at[me].T, kcn))
        w1 = wg_ops.accumulate(b * load(end1_g.at[hd, :, cols]), (e1cn.T, h_s.at[me]))

        @pl.when(j + 1 < n)
        def _next():
          publish(j + 1, w2, w1, zero)

        @pl.when(j + 1 == n)
        def _end():
          end2_g.at[hd, cols][...], end1_g.at[hd, :, cols][...] = w2, w1

    plgpu.wait_smem_to_gmem(0)

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, BF16)
  acts = bf16(n, heads, c, e)  # e2, h, z
  out_type = (bf16(n, heads, e, d), bf16(n, heads, d, e), f32(heads, e, d), f32(heads, d, e), acts, acts,
              f32(n, heads, c, d), f32(n, heads, c, d), f32(n, heads, 4), acts)
  operand = wg_ops.operand
  scratch = [plgpu.SMEM((c, d), jnp.float32), plgpu.SMEM((c, d), jnp.float32), plgpu.SMEM((c,), jnp.float32),
             plgpu.SMEM((2, d), jnp.float32), operand(tiles, TILE, d), operand(tiles, d, TILE),
             *(operand(tiles, c, TILE) for _ in range(2)), *(operand(1, c, d) for _ in range(3)),
             plgpu.SMEM((tiles, 2, TILE), jnp.float32), plgpu.Barrier(num_barriers=3),
             plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_arrivals=tiles, num_barriers=3)]
  kernel = per_head_kernel(body, out_type, scratch, heads, tiles, interpret)
  starts2, starts1, end2, end1, e2, h, e1, u, scalars, z = kernel(
      k, v, end_decay, end_coef.reshape(n, heads, c), jnp.concatenate(ln, axis=1), state["w2"], state["w1"], zeros(n))
  return starts2, starts1, (end2, end1), e2, h, e1, u, scalars[..., :2], scalars[..., 2:], z


def _mosaic_lowerable(fun, *, columns: int | None = None, width: int | None = None, row_sum=None):
  """``fun`` traced to a jaxpr and evaluated with its ``add_jaxvals`` (how a vjp's pullback sums cotangents) as
  plain adds: Pallas' Mosaic GPU backend lowers no ``add_jaxvals``.

  With ``columns`` = w, ``fun`` is row-wise on [c, d] arrays (d = ``width``; it mixes columns only through sums over
  a row) and is evaluated on one [c, w] block of columns of each: its arguments are such blocks, each sum over
  the rows' axis is ``row_sum(this block's partial sums [c])`` (the whole rows' sums, from every block: an exchange
  between warpgroups) and each broadcast to [c, d] one to [c, w], so it returns its outputs' blocks."""
  def bind(eqn, ins):
    if columns is None:
      return eqn.primitive.bind(*ins, **eqn.params)
    if eqn.primitive is jax.lax.reduce_sum_p and eqn.params["axes"] == (1,) and ins[0].ndim == 2:
      return row_sum(jnp.sum(ins[0], axis=1))
    if eqn.primitive is jax.lax.broadcast_in_dim_p and eqn.params["broadcast_dimensions"] in ((), (0,)):
      return eqn.primitive.bind(*ins, **(eqn.params | {"shape": (*eqn.params["shape"][:1], columns)}))
    if eqn.primitive in (jax.lax.reduce_sum_p, jax.lax.broadcast_in_dim_p) or "shape" in eqn.params:
      raise ValueError(f"{eqn.primitive} {eqn.params} is not row-wise on [c, d] blocks of columns")
    return eqn.primitive.bind(*ins, **eqn.params)

  def evaluate(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda var: var.val if isinstance(var, jex_core.Literal) else env[var]
    for eqn in jaxpr.eqns:
      ins = [read(var) for var in eqn.invars]
      if eqn.primitive is primitives.add_jaxvals_p:
        outs = [ins[0] + ins[1]]
      elif "jaxpr" in eqn.params and isinstance(eqn.params["jaxpr"], jex_core.ClosedJaxpr):
        inner = eqn.params["jaxpr"]
        outs = evaluate(inner.jaxpr, inner.consts, ins)
      else:
        outs = bind(eqn, ins)
        outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(var) for var in jaxpr.outvars]

  def run(*args):
    traced = args if columns is None else [jax.ShapeDtypeStruct((a.shape[0], width), a.dtype) for a in args]
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*traced)
    outs = evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  return run


def keys_backward(spec: MemorySpec, residuals, cotangents, *, interpret: bool | plgpu.InterpretGPUParams = False):
  """The pull-back of :func:`keys_forward` through every chunk in reverse, as one kernel: ``residuals`` and
  ``cotangents`` as ``pallas_tiles``' recurrence has them ((ln, xs, start states, ``KeyPass``es, u, scales, summed
  terms); (end state's, (start states', ``KeyPass``es'))). Returns the initial state's cotangent {w2, w1}, the
  LayerNorm's (γ, β) [N, 1, d], and the cotangents of K (all of it: through the row step and through z), V and the
  chunk-end coefficients broadcast [n, N, c, d], of K ⊙ c [n, N, c, d], and of the chunk-end decay on each layer
  summed over the layer, [n, N, 2] (per-head gates).

  Per chunk (one warpgroup per tile, four syncs): B1's tile terms and their [c, d] sums from the shared bf16
  operands; R, the row step's vjp (``keys_errors`` with ``broadcast_row_mean``) on blocks of columns of the rows
  (:func:`_mosaic_lowerable`' ``columns``; d = 64: two blocks of 32, 16 registers a thread an array rather than 32, the
  third and fourth warpgroups repeating the first two's without writing), the row sums exchanged through shared
  memory and g_u's blocks meeting in L2; B2's update of
  the tile's cotangent, K's share per tile (summed after the kernel), and the read scales' share from every tile's
  row sums (scalar reads; see :func:`keys_forward`). Nothing [c, d] is held across a sync: K, e1 and c are read
  where used (L2) or as the bf16 operands warpgroup 0 writes for the chunk before it starts, and the cotangent
  waits in the output between its reads."""
  ln, xs, starts, keys, u, scales, totals, _ = residuals
  g_end, (g_starts, g_keys) = cotangents
  k, v = (x.astype(jnp.float32) for x in xs[:2])  # bf16 chunks (``miras_flat``'s keep_dtype) too
  _, _, _, end_decay, end_coef, _ = xs
  n, heads, c, d = k.shape
  e = starts["w2"].shape[2]
  tiles = e // TILE
  # the row step's blocks of columns: as many as there are warpgroups, but each a whole 128-byte line of float32
  # (a global memory store takes no less); warpgroup t takes block t mod parts and only the first parts write
  parts = max(p for p in range(1, tiles + 1) if d % p == 0 and (d // p) % LINE == 0)
  block = d // parts
  ret = spec.retention
  wg_ops = Warpgroup(bool(interpret))
  g_scale = jnp.stack([g_keys.scale["w2"][:, :, 0, 0], g_keys.scale["w1"][:, :, 0, 0]], axis=-1)  # [n, N, 2]
  scalars = jnp.concatenate([scales, totals, g_scale], axis=-1)  # [n, N, 6]: s2 s1 t2 t1 gs2 gs1

  def body(k_g, v_g, u_g, e1_g, decay_g, coef_g, ln_g, starts2_g, starts1_g, scalars_g, ge1_g, ge2_g, ghk_g,
           gs2_g, gs1_g, gend2_g, gend1_g,
           out2_g, out1_g, gk_g, gv_g, gcoef_g, gkc_g, gkz_g, gdec_g, gln_g, gu_g,
           w2b_s, w1b_s, g2b_s, g1b_s, h_s, gs_s, e1b_s, gub_s, kb_s, rows_s, sums_s, synced, exchanged):
    head, wg = jax.lax.axis_index("head"), jax.lax.axis_index("wg")
    cols, mine, writes = pl.ds(wg * TILE, TILE), pl.ds(wg % parts * block, block), wg < parts
    load, product, accumulate = wg_ops.load, wg_ops.product, wg_ops.accumulate
    rows = lambda ref, width: wg_ops.along(ref, (c, width), 0)
    exchanges = itertools.count()  # the row step's row sums, alternating between two buffers

    def row_sum(partial):
      """The rows' sums [c] from every block's partial sums over its columns."""
      return row_sums(wg_ops, sums_s.at[next(exchanges) % 2], wg, parts, exchanged.at[0], [partial])[0]

    def publish(g2, g1):
      publish_tiles((out2_g.at[head, cols], out1_g.at[head, :, cols]), (g2b_s.at[wg], g1b_s.at[wg]), g2, g1)

    def start_tiles(j):
      """This tile of chunk j's start state (W2, W1), float32 (stacked in bf16 by the Mosaic forward)."""
      return (load(starts2_g.at[j, head, cols]).astype(jnp.float32),
              load(starts1_g.at[j, head, :, cols]).astype(jnp.float32))

    def row_operands(j):
      """Chunk j's K and e1 as bf16 operands (warpgroup 0)."""
      @pl.when(wg == 0)
      def _write():
        e1b_s[...], kb_s[...] = load(e1_g.at[j, head]).astype(BF16), load(k_g.at[j, head]).astype(BF16)
        plgpu.commit_smem()

    publish(load(gend2_g.at[head, cols]), load(gend1_g.at[head, :, cols]))
    row_operands(n - 1)

    @pl.loop(0, n)
    def _chunk(i):
      j = n - 1 - i
      _sync(synced.at[0])
      s2, s1, t2, t1, g_read2, g_read1 = (scalars_g[j, head, q] for q in range(6))  # g_read: the reads' of s
      w2, w1 = start_tiles(j)
      # B's cotangent on each layer, Σ G ⊙ W (per-head gates: one number; rows here, summed after the kernel)
      gdec_g.at[j, head, wg, 0][...] = jnp.sum(load(out2_g.at[head, cols]) * w2, axis=1)
      gdec_g.at[j, head, wg, 1][...] = jnp.sum(load(out1_g.at[head, :, cols]) * w1, axis=1)
      w2b_s.at[wg][...], w1b_s.at[wg][...] = w2.astype(BF16), w1.astype(BF16)
      plgpu.commit_smem()
      coef = lambda: rows(coef_g.at[j, head], d)
      e1 = lambda: load(e1_g.at[j, head])

      def tile_terms():
        """This tile's zraw = K W2_tᵀ, z = s₂ zraw, praw = e1 W1_t and ĝ = g_e2 − (K ⊙ c) G2_tᵀ [c, tile]; taken
        for B1 and again for B2 (four products) rather than held across two syncs in 128 registers a thread."""
        zraw = product((c, TILE), (kb_s, w2b_s.at[wg].T))
        z = s2 * zraw
        praw = product((c, TILE), (e1b_s, w1b_s.at[wg]))
        kc = (load(k_g.at[j, head]) * coef()).astype(BF16)
        ge2 = load(ge2_g.at[j, head, :, cols]) - product((c, TILE), (kc, g2b_s.at[wg].T))
        return zraw, z, praw, ge2

      zraw, z, praw, ge2 = tile_terms()
      slope = pallas_triton.kernel_gelu_grad(z)
      h_s.at[wg][...] = pallas_triton.kernel_gelu(z).astype(BF16)
      gs_s.at[wg][...] = (ge2 * slope).astype(BF16)
      plgpu.commit_smem()
      gkc_g.at[j, head, wg][...] = -product((c, d), ((s1 * praw * slope).astype(BF16), g2b_s.at[wg]))
      rows_s.at[wg, 0][...] = jnp.sum(ge2 * praw * slope, axis=1)
      _sync(synced.at[1])

      # R on this warpgroup's columns of the rows
      via_end = -product((c, block), *((h_s.at[t], g1b_s.at[t, mine].T) for t in range(tiles)))
      via_e2 = s1 * product((c, block), *((gs_s.at[t], w1b_s.at[t, mine].T) for t in range(tiles)))
      ln_rows = tuple(wg_ops.along(ln_g.at[head, q, mine], (c, block), 1) for q in range(2))
      u_j = load(u_g.at[j, head, :, mine])
      g_e1 = load(ge1_g.at[j, head, :, mine]) + via_e2 + rows(coef_g.at[j, head], block) * via_end
      g_u, g_k, g_v, g_gamma, g_beta = _mosaic_lowerable(
          functools.partial(row_step_vjp, spec), columns=block, width=d, row_sum=row_sum)(
          u_j, load(k_g.at[j, head, :, mine]), load(v_g.at[j, head, :, mine]), *ln_rows, g_e1)

      @pl.when(writes)
      def _row_outputs():
        gk_g.at[j, head, :, mine][...], gv_g.at[j, head, :, mine][...] = g_k, g_v
        gcoef_g.at[j, head, :, mine][...] = load(e1_g.at[j, head, :, mine]) * via_end
        for q, g in enumerate((g_gamma, g_beta)):  # summed over the chunks in place (the first one writes)
          @pl.when(i == 0)
          def _first():
            gln_g.at[head, q, :, mine][...] = g

          @pl.when(i > 0)
          def _add():
            gln_g.at[head, q, :, mine][...] = load(gln_g.at[head, q, :, mine]) + g
        gu_g.at[head, :, mine][...] = s1 * g_u  # the blocks meet in L2 (shared memory is full)
      # Σ g_u ⊙ u over this block's columns (a repeated block's counts once)
      rows_s.at[wg, 2][...] = jnp.sum(g_u * u_j, axis=1) * writes.astype(jnp.float32)
      _sync(synced.at[2])

      gu = load(gu_g.at[head]).astype(BF16)

      @pl.when(wg == 0)
      def _gu():  # for g_u's transposed product, after the next sync
        gub_s[...] = gu
        plgpu.commit_smem()

      e1n = (-(e1() * coef())).astype(BF16)
      g_h = accumulate(load(ghk_g.at[j, head, :, cols]), (e1n, g1b_s.at[wg]), (gu, w1b_s.at[wg]))
      zraw, z, praw, ge2 = tile_terms()
      slope = pallas_triton.kernel_gelu_grad(z)
      gz = s1 * ge2 * praw * gelu_grad2(z) + g_h * slope
      rows_s.at[wg, 1][...] = jnp.sum(gz * zraw, axis=1)
      gz_bf16 = gz.astype(BF16)
      gkz_g.at[j, head, wg][...] = s2 * product((c, d), (gz_bf16, w2b_s.at[wg]))
      b = decay_g[j, head, 0]
      g1 = (b * load(out1_g.at[head, :, cols]) + load(gs1_g.at[j, head, :, cols]).astype(jnp.float32)
            + s1 * product((d, TILE), (e1b_s.T, gs_s.at[wg])))
      gs_s.at[wg][...] = gz_bf16  # ĝ ⊙ gelu'(z) is read: its buffer takes g_z for W2's product
      plgpu.commit_smem()
      g2 = (b * load(out2_g.at[head, cols]) + load(gs2_g.at[j, head, cols]).astype(jnp.float32)
            + s2 * product((TILE, d), (gs_s.at[wg].T, kb_s)))
      _sync(synced.at[3])
      g1 = g1 + product((d, TILE), (gub_s.T, h_s.at[wg]))
      if ret.scaled:  # the read scales' share at this chunk's start state, its tile read again (L2), not held
        w2, w1 = start_tiles(j)
        # Σ ĝ ⊙ praw ⊙ gelu'(z), Σ g_z ⊙ zraw, Σ g_u ⊙ u
        b1_sums, z_sums, u_sums = _scalar_sums(rows_s, range(tiles), 3)
        share2, share1 = scales_share(ret, (t2, t1), (z_sums + g_read2, b1_sums + u_sums / s1 + g_read1), w2, w1)
        g2, g1 = g2 + share2, g1 + share1
      publish(g2, g1)

      @pl.when(j > 0)
      def _next():
        row_operands(j - 1)

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_type = (f32(heads, e, d), f32(heads, d, e), f32(n, heads, c, d), f32(n, heads, c, d), f32(n, heads, c, d),
              f32(n, heads, tiles, c, d), f32(n, heads, tiles, c, d), f32(n, heads, tiles, 2, TILE),
              f32(heads, 2, c, d), f32(heads, c, d))
  operand = wg_ops.operand
  scratch = [operand(tiles, TILE, d), operand(tiles, d, TILE), operand(tiles, TILE, d), operand(tiles, d, TILE),
             operand(tiles, c, TILE), operand(tiles, c, TILE), operand(c, d), operand(c, d), operand(c, d),
             plgpu.SMEM((tiles, 3, TILE), jnp.float32), plgpu.SMEM((2, tiles, 1, c), jnp.float32),
             plgpu.Barrier(num_arrivals=tiles, num_barriers=4), plgpu.Barrier(num_arrivals=tiles, num_barriers=1)]
  kernel = per_head_kernel(body, out_type, scratch, heads, tiles, interpret)
  g2, g1, gk, gv, gcoef, gkc, gkz, gdec, gln, _ = kernel(
      k, v, u, keys.e1, end_decay, end_coef.reshape(n, heads, c), jnp.concatenate(ln, axis=1), starts["w2"],
      starts["w1"], scalars, g_keys.e1, g_keys.e2, g_keys.hk, g_starts["w2"], g_starts["w1"], g_end["w2"],
      g_end["w1"])
  g_ln = jnp.sum(gln, axis=2)  # [N, 2, d]
  factors = {"k": gk + jnp.sum(gkz, axis=2), "v": gv, "coef": gcoef, "kc": jnp.sum(gkc, axis=2),
             "decay": jnp.sum(gdec, axis=(2, 4))}
  return {"w2": g2, "w1": g1}, (g_ln[:, None, 0], g_ln[:, None, 1]), factors
