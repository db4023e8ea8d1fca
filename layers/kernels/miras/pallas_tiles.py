"""Miras MLP memories: the keys' recurrence as Pallas (Triton) kernels whose programs each own one tile of one head.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4) in the split form of :mod:`flat` (``xla_split``):
the only sequential work of a chunkwise MLP memory is its keys' recurrence S_{j+1} = f_j(S_j); the reads are taken
from the stacked start states all chunks at once. Both :mod:`flat`'s XLA scan (~30
kernels a chunk, each moving an [b·h, c, E] activation or a state-sized array through HBM) and
:mod:`pallas_triton`'s one-program-per-head loop (its ~100 µs a chunk are the latency of one program walking every
tile in turn) are slow where this module's scan keeps the chunk loop in XLA and makes each pass over the state ONE
kernel of grid [b·h, E / tile], a program per head and tile of the hidden axis E, so every [c, tile] activation is
made and used on chip and only [c, d] partial sums cross between tiles, through a row-wise kernel of one program
per head in between:

  * forward, per chunk: (F1) u_i = gelu(s₂ K W2_iᵀ) W1_iᵀ per tile i; (E) u = s₁ Σ_i u_i and the keys' errors e1
    row-wise (LayerNorm, bias gradient, LayerNorm backward); (F2) per tile the keys' second-layer errors
    e2 = s₁ (e1 W1) ⊙ gelu'(z), the closed tile W2' = B ⊙ W2 − e2ᵀ (K ⊙ η B/B_i), W1' = B ⊙ W1 −
    (e1 ⊙ η B/B_i)ᵀ h, and its read-scale terms (Moneta's Σ|w|^q); the chunk's ``flat.KeyPass`` (e1, e2, h) is
    what the reads need;
  * backward, per chunk in reverse, the pull-back of f_j at its start state S_j from the end state's cotangent G
    and the reads' cotangents of the ``KeyPass``: (B1) per tile G completed with the end state's read scales'
    share (Moneta; from the summed scale terms' cotangent the step of chunk j + 1 left, written back in place),
    e1's cotangent from the chunk end and from e2,
    Σ_i [(s₁ ĝ_e2 ⊙ gelu'(z)) W1_iᵀ − η B/B_i ⊙ (h G1_iᵀ)], and the shares of the chunk-end factors' cotangents
    (K ⊙ η B/B_i: −e2 G2; B: Σ G ⊙ W); (R) those shares summed and e1's cotangent pulled back row-wise to u's and
    to the keys', values', δ's and LayerNorm's; (B2) per tile the start state's cotangent, B ⊙ G + s₂ g_zᵀ K (W2)
    and B ⊙ G1 + e1ᵀ g_praw + s₁ g_uᵀ h (W1), plus the reads' own, and the keys' share s₂ g_z W2; XLA turns the
    scales' cotangents into that of their summed terms (for chunk j − 1's B1; the initial state's share is added
    after the scan). So every input's cotangent comes out of the scan, chunk by chunk, and nothing is recomputed
    after it.

Every array stacked over chunks ([n, b·h, ...]: the start states, e2 and h, the reads' cotangents, the chunk inputs)
is passed to the kernels whole, and a kernel indexes chunk j itself: handing it chunk j's slice made XLA copy the
slice into a fresh buffer, 21 copies a chunk and 16% of the profiled kernel time on an H100 in the first version
(docs/benchmarks.md). The kernels write the stacked states and activations, and the state's cotangent (one
[b·h, ...] buffer carried through the backward scan), in place (``input_output_aliases``). With per-head gates the
reads are kernels too (:mod:`pallas_reads`, a program per chunk and head). Covers what
:func:`pallas_triton.unsupported` accepts (either gate kind: the gates enter the recurrence only through B and
η B/B_i); GELU inside the kernels uses :func:`pallas_triton.erf`. Shapes and returns as :func:`chunked.miras_chunked`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.miras import flat, keys_chain, mosaic_chain, mosaic_keys, pallas_reads, pallas_triton
from layers.kernels.miras.keys_chain import scale_terms_share
from layers.kernels.miras.pallas_triton import (kernel_dot, kernel_gelu, kernel_gelu_grad, keys_errors, leading_block,
                                               pair_row, row_scalars)
from layers.miras.memory import gelu_grad2, plain_matmul
from layers.miras.spec import Gates, MemorySpec, along


KEYS_FORWARDS = ("triton", "mosaic")
KEYS_BACKWARDS = ("triton", "mosaic", "chain", "chain_mosaic")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Launch settings (static): ``hidden_tile`` columns of E per program, Triton's ``num_warps`` per program and
  ``num_stages`` (software pipelining of the loads), ``interpret`` (Pallas interpret mode: any backend), and
  ``keys_forward`` / ``keys_backward``: each direction of the keys' recurrence as this module's Triton kernels or
  as :mod:`mosaic_keys`' one Mosaic GPU kernel (bf16 matmuls, per-head gates; the Mosaic backward takes the
  residuals of either forward; its first form ran slower than the Triton backward on an H100: docs/benchmarks.md),
  and the backward also as :mod:`keys_chain`'s three passes (per-head gates, biases without δ), their chain an XLA
  scan (``chain``) or one Mosaic GPU kernel (``chain_mosaic``, :mod:`mosaic_chain`)."""

  hidden_tile: int = 64
  num_warps: int = 4
  num_stages: int = 1
  interpret: bool = False
  keys_forward: str = "triton"
  keys_backward: str = "triton"

  def __post_init__(self):
    for name, kernels in (("keys_forward", KEYS_FORWARDS), ("keys_backward", KEYS_BACKWARDS)):
      if getattr(self, name) not in kernels:
        raise ValueError(f"{name} must be one of {kernels}, got {getattr(self, name)!r}")

  @property
  def mosaic(self) -> bool:
    """Whether either direction of the keys' recurrence is a Mosaic GPU kernel."""
    return self.keys_forward == "mosaic" or self.keys_backward in ("mosaic", "chain_mosaic")

  def tile(self, hidden: int) -> int:
    return min(hidden, self.hidden_tile)

  def wide(self) -> Tiling:
    """The settings of the kernels whose live values spill at 4 warps, at 8: the row-wise kernels (one program per
    head holding several [c, d] arrays; R spills 1.5 KB a thread at 4, 8 B at 8, c = d = 64) and B1 (700 B a
    thread at 4, 172 at 8; H100, Moneta 8 × 4096: memory op 26.4 vs 27.5 ms fwd+bwd). B2 still spills at 8 and
    ran slower there (32.1 ms), so it keeps ``num_warps``."""
    return dataclasses.replace(self, num_warps=8)


