"""Miras MLP memories: :func:`keys_chain.chain_outputs` as ONE Pallas (Triton) kernel, a program per chunk and head.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4). After the keys' backward's chain
(:func:`keys_chain.chain_scan` or :mod:`mosaic_chain`'s kernel), the chunk inputs' cotangents take no sequential
step: in XLA they are many memory-bound fusions over float32 [n, N, c, d] arrays and two batched [c, E] × [E, d]
products. Here program (j, h) of grid [n, N] loads chunk j of head h's blocks once and writes its outputs once
(n = 64 chunks, N = 128 heads, c = d = 64, E = 256, bf16 matmuls, one H100: 1.14–1.38 ms a call against XLA's
1.70–1.87 in the same runs, at 4 or 8 warps, one or two stages; outputs equal to 2e-7; the Moneta layer 15.67 →
15.07 ms; ``benchmarks/miras_chain_passes.py`` times it against XLA's pass):

  * the row step's vjp in K, V and the LayerNorm (:func:`keys_chain.row_inputs_pullback` itself, the bias'
    gradient through ``jax.vjp``) from e1's cotangent g_e1 [c, d] at the rows' n [c, d] and rstd [c];
  * K's share through z, s₂ g_z W2, and K ⊙ c's, −e2 G2 (g_z, e2 [c, E]; W2, the end state's cotangent G2
    [E, d]), each a loop over the hidden axis E in tiles of 64 columns into a [c, d] float32 accumulator;
  * the coefficients' e1 ⊙ (−h G1ᵀ).

γ̄ and β̄ come out per program as row sums [n, N, 1, d], summed over the chunks in XLA. Products in the memory's
matmul mode (:func:`pallas_triton.kernel_dot`). The chain's limits (per-head gates, biases without δ; only the bias
shows in the arguments); c, d and E powers of two ≥ 16 (Triton blocks). Runs in Pallas interpret mode on any
backend (the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.miras import keys_chain
from layers.kernels.miras.pallas_triton import kernel_dot, leading_block, row_scalars
from layers.miras.spec import MemorySpec

TILE = 64  # columns of E per step of the products' loops


def _product(dot, tile: int, a_ref, b_ref):
  """a b [c, d] float32 from refs a [c, E] and b [E, d], E walked in tiles of ``tile`` columns."""
  def body(i, acc):
    cols = pl.ds(pl.multiple_of(i * tile, tile), tile)
    return acc + dot("ce,ed->cd", a_ref[:, cols], b_ref[cols, :])

  zeros = jnp.zeros((a_ref.shape[0], b_ref.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, a_ref.shape[1] // tile, body, zeros)


def _kernel(n_ref, rstd_ref, k_ref, v_ref, gamma_ref, beta_ref, w_ref, e1_ref, via_end_ref, scales_ref, g_z_ref,
            w2_ref, e2_ref, g2_ref, g_k_ref, g_v_ref, coef_ref, kc_ref, g_gamma_ref, g_beta_ref, *, spec, tile):
  """One chunk of one head (rows n, K, V, g_e1, e1, −h G1ᵀ [c, d] and rstd [c], γ, β [1, d], the scales [2],
  g_z, e2 [c, E], W2, G2 [E, d]): K̄, V̄, the coefficients' and K ⊙ c's cotangents [c, d], and the row sums of γ̄
  and β̄ [1, d]. −e2 G2 is formed and stored first, then the row step, then s₂ g_z W2 with only K̄'s row share
  held across its loop: 168 registers a thread at 4 warps and one stage, 172 at two (the row step alone takes 167),
  against 187 and 192 with both products in one loop held across the row step (ptxas for sm_90a, no spills)."""
  dot = kernel_dot(spec.memory.matmul)
  coef_ref[...] = (e1_ref[...] * via_end_ref[...]).astype(coef_ref.dtype)
  kc_ref[...] = (-_product(dot, tile, e2_ref, g2_ref)).astype(kc_ref.dtype)
  f32 = lambda ref: ref[...].astype(jnp.float32)
  terms = keys_chain.RowTerms(n=f32(n_ref), a=None, ehat=None, curve=None, rstd=f32(rstd_ref), na=None)  # its reads
  g_k, g_v, g_gamma, g_beta = keys_chain.row_inputs_pullback(spec, terms, f32(k_ref), f32(v_ref), None,
                                                             f32(gamma_ref), f32(beta_ref), f32(w_ref))
  g_v_ref[...] = g_v.astype(g_v_ref.dtype)
  g_gamma_ref[...], g_beta_ref[...] = g_gamma, g_beta
  kz = _product(dot, tile, g_z_ref, w2_ref)
  s2, _ = row_scalars(scales_ref[...])
  g_k_ref[...] = (g_k + s2 * kz).astype(g_k_ref.dtype)


def chain_outputs(spec: MemorySpec, residuals, inputs: keys_chain.ChainInputs, outputs: keys_chain.ChainOutputs, *,
                  interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """:func:`keys_chain.chain_outputs` as one kernel: the same arguments and returns (the LayerNorm's (γ̄, β̄)
  [N, 1, d] each, the factors' {k, v, coef, kc [n, N, c, d], decay [n, N, 2]}), in the same dtypes. ``interpret``:
  Pallas interpret mode; ``num_warps``, ``num_stages``: Triton's launch settings."""
  if spec.bias.needs_delta:
    raise ValueError(f"the chain outputs' kernel covers biases without δ only, not {type(spec.bias).__name__}")
  (gamma, beta), (k, v, *_), *_ = residuals
  n, heads, c, d = k.shape
  e = inputs.w2.shape[2]
  for name, size in (("chunk size", c), ("head dim", d), ("hidden width", e)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"the chain outputs' kernel needs a {name} that is a power of two >= 16, got {size}")
  # the reference's output types (traced, not run), which the kernel's outputs take
  (g_gamma_type, g_beta_type), want = jax.eval_shape(functools.partial(keys_chain.chain_outputs, spec), residuals,
                                                     inputs, outputs)
  per_head = pl.BlockSpec((None, 1, d), lambda j, h: (h, 0, 0))  # γ, β [N, 1, d]: every chunk reads its head's
  row_sums = jax.ShapeDtypeStruct((n, heads, 1, d), jnp.float32)
  rows = (inputs.rows.n, inputs.rows.rstd, k, v)
  chunk = (outputs.g_e1, inputs.e1, outputs.via_end, inputs.scales, outputs.g_z, inputs.w2, inputs.e2, outputs.g2_end)
  g_k, g_v, coef, kc, g_gamma, g_beta = pl.pallas_call(
      functools.partial(_kernel, spec=spec, tile=min(TILE, e)),
      grid=(n, heads),
      in_specs=[*map(leading_block, rows), per_head, per_head, *map(leading_block, chunk)],
      out_specs=[leading_block(x) for x in (k, k, k, k, row_sums, row_sums)],
      out_shape=[want[name] for name in ("k", "v", "coef", "kc")] + [row_sums, row_sums],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(*rows, gamma, beta, *chunk)
  g_ln = (jnp.sum(g_gamma, axis=0).astype(g_gamma_type.dtype), jnp.sum(g_beta, axis=0).astype(g_beta_type.dtype))
  return g_ln, {"k": g_k, "v": g_v, "coef": coef, "kc": kc, "decay": outputs.g_decay}
