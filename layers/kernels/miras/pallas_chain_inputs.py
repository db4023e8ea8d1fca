"""Miras MLP memories: what :func:`keys_chain.chain_inputs` forms as ONE Pallas (Triton) kernel, a program per chunk
and head.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4). Before the keys' backward's chain, each chunk's rows
are linearised (:func:`keys_chain.row_terms`: the LayerNorm of u, the bias' gradient and its slope, row means) and
K and e1 scaled by the chunk-end coefficients c; in XLA, with the bf16 casts :mod:`mosaic_chain`'s kernel takes,
that is six memory-bound fusions over [n, N, c, d] arrays (0.75 ms on an H100 at n = 64 chunks, N = 128 heads,
c = d = 64, against 0.23 ms for the least traffic; this kernel took 0.28 ms in the Moneta layer's profile, the layer
15.11 → 14.41 ms, one H100, same call; ``benchmarks/miras_chain_passes.py`` times it against XLA's pass). Here program (j, h) of grid [n, N] loads chunk j of head h's
u, K, V, e1 [c, d] and c once and writes (:func:`keys_chain.chunk_terms`' returns):

  * the rows' :class:`keys_chain.RowTerms` (:func:`keys_chain.row_terms` itself, the bias' slope through
    ``jax.jvp``): n, a, ê and the curvature D [c, d] in bfloat16, the dtype the chain kernel takes them in (the
    outputs' kernel upcasts n), rstd and mean(n ⊙ a) [c] in float32;
  * −K ⊙ c and −e1 ⊙ c [c, d] in bfloat16, the chain kernel's operands.

Formed in float32 from float32 or bf16 K and V, rounded once. The rest of :class:`keys_chain.ChainInputs` is
passed on as :func:`keys_chain.chain_inputs` does. The chain's limits (biases without δ); c and d powers of two
≥ 16 (Triton blocks). Runs in Pallas interpret mode on any backend (the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.miras import keys_chain
from layers.kernels.miras.pallas_triton import leading_block
from layers.miras.spec import MemorySpec

F32, BF16 = jnp.float32, jnp.bfloat16


def _kernel(u_ref, k_ref, v_ref, e1_ref, coef_ref, gamma_ref, beta_ref, n_ref, a_ref, ehat_ref, curve_ref, rstd_ref,
            na_ref, nkc_ref, ne1c_ref, *, spec):
  """One chunk of one head (u, K, V, e1 [c, d], the coefficients c [c, 1], γ, β [1, d]): K ⊙ c, −e1 ⊙ c and the
  rows' :class:`keys_chain.RowTerms`, each stored once in its output's dtype. −K ⊙ c and −e1 ⊙ c are stored first
  and K read again (L1) for the row terms: 163 registers a thread at 4 warps, 100 at 8 and 62 at 16, against 214,
  100 and 64 with K held across and 218, 128 and 60 with the row terms stored first (ptxas for sm_90a, bf16 K and
  V, one or two stages, no spills)."""
  f32 = lambda ref: ref[...].astype(F32)
  coef = coef_ref[...]
  ne1c_ref[...] = (-f32(e1_ref) * coef).astype(ne1c_ref.dtype)
  nkc_ref[...] = (-f32(k_ref) * coef).astype(nkc_ref.dtype)
  terms = keys_chain.row_terms(spec, f32(u_ref), f32(k_ref), f32(v_ref), None, f32(gamma_ref), f32(beta_ref))
  for ref, x in zip((n_ref, a_ref, ehat_ref, curve_ref, rstd_ref, na_ref), terms, strict=True):
    ref[...] = x.astype(ref.dtype)


def chunk_terms(spec: MemorySpec, residuals, *, interpret: bool = False, num_warps: int = 8,
                num_stages: int = 1) -> tuple:
  """:func:`keys_chain.chunk_terms` as one kernel: the same arguments and returns (−K ⊙ c, −e1 ⊙ c [n, N, c, d] and
  the rows' terms), the [c, d] arrays in bfloat16. ``interpret``: Pallas interpret mode; ``num_warps``,
  ``num_stages``: Triton's launch settings."""
  if spec.bias.needs_delta:
    raise ValueError(f"the chain inputs' kernel covers biases without δ only, not {type(spec.bias).__name__}")
  (gamma, beta), xs, _, keys, u, *_ = residuals
  k, v, _, _, end_coef, _ = xs
  n, heads, c, d = k.shape
  for name, size in (("chunk size", c), ("head dim", d)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"the chain inputs' kernel needs a {name} that is a power of two >= 16, got {size}")
  per_head = pl.BlockSpec((None, 1, d), lambda j, h: (h, 0, 0))  # γ, β [N, 1, d]: every chunk reads its head's
  block, row = jax.ShapeDtypeStruct(k.shape, BF16), jax.ShapeDtypeStruct((n, heads, c), F32)
  out_shape = [block] * 4 + [row] * 2 + [block] * 2
  chunk = (u, k, v, keys.e1, end_coef)
  *rows, nkc, ne1c = pl.pallas_call(
      functools.partial(_kernel, spec=spec),
      grid=(n, heads),
      in_specs=[*map(leading_block, chunk), per_head, per_head],
      out_specs=list(map(leading_block, out_shape)),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(*chunk, gamma, beta)
  return nkc, ne1c, keys_chain.RowTerms(*rows)


def chain_inputs(spec: MemorySpec, residuals, cotangents, *, interpret: bool = False, num_warps: int = 8,
                 num_stages: int = 1) -> keys_chain.ChainInputs:
  """:func:`keys_chain.chain_inputs` with this kernel's :func:`chunk_terms`: the same arguments and returns, −K ⊙ c,
  −e1 ⊙ c and the rows' [c, d] terms in bfloat16 (the rest as there; the settings as :func:`chunk_terms`')."""
  return keys_chain.chain_inputs(spec, residuals, cotangents, terms=functools.partial(
      chunk_terms, interpret=interpret, num_warps=num_warps, num_stages=num_stages))