def _block(x, head: int, tiled: int | None = None, tile: int = 0) -> pl.BlockSpec:
  """What a program (h, i) of grid [b·h, E / tile] sees of x: head h of axis ``head`` (squeezed), tile i of axis
  ``tiled`` (if any), every other axis whole (e.g. every chunk of a stacked input, indexed in the kernel)."""
  shape = tuple(None if a == head else (tile if a == tiled else n) for a, n in enumerate(x.shape))
  return pl.BlockSpec(shape, lambda h, i: tuple(h if a == head else (i if a == tiled else 0) for a in range(x.ndim)))


class _Blocks:
  """BlockSpec makers for one tile width: ``head`` [N, ...], ``stacked`` [n, N, ...] (every chunk of the head),
  ``w2`` / ``cols``: this tile of E on W2's row axis [.., E, d] or on the last axis [.., r, E] (W1, e2, h), of a
  head array or (``stack=True``) of a stacked one; ``per_tile`` [N, tiles, ...]."""

  def __init__(self, tile: int):
    self.tile = tile

  head = staticmethod(lambda x: _block(x, 0))
  stacked = staticmethod(lambda x: _block(x, 1))

  per_tile = staticmethod(leading_block)

  @staticmethod
  def per_tile_stacked(x):
    """Every chunk's slot of this head and tile of x [n, N, tiles, ...]."""
    return pl.BlockSpec((x.shape[0], None, None, *x.shape[3:]), lambda h, i: (0, h, i) + (0,) * (x.ndim - 3))

  def w2(self, x, stack: bool = False):
    return _block(x, int(stack), x.ndim - 2, self.tile)

  def cols(self, x, stack: bool = False):
    return _block(x, int(stack), x.ndim - 1, self.tile)

  def state(self, w2, w1, stack: bool = True) -> list:
    """(array, BlockSpec) of this tile of a state or cotangent (W2 [.., E, d], W1 [.., d, E]), stacked or not."""
    return [(w2, self.w2(w2, stack)), (w1, self.cols(w1, stack))]


def _chunk_index(j) -> tuple:
  """Chunk j as the kernels' ``j_ref`` (a [1] int32 input, the same for every program)."""
  return j[None], pl.BlockSpec((1,), lambda h, i: (0,))


def _call(kernel, tiling: Tiling, grid: tuple, inputs: list, outputs=(), updated=()):
  """``kernel`` on ``grid``; ``inputs`` are (array, BlockSpec) pairs, ``updated`` those of them (the same pair
  objects) that the kernel writes in place, and ``outputs`` (ShapeDtypeStruct, BlockSpec) pairs of new arrays.
  Returns the updated arrays, then the new ones."""
  where = [next(i for i, pair in enumerate(inputs) if pair is target) for target in updated]
  outputs = [(jax.ShapeDtypeStruct(a.shape, a.dtype), spec) for a, spec in updated] + list(outputs)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[spec for _, spec in inputs],
      out_specs=[spec for _, spec in outputs],
      out_shape=[o for o, _ in outputs],
      input_output_aliases={i: o for o, i in enumerate(where)},
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=tiling.interpret,
  )(*(x for x, _ in inputs))


