"""The WY/UT representation of one chunk of the gated delta rule, with an analytic backward (custom VJP).

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464); WY form of "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484). Per head and chunk of C rows,
with γ the chunk-local cumsum of the log-decay (float32) and Γ_rs = exp(γ_r − γ_s) (r > s, masked before exp):

    A = StrictLower(diag(β)(K Kᵀ ⊙ Γ)),  T = (I + A)⁻¹,  W = T diag(β e^γ) K,  U = T diag(β) V.

T comes from recursive doubling over diagonal blocks (:func:`triangular.unit_lower_inverse`): every intermediate is
a block of the true inverse, so it stays exact for strongly correlated keys, where the Neumann product ∏_j (I + N^{2^j}) would
cancel binomially large powers of N = −A (errors ~1e10 in float32 for identical keys). The backward uses
dT = dW (β e^γ K)ᵀ + dU (β V)ᵀ and dA = −Tᵀ dT Tᵀ (restricted to the strict lower triangle) instead of
differentiating through the inverse, and needs only T from the forward.

Shapes: k [b, h, n, C, K], v [b, h, n, C, V] (matmul dtype); beta, gamma [b, h, n, C] float32.
Returns w [b, h, n, C, K], u [b, h, n, C, V] in k's/v's dtype. Implementations: ``"xla"`` (batched einsums) and
``"pallas_triton"`` / ``"pallas_interpret"`` (one fused kernel per chunk and direction, :mod:`pallas_triton`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels.gated_delta.triangular import unit_lower_inverse
from layers.kernels.gated_delta.tuning import Tuning

WY_IMPLS = ("xla", "pallas_triton", "pallas_interpret")


def _masks(c: int) -> tuple[jax.Array, jax.Array]:
  rows = jnp.arange(c)
  return rows[:, None] > rows[None, :], rows[:, None] >= rows[None, :]


def decay_matrix(gamma: jax.Array, strict: bool = False) -> jax.Array:
  """Γ_rs = exp(γ_r − γ_s) on the (strict) lower triangle, 0 elsewhere; gamma [..., c] -> [..., c, c]."""
  mask = _masks(gamma.shape[-1])[0 if strict else 1]
  diff = jnp.where(mask, gamma[..., :, None] - gamma[..., None, :], 0.0)  # no positive exponent reaches exp
  return jnp.where(mask, jnp.exp(diff), 0.0)


def _dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _forward_xla(k, v, beta, gamma):
  """(w, u, T) by batched einsums."""
  dtype = k.dtype
  kk = _dot("...cd,...sd->...cs", k, k, dtype)
  tmat = unit_lower_inverse(beta[..., :, None] * kk * decay_matrix(gamma, strict=True))
  w = _dot("...cs,...sd->...cd", tmat, k * (beta * jnp.exp(gamma))[..., None], dtype)
  u = _dot("...cs,...sd->...cd", tmat, v * beta[..., None], v.dtype)
  return w.astype(k.dtype), u.astype(v.dtype), tmat


def _impl(impl: str):
  if impl == "xla":
    return _forward_xla
  if impl in ("pallas_triton", "pallas_interpret"):
    from layers.kernels.gated_delta import (
      pallas_triton,  # imported lazily: GPU-only module
    )
    return functools.partial(pallas_triton.wy_forward, interpret=impl == "pallas_interpret")
  raise ValueError(f"WY implementation must be one of {WY_IMPLS}, got {impl!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _wy(k, v, beta, gamma, impl, tuning):
  return _impl(impl)(k, v, beta, gamma)[:2]


def _wy_fwd(k, v, beta, gamma, impl, tuning):
  w, u, tmat = _impl(impl)(k, v, beta, gamma)
  return (w, u), (k, v, beta, gamma, tmat)


def _wy_bwd(impl, tuning, res, cotangents):
  if impl in ("pallas_triton", "pallas_interpret") and tuning.wy_backward_kernel:
    from layers.kernels.gated_delta import pallas_triton
    return pallas_triton.wy_backward(*res, *cotangents, interpret=impl == "pallas_interpret",
                                     num_warps=tuning.wy_backward_warps)
  return _backward_xla(*res, *cotangents)


def _backward_xla(k, v, beta, gamma, tmat, dw, du):
  """(dk, dv, dbeta, dgamma) by batched einsums (module docstring)."""
  dw, du = dw.astype(jnp.float32), du.astype(jnp.float32)
  dtype = k.dtype
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
  kscale = beta * jnp.exp(gamma)
  kb, vb = k32 * kscale[..., None], v32 * beta[..., None]
  dt = _dot("...cd,...sd->...cs", dw, kb, dtype) + _dot("...cd,...sd->...cs", du, vb, v.dtype)
  dkb = _dot("...sc,...sd->...cd", tmat, dw, dtype)
  dvb = _dot("...sc,...sd->...cd", tmat, du, v.dtype)
  strict = _masks(k.shape[-2])[0]
  da = -jnp.einsum("...sr,...st,...ut->...ru", tmat, dt, tmat)  # −Tᵀ dT Tᵀ
  da = jnp.where(strict, da, 0.0)
  kk = _dot("...cd,...sd->...cs", k, k, dtype)
  gam = decay_matrix(gamma, strict=True)
  dkk = da * beta[..., :, None] * gam
  dgam = da * beta[..., :, None] * kk * gam  # dA/dγ_r = +A_rs, dA/dγ_s = −A_rs
  dbeta = jnp.sum(da * kk * gam, axis=-1)
  dgamma = jnp.sum(dgam, axis=-1) - jnp.sum(dgam, axis=-2)
  dk = _dot("...cs,...sd->...cd", dkk + jnp.swapaxes(dkk, -1, -2), k, dtype) + dkb * kscale[..., None]
  kb_dot = jnp.sum(dkb * k32, axis=-1)
  dbeta = dbeta + kb_dot * jnp.exp(gamma) + jnp.sum(dvb * v32, axis=-1)
  dgamma = dgamma + kb_dot * kscale
  return dk.astype(k.dtype), (dvb * beta[..., None]).astype(v.dtype), dbeta, dgamma


_wy.defvjp(_wy_fwd, _wy_bwd)


def wy_representation(k: jax.Array, v: jax.Array, beta: jax.Array, gamma: jax.Array, *,
                      impl: str = "xla", tuning: Tuning = Tuning()) -> tuple[jax.Array, jax.Array]:
  """(W, U) of every chunk (module docstring); differentiable in all four inputs. ``tuning`` sets the Pallas
  backward's launch (pallas impls only)."""
  if impl not in WY_IMPLS:
    raise ValueError(f"WY implementation must be one of {WY_IMPLS}, got {impl!r}")
  return _wy(k, v, beta, gamma, impl, tuning)
