"""The sequential part of the chunked gated delta rule: the inter-chunk state recurrence and its backward.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464). For chunks c = 0..n−1 of one
head, with W_c, K̃_c = diag(e^{γ_C−γ}) K_c [C, K], U_c [C, V], d_c = e^{γ_C} and S_0 = initial state [K, V]:

    V_new,c = U_c − W_c S_c ;  S_{c+1} = d_c S_c + K̃_cᵀ V_new,c

Forward returns every S_c (the state entering chunk c), every V_new,c and S_n. Backward (custom VJP), given the
cotangents dS_c (of the stored states), dV_c (of V_new) and dS_n, runs the reverse recurrence

    D_c = dV_c + K̃_c Λ_{c+1} ;  Λ_c = d_c Λ_{c+1} − W_cᵀ D_c + dS_c,   Λ_n = dS_n

and then, batched over chunks: dU_c = D_c, dW_c = −D_c S_cᵀ, dK̃_c = V_new,c Λ_{c+1}ᵀ,
dd_c = ⟨S_c, Λ_{c+1}⟩, dS_0 = Λ_0. Only the two recurrences are sequential; their implementation is ``"xla"`` (``lax.scan``),
``"pallas_triton"`` (one GPU kernel per direction that keeps the state on chip across all chunks, see
:mod:`pallas_triton`) or ``"pallas_interpret"`` (those kernels in the Pallas interpreter, for CPU tests).

Shapes: w, kd [b, h, n, C, K] and u [b, h, n, C, V] in the matmul dtype; decay [b, h, n] float32;
s0 [b, h, K, V] float32. Returns states [b, h, n, K, V] and v_new [b, h, n, C, V] in the matmul dtype (they are
only ever matmul operands; bf16 halves their HBM traffic, as in flash-linear-attention) and the final state
[b, h, K, V] float32. The running state is always float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels.gated_delta.tuning import Tuning

SCAN_IMPLS = ("xla", "pallas_triton", "pallas_interpret")


def _dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _forward_xla(w, u, kd, decay, s0):
  dtype = w.dtype

  def step(s, xs):
    w_c, u_c, kd_c, d_c = xs
    v_new = u_c.astype(jnp.float32) - _dot("bhck,bhkv->bhcv", w_c, s, dtype)
    s_next = d_c[..., None, None] * s + _dot("bhck,bhcv->bhkv", kd_c, v_new, dtype)
    return s_next, (s.astype(dtype), v_new.astype(dtype))

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w, u, kd, decay))
  final, (states, v_new) = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(states, 0, 2), jnp.moveaxis(v_new, 0, 2), final


def _backward_xla(w, kd, decay, d_states, d_vnew, d_final):
  dtype = w.dtype

  def step(lam, xs):
    w_c, kd_c, d_c, ds_c, dv_c = xs
    dvt = dv_c + _dot("bhck,bhkv->bhcv", kd_c, lam, dtype)
    lam_prev = d_c[..., None, None] * lam - _dot("bhck,bhcv->bhkv", w_c, dvt, dtype) + ds_c
    return lam_prev, (dvt, lam)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w, kd, decay, d_states, d_vnew))
  ds0, (dvt, lam_next) = jax.lax.scan(step, d_final, xs, reverse=True)
  return jnp.moveaxis(dvt, 0, 2), jnp.moveaxis(lam_next, 0, 2), ds0


def _impls(impl: str, tuning: Tuning):
  if impl == "xla":
    return _forward_xla, _backward_xla
  if impl in ("pallas_triton", "pallas_interpret"):
    from layers.kernels.gated_delta import (
      pallas_triton,  # imported lazily: GPU-only module
    )
    interpret = impl == "pallas_interpret"  # the same kernels run by the Pallas interpreter (CPU tests)
    return (functools.partial(pallas_triton.forward, interpret=interpret, tuning=tuning),
            functools.partial(pallas_triton.backward, interpret=interpret, tuning=tuning))
  raise ValueError(f"scan implementation must be one of {SCAN_IMPLS}, got {impl!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _state_scan(w, u, kd, decay, s0, impl, tuning):
  return _impls(impl, tuning)[0](w, u, kd, decay, s0)


def _state_scan_fwd(w, u, kd, decay, s0, impl, tuning):
  states, v_new, final = _impls(impl, tuning)[0](w, u, kd, decay, s0)
  return (states, v_new, final), (w, u, kd, decay, states, v_new)


def _state_scan_bwd(impl, tuning, res, cotangents):
  w, u, kd, decay, states, v_new = res
  d_states, d_vnew, d_final = cotangents
  dvt, lam_next, ds0 = _impls(impl, tuning)[1](w, kd, decay, d_states, d_vnew, d_final)
  dw = -_dot("bhncv,bhnkv->bhnck", dvt, states, w.dtype)
  dkd = _dot("bhncv,bhnkv->bhnck", v_new, lam_next, w.dtype)
  ddecay = jnp.sum(states.astype(jnp.float32) * lam_next, axis=(-2, -1))
  return dw.astype(w.dtype), dvt.astype(u.dtype), dkd.astype(kd.dtype), ddecay, ds0


_state_scan.defvjp(_state_scan_fwd, _state_scan_bwd)


def state_scan(w: jax.Array, u: jax.Array, kd: jax.Array, decay: jax.Array, s0: jax.Array, *,
               impl: str = "xla", tuning: Tuning = Tuning()) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Run the inter-chunk recurrence (module docstring); differentiable in every argument. ``tuning`` sets the
  Pallas launches (pallas impls only)."""
  if impl not in SCAN_IMPLS:
    raise ValueError(f"scan implementation must be one of {SCAN_IMPLS}, got {impl!r}")
  return _state_scan(w, u, kd, decay, s0, impl, tuning)