def _keys_in(j, k_ref, scales, w2_ref, w1_ref, mode):
  """Chunk j's keys' forward on this tile of its start state (slot j of the stacked states): (dot, s₂, s₁, K,
  W2 tile, W1 tile, zraw = K W2ᵀ, z = s₂ zraw); ``scales`` the row (s₂, s₁)."""
  dot = kernel_dot(mode)
  s2, s1 = row_scalars(scales)
  k = k_ref[j]
  w2, w1 = (w_ref[j].astype(jnp.promote_types(w_ref.dtype, k.dtype)) for w_ref in (w2_ref, w1_ref))  # bf16 stacks
  zraw = dot("ci,ei->ce", k, w2)
  return dot, s2, s1, k, w2, w1, zraw, s2 * zraw


def _hidden_sum_kernel(j_ref, k_ref, scales_ref, w2_ref, w1_ref, u_ref, *, mode):
  """F1: this tile's share of chunk j's keys' u before s₁, gelu(s₂ K W2ᵀ) W1ᵀ [c, d]."""
  dot, _, _, _, _, w1, _, z = _keys_in(j_ref[0], k_ref, scales_ref[...], w2_ref, w1_ref, mode)
  u_ref[...] = dot("ce,de->cd", kernel_gelu(z), w1)


def _errors_kernel(j_ref, k_ref, v_ref, delta_ref, scales_ref, parts_ref, gamma_ref, beta_ref, e1_ref, u_ref, e1_out,
                   u_out, *, spec):
  """E: chunk j's u = s₁ Σ_tiles F1's shares [c, d] and the keys' errors e1 from it, row-wise (LayerNorm, bias
  gradient, LayerNorm backward), in one program per head, into slot j of the stacked e1 and u (aliased)."""
  del e1_ref, u_ref  # written only, through their aliased outputs
  j = j_ref[0]
  u = row_scalars(scales_ref[...])[1] * jnp.sum(parts_ref[...], axis=0)
  e1_out[j] = keys_errors(spec, u, k_ref[j], v_ref[j], delta_ref[j], (gamma_ref[...], beta_ref[...]))[0]
  u_out[j] = u


def _close_kernel(j_ref, k_ref, scales_ref, w2_ref, w1_ref, e1_ref, kc_ref, coef_ref, dec2_ref, dec1_ref, end2_ref,
                  end1_ref, e2_ref, h_ref, w2_out, w1_out, end2_out, end1_out, e2_out, h_out, terms_ref, *, mode, ret):
  """F2: chunk j's e2 [c, tile] and h [c, tile] into slot j of theirs, its closed tile (W2 [tile, d], W1 [d, tile])
  into slot j + 1 of the states (the end state's for the last chunk) and the closed tile's scale terms. The outputs
  but the terms alias the stacked inputs (updated in place)."""
  del end2_ref, end1_ref, e2_ref, h_ref  # written only, through their aliased outputs
  j = j_ref[0]
  dot, _, s1, _, w2, w1, _, z = _keys_in(j, k_ref, scales_ref[...], w2_ref, w1_ref, mode)
  h, e1 = kernel_gelu(z), e1_ref[j]
  e2 = s1 * dot("cd,de->ce", e1, w1) * kernel_gelu_grad(z)
  new2 = dec2_ref[j] * w2 - dot("ce,ci->ei", e2, kc_ref[j])
  new1 = dec1_ref[j] * w1 - dot("cd,ce->de", e1 * coef_ref[j], h)
  e2_out[j], h_out[j] = e2.astype(e2_out.dtype), h.astype(h_out.dtype)
  last = w2_ref.shape[0] - 1

  @pl.when(j < last)
  def _():
    w2_out[j + 1], w1_out[j + 1] = new2, new1

  @pl.when(j == last)
  def _():
    end2_out[...], end1_out[...] = new2, new1

  terms_ref[...] = pair_row(ret.scale_terms(new2), ret.scale_terms(new1), new2)


def _pullback_terms(dot, j, w1, z, e1, kc_ref, g2, ge2_ref):
  """What both backward kernels need of a tile: gelu'(z), e1 W1 (praw) and e2's cotangent ĝ_e2 = g_e2 − (K ⊙ c) G2ᵀ."""
  return kernel_gelu_grad(z), dot("cd,de->ce", e1, w1), ge2_ref[j] - dot("cd,ed->ce", kc_ref[j], g2)


def _errors_cotangent_kernel(j_ref, k_ref, scales_ref, w2_ref, w1_ref, e1_ref, kc_ref, g2_ref, g1_ref, ge2_ref,
                             pending_ref, *outputs, mode, ret):
  """B1: this tile's shares of chunk j's cotangents that need every tile summed before the row-wise pull-back: e1's
  through e2, s₁ (ĝ_e2 ⊙ gelu'(z)) W1ᵀ, and through the chunk end, −h G1ᵀ (before the coefficients c), [c, d]
  each; K ⊙ c's, −e2 G2 [c, d]; B_c's on each layer (Σ G ⊙ W, [1, d] and [d, 1]); and s₁'s. The end state's
  cotangent is ``g2_ref`` / ``g1_ref``; with read scales (``ret.scaled``) it first takes the end state's read scales'
  share, from their summed terms' cotangent (``pending_ref``, (W2's, W1's), which chunk j + 1's step left), and is
  written back in place (the first two ``outputs``)."""
  j = j_ref[0]
  dot, _, s1, _, w2, w1, _, z = _keys_in(j, k_ref, scales_ref[j], w2_ref, w1_ref, mode)
  g2, g1, e1 = g2_ref[...], g1_ref[...], e1_ref[j]
  if ret.scaled:
    g2_out, g1_out, *outputs = outputs
    end = jnp.minimum(j + 1, w2_ref.shape[0] - 1)  # chunk j + 1's start state (the last chunk has nothing pending)
    pending2, pending1 = row_scalars(pending_ref[...])
    g2 = g2 + scale_terms_share(ret, w2_ref[end], pending2)
    g1 = g1 + scale_terms_share(ret, w1_ref[end], pending1)
    g2_out[...], g1_out[...] = g2, g1
  via_e2_out, via_end_out, kc_out, dec2_out, dec1_out, sums_out = outputs
  slope, praw, ge2 = _pullback_terms(dot, j, w1, z, e1, kc_ref, g2, ge2_ref)
  via_e2_out[...] = s1 * dot("ce,de->cd", ge2 * slope, w1)
  via_end_out[...] = -dot("ce,de->cd", kernel_gelu(z), g1)
  kc_out[...] = -dot("ce,ed->cd", s1 * praw * slope, g2)
  dec2_out[...] = jnp.sum(g2 * w2, axis=0, keepdims=True)
  dec1_out[...] = jnp.sum(g1 * w1, axis=1, keepdims=True)
  sums_out[...] = pair_row(0.0, jnp.sum(ge2 * praw * slope), g2)


def _errors_pullback_kernel(j_ref, k_ref, v_ref, delta_ref, scales_ref, u_ref, e1_ref, coef_ref, ge1_ref, gamma_ref,
                            beta_ref, via_e2_ref, via_end_ref, kc_ref, dec2_ref, dec1_ref, sums_ref, *refs, spec):
  """R: B1's per-tile shares summed, and the row-wise pull-back through the keys' errors e1(u, K, V, δ, LayerNorm)
  from e1's cotangent (the reads' own, plus through e2 and the chunk end), in one program per head: into slot j of
  the stacked cotangents of K, V, δ, c (= e1 ⊙ via the end), K ⊙ c and B_c (aliased), added to the LayerNorm's
  (γ, β) [2, d] (aliased), and s₁ times u's cotangent [c, d] for B2 and s₁'s share Σ ĝ_u ⊙ u / s₁ + B1's."""
  g_ln_ref = refs[7]  # the other seven inputs of refs are written only, through their aliased outputs
  gk_out, gv_out, gdelta_out, gcoef_out, gkc_out, gdec2_out, gdec1_out, gln_out, gu_out, gs1_out = refs[8:]
  j = j_ref[0]
  s1 = row_scalars(scales_ref[j])[1]
  u, coef, via_end = u_ref[j], coef_ref[j], jnp.sum(via_end_ref[...], axis=0)
  errors = lambda u, k, v, delta, gamma, beta: keys_errors(spec, u, k, v, delta, (gamma, beta))[0]
  _, pullback = jax.vjp(errors, u, k_ref[j], v_ref[j], delta_ref[j], gamma_ref[...], beta_ref[...])
  g_u, g_k, g_v, g_delta, g_gamma, g_beta = pullback(ge1_ref[j] + jnp.sum(via_e2_ref[...], axis=0) + coef * via_end)
  gk_out[j], gv_out[j], gdelta_out[j] = g_k, g_v, g_delta.astype(gdelta_out.dtype)
  gcoef_out[j], gkc_out[j] = e1_ref[j] * via_end, jnp.sum(kc_ref[...], axis=0)
  gdec2_out[j], gdec1_out[j] = jnp.sum(dec2_ref[...], axis=0), jnp.sum(dec1_ref[...], axis=0)
  gln_out[...] = g_ln_ref[...] + jnp.where(jnp.arange(2)[:, None] == 0, g_gamma, g_beta)
  gu_out[...] = s1 * g_u
  gs1_out[...] = pair_row(0.0, row_scalars(jnp.sum(sums_ref[...], axis=0))[1] + jnp.sum(g_u * u) / s1, gu_out)


def _state_cotangent_kernel(j_ref, k_ref, scales_ref, w2_ref, w1_ref, e1_ref, kc_ref, coef_ref, dec2_ref, dec1_ref,
                            g2_ref, g1_ref, ge2_ref, gh_ref, gu_ref, gs2_ref, gs1_ref, kz_ref, g2_out, g1_out, kz_out,
                            sums_out, *, mode):
  """B2: this tile of chunk j's start-state cotangent (W2 [tile, d], W1 [d, tile]) with the reads' own (gs) added,
  in place of the end state's (aliased), its share of K's cotangent through z = s₂ K W2ᵀ [c, d] into slot j of the
  stacked per-tile shares (aliased) and its share of s₂'s; ``gu_ref``: s₁ times u's cotangent [c, d]."""
  del kz_ref  # written only, through its aliased output
  j = j_ref[0]
  dot, s2, s1, k, w2, w1, zraw, z = _keys_in(j, k_ref, scales_ref[j], w2_ref, w1_ref, mode)
  g2, g1, e1, gu = g2_ref[...], g1_ref[...], e1_ref[j], gu_ref[...]
  slope, praw, ge2 = _pullback_terms(dot, j, w1, z, e1, kc_ref, g2, ge2_ref)
  h = kernel_gelu(z)
  gh = gh_ref[j] - dot("cd,de->ce", e1 * coef_ref[j], g1) + dot("cd,de->ce", gu, w1)
  gz = s1 * ge2 * praw * gelu_grad2(z) + gh * slope
  g2_out[...] = dec2_ref[j] * g2 + s2 * dot("ce,ci->ei", gz, k) + gs2_ref[j]
  kz_out[j] = s2 * dot("ce,ei->ci", gz, w2)
  g1_out[...] = dec1_ref[j] * g1 + s1 * dot("cd,ce->de", e1, ge2 * slope) + dot("cd,ce->de", gu, h) + gs1_ref[j]
  sums_out[...] = pair_row(jnp.sum(gz * zraw), 0.0, g2)


class _Factors(NamedTuple):
  """What the kernels take of a chunk's inputs besides the state, for every head ([..., N, ...], all chunks at once
  before a scan): keys K, values, δ; the chunk-end coefficients c = η_i B_c / B_i broadcast to [.., c, d], K ⊙ c,
  e1's factor, and B_c along W2's input axis [.., 1, d] and W1's output axis [.., d, 1]."""

  k: jax.Array
  v: jax.Array
  delta: jax.Array
  coef: jax.Array
  kc: jax.Array
  dec2: jax.Array
  dec1: jax.Array

  @classmethod
  def of(cls, xs) -> _Factors:
    k, v, delta, end_decay, end_coef, _ = xs
    d = k.shape[-1]
    coef = jnp.broadcast_to(end_coef, k.shape)
    lead = k.shape[:-2]
    return cls(k, v, delta, coef, k * coef, jnp.broadcast_to(along(end_decay, "in"), (*lead, 1, d)),
               jnp.broadcast_to(along(end_decay, "out"), (*lead, d, 1)))


def _grid(state2, tiling: Tiling) -> tuple:
  """(grid [b·h, E / tile], ``_Blocks``, a ShapeDtypeStruct maker) for stacked W2 states [n, N, E, d]."""
  big, e = state2.shape[1:3]
  tile = tiling.tile(e)
  dtype = jnp.promote_types(state2.dtype, jnp.float32)  # the Mosaic forward stacks the states in bf16
  return (big, e // tile), _Blocks(tile), lambda *shape: jax.ShapeDtypeStruct(shape, dtype)


def _forward_step(spec: MemorySpec, tiling: Tiling, ln, x: _Factors, carry, j):
  """Chunk j of the keys' recurrence on every head. ``carry``: the stacked states (W2 [n, N, E, d], W1 [n, N, d, E];
  slot j holds chunk j's start state, the kernels write slot j + 1), the end state (W2, W1), the stacked e2 and h
  [n, N, c, E] of the ``KeyPass``es, the stacked e1 and u [n, N, c, d], and the start state's scales (s₂, s₁) and
  summed scale terms (t₂, t₁), [N, 2] each; all but the last two are updated in place. Returns the carry and (the
  scales, the terms) of chunk j."""
  *buffers, e1s, us, scales, totals = carry
  mode, ret = spec.memory.matmul, spec.retention
  grid, blocks, like = _grid(buffers[0], tiling)
  (big, tiles), (c, d) = grid, x.k.shape[-2:]
  states = blocks.state(*buffers[:2])
  base = [_chunk_index(j), (x.k, blocks.stacked(x.k)), (scales, blocks.head(scales)), *states]
  parts = like(big, tiles, c, d)
  (parts,) = _call(functools.partial(_hidden_sum_kernel, mode=mode), tiling, grid, base,
                   [(parts, blocks.per_tile(parts))])
  stacked = [(a, blocks.stacked(a)) for a in (e1s, us)]
  e1s, us = _call(functools.partial(_errors_kernel, spec=spec), tiling.wide(), (big, 1),
                  [base[0]] + [(a, blocks.stacked(a)) for a in (x.k, x.v, x.delta)]
                  + [(a, blocks.head(a)) for a in (scales, parts, *ln)] + stacked, updated=stacked)
  written = blocks.state(*buffers[2:4], stack=False) + [(b, blocks.cols(b, True)) for b in buffers[4:]]
  terms = like(big, tiles, 2)
  *buffers, terms = _call(
      functools.partial(_close_kernel, mode=mode, ret=ret), tiling, grid,
      base + [(a, blocks.stacked(a)) for a in (e1s, x.kc, x.coef, x.dec2, x.dec1)] + written,
      [(terms, blocks.per_tile(terms))], updated=states + written)
  new_totals = jnp.sum(terms, axis=1)
  return (*buffers, e1s, us, ret.scale_from(new_totals), new_totals), (scales, totals)


def _pullback_step(spec: MemorySpec, tiling: Tiling, stacks, carry, inputs) -> tuple:
  """Chunk j's pull-back: from its end state's cotangent (W2 [N, E, d], W1 [N, d, E]) to its start state's (in
  place), with the reads' cotangents of the start state (``g_starts``) and of the ``KeyPass`` (``g_key``: e1, e2, h,
  and the scales' in ``inputs`` with the summed scale terms). ``carry``: the state's cotangent, the ``_Factors``'
  cotangents and K's per-tile shares through z (stacked over chunks; the kernels write slot j in place), the
  LayerNorm parameters' summed cotangent [N, 2, d] and the cotangent of the end state's summed scale terms [N, 2],
  whose share B1 adds to the state's cotangent (the start state's is left to chunk j − 1's B1, or to the caller).
  ``stacks``: (``_Factors``, start states, e1, u, scales [n, N, 2], g_starts, g_key) of every chunk, each stacked
  over chunks."""
  (x, starts, e1s, us, scales, g_starts, g_key), ln = stacks
  g_state, g_x, g_kz, g_ln, pending = carry
  j, totals, g_scale2, g_scale1 = inputs
  mode, ret = spec.memory.matmul, spec.retention
  grid, blocks, like = _grid(starts["w2"], tiling)
  (big, tiles), (c, d) = grid, x.k.shape[-2:]
  st = lambda a: (a, blocks.stacked(a))
  base = [_chunk_index(j), st(x.k), st(scales), *blocks.state(starts["w2"], starts["w1"]), st(e1s), st(x.kc)]
  ends = [*blocks.state(*g_state, stack=False), (g_key.e2, blocks.cols(g_key.e2, True))]
  per_tile = lambda *shape: (like(big, tiles, *shape), blocks.per_tile(like(big, tiles, *shape)))
  updated = ends[:2] if ret.scaled else []
  outputs = _call(functools.partial(_errors_cotangent_kernel, mode=mode, ret=ret), tiling.wide(), grid,
                  base + ends + [(pending, blocks.head(pending))],
                  [per_tile(c, d)] * 3 + [per_tile(1, d), per_tile(d, 1), per_tile(2)], updated=updated)
  shares = outputs[len(updated):]
  if ret.scaled:  # B1 has added the end state's scales' share to its cotangent
    ends = [*blocks.state(*outputs[:2], stack=False), ends[2]]
  grads = [st(a) for a in g_x] + [(g_ln, blocks.head(g_ln))]
  inputs = ([base[0]] + [st(a) for a in (x.k, x.v, x.delta, scales, us, e1s, x.coef, g_key.e1)]
            + [(a, blocks.head(a)) for a in (*ln, *shares)] + grads)
  *g_x, g_ln, gu, g_s1 = _call(
      functools.partial(_errors_pullback_kernel, spec=spec), tiling.wide(), (big, 1), inputs,
      [(like(big, c, d), blocks.head(like(big, c, d))), (like(big, 2), blocks.head(like(big, 2)))], updated=grads)
  kz = [(g_kz, blocks.per_tile_stacked(g_kz))]
  inputs = (base + [st(x.coef), st(x.dec2), st(x.dec1)] + ends + [(g_key.hk, blocks.cols(g_key.hk, True)),
                                                                  (gu, blocks.head(gu))]
            + blocks.state(g_starts["w2"], g_starts["w1"]) + kz)
  *g_state, g_kz, sums2 = _call(functools.partial(_state_cotangent_kernel, mode=mode), tiling, grid, inputs,
                                [per_tile(2)], updated=ends[:2] + kz)
  if ret.scaled:  # the read scales' share, ∂(s₂, s₁)/∂S_j, through s = scale_from(t) at the forward's summed terms
    g_s = jnp.stack([jnp.sum(sums2[..., 0], axis=1) + g_scale2, g_s1[:, 1] + g_scale1], axis=-1)
    pending = jax.vjp(ret.scale_from, totals)[1](g_s)[0]  # t = Σ scale_terms(S_j): added by chunk j − 1's B1
  return (tuple(g_state), _Factors(*g_x), g_kz, g_ln, pending), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(spec: MemorySpec, tiling: Tiling, state: dict, ln, xs):
  return _recurrence_fwd(spec, tiling, state, ln, xs)[0]


def _triton_keys_forward(spec, tiling, state, ln, xs):
  """The keys' forward as this module's kernels, three a chunk in a scan; returns as
  :func:`mosaic_keys.keys_forward`."""
  x = _Factors.of(xs)
  n, (big, c, d), e = x.k.shape[0], x.k.shape[1:], state["w2"].shape[1]
  ret = spec.retention
  totals = jnp.stack([jax.vmap(ret.scale_terms)(state[name]) for name in ("w2", "w1")], axis=-1)  # [N, 2]
  stack = lambda w: jnp.zeros((n, *w.shape), w.dtype).at[0].set(w)
  # e2 and h enter every later product only as matmul operands, so with bf16 operands they are stored in bf16
  acts = jnp.zeros((n, big, c, e), jnp.bfloat16 if spec.memory.matmul == "bfloat16" else x.k.dtype)
  rows = jnp.zeros(x.k.shape, x.k.dtype)
  carry = (stack(state["w2"]), stack(state["w1"]), state["w2"], state["w1"], acts, acts, rows, rows,
           ret.scale_from(totals), totals)
  (starts2, starts1, end2, end1, e2, h, e1, u, _, _), (scales, totals) = jax.lax.scan(
      functools.partial(_forward_step, spec, tiling, ln, x), carry, jnp.arange(n))
  z = scales[..., 0, None, None] * plain_matmul("nhcd,nhed->nhce", x.k, starts2, mode=spec.memory.matmul)
  return starts2, starts1, (end2, end1), e2, h, e1, u, scales, totals, z.astype(acts.dtype)


def _recurrence_fwd(spec, tiling, state, ln, xs):
  if tiling.keys_forward == "mosaic":
    keys_forward = functools.partial(mosaic_keys.keys_forward, interpret=tiling.interpret)
  else:
    keys_forward = functools.partial(_triton_keys_forward, tiling=tiling)
  starts2, starts1, (end2, end1), e2, h, e1, u, scales, totals, z = keys_forward(spec, state=state, ln=ln, xs=xs)
  starts = {"w2": starts2, "w1": starts1}
  keys = flat.KeyPass({"w2": scales[..., 0, None, None], "w1": scales[..., 1, None, None]}, e1, e2, h)
  return ({"w2": end2, "w1": end1}, (starts, keys)), (ln, xs, starts, keys, u, scales, totals, z)


def _per_head_keys_backward(spec, tiling, residuals, cotangents):
  """:func:`mosaic_keys.keys_backward`, :func:`keys_chain.keys_backward` or :func:`mosaic_chain.keys_backward`
  (per-head gates), its cotangents of the chunk inputs put back through ``_Factors.of``."""
  x, factors_vjp = jax.vjp(_Factors.of, residuals[1])
  backward = {"mosaic": functools.partial(mosaic_keys.keys_backward, interpret=tiling.interpret),
              "chain": keys_chain.keys_backward,
              "chain_mosaic": functools.partial(mosaic_chain.keys_backward, interpret=tiling.interpret)}
  g_state, g_ln, g = backward[tiling.keys_backward](spec, residuals, cotangents)
  # per-head gates: B_c broadcast over each layer's gated axis, so only its cotangent's sum matters
  spread = lambda i, like: jnp.broadcast_to(g["decay"][..., i, None, None] / (like.shape[-2] * like.shape[-1]),
                                            like.shape)
  g_x = _Factors(k=g["k"], v=g["v"], delta=jnp.zeros_like(x.delta), coef=g["coef"], kc=g["kc"],
                 dec2=spread(0, x.dec2), dec1=spread(1, x.dec1))
  # in the chunks' dtype (bf16 K and V with ``miras_flat``'s keep_dtype: XLA rounds them where it forms them)
  return g_state, g_ln, factors_vjp(jax.tree.map(lambda g, like: g.astype(like.dtype), g_x, x))[0]


def _recurrence_bwd(spec, tiling, residuals, cotangents):
  if tiling.keys_backward != "triton":
    return _per_head_keys_backward(spec, tiling, residuals, cotangents)
  ln, xs, starts, keys, u, scales, totals, _ = residuals
  g_end, (g_starts, g_keys) = cotangents
  n = u.shape[0]
  x, factors_vjp = jax.vjp(_Factors.of, xs)
  (big, tiles), _, _ = _grid(starts["w2"], tiling)
  c, d = x.k.shape[2:]
  # the chunks' kernels write their cotangents into slot j of these in place, and add the LayerNorm's
  carry = ((g_end["w2"], g_end["w1"]), jax.tree.map(jnp.zeros_like, x), jnp.zeros((n, big, tiles, c, d), x.k.dtype),
           jnp.zeros((big, 2, d), ln[0].dtype), jnp.zeros((big, 2), totals.dtype))
  stacks = (x, starts, keys.e1, u, scales, g_starts, g_keys), ln
  (g_state, g_x, g_kz, g_ln, pending), _ = jax.lax.scan(
      functools.partial(_pullback_step, spec, tiling, stacks), carry,
      (jnp.arange(n), totals, g_keys.scale["w2"][:, :, 0, 0], g_keys.scale["w1"][:, :, 0, 0]), reverse=True)
  g_x = g_x._replace(k=g_x.k + jnp.sum(g_kz, axis=2))  # K's share through z, summed over the tiles
  g_state = dict(zip(("w2", "w1"), g_state, strict=True))
  if spec.retention.scaled:  # the initial state's read scales' share, which no B1 took
    share = jax.vmap(functools.partial(scale_terms_share, spec.retention))
    g_state = {name: g + share(starts[name][0], pending[:, i]) for i, (name, g) in enumerate(g_state.items())}
  return g_state, (g_ln[:, None, 0], g_ln[:, None, 1]), factors_vjp(g_x)[0]


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


@dataclasses.dataclass(frozen=True)
class KeyScan:
  """``flat.miras_flat``'s ``key_scan``: (spec, state, ln, xs) -> (closed state, (start states, ``KeyPass``es))
  with this module's kernels, forward and backward."""

  tiling: Tiling = Tiling()

  def __call__(self, spec: MemorySpec, state: dict, ln, xs):
    return _recurrence(spec, self.tiling, state, ln, xs)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "remat", "matmul", "tiling"))
def miras_tiles(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None, ln=None,
                chunk_size: int = 64, lengths=None, remat: bool = True, matmul: str = "float32",
                tiling: Tiling = Tiling()):
  """The chunked Miras memory (arguments and returns as :func:`chunked.miras_chunked`; ``initial_momentum`` must be
  None) as ``flat.miras_flat(split=True)`` with this module's keys' recurrence and, for per-head gates,
  :mod:`pallas_reads`' reads; ``remat`` applies to the reads XLA takes (channel gates)."""
  d = q.shape[-1]
  if (why := pallas_triton.unsupported(spec, chunk_size, d, pallas_triton.Tuning(hidden_tile=tiling.hidden_tile))):
    raise ValueError(f"the tiled Pallas Miras kernels cannot run this memory: {why}")
  if tiling.mosaic:
    if matmul != "bfloat16":
      raise ValueError("the Mosaic GPU keys' kernels run bfloat16 matmuls only (wgmma has no float32 products)")
    if (why := mosaic_keys.unsupported(spec, chunk_size, d, gates.eta.shape[-1] == 1)) is not None:
      raise ValueError(f"the Mosaic GPU keys' kernels cannot run this memory: {why}")
  if tiling.keys_backward.startswith("chain") and (gates.eta.shape[-1] != 1 or spec.bias.needs_delta):
    raise ValueError("the chain keys' backward covers per-head gates and biases without δ only")
  reads = None
  if gates.eta.shape[-1] == 1:  # per-head gates: the reads as kernels too
    reads = pallas_reads.ChunkReads(pallas_reads.ReadTiling(tiling.hidden_tile, tiling.num_warps, tiling.interpret))
  # the Mosaic keys' forward and a per-head keys' backward take bf16 chunks of K and V, as the reads do those of q
  # and K: the chunked copies and their cotangents stay in the inputs' dtype
  keep_dtype = reads is not None and tiling.keys_forward == "mosaic" and tiling.keys_backward != "triton"
  return flat.miras_flat(q, k, v, gates, spec=spec, initial_state=initial_state, initial_momentum=initial_momentum,
                         ln=ln, chunk_size=chunk_size, lengths=lengths, remat=remat, matmul=matmul, split=True,
                         key_scan=KeyScan(tiling), chunk_reads=reads, keep_dtype=keep_dtype)
