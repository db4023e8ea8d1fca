"""Pallas (Triton backend, GPU) kernels of the chunked gated delta rule: state recurrence and WY representation.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464). ``wy_forward`` computes one
chunk's A, T = (I + A)⁻¹, W and U (:mod:`wy`) in registers, one program per (head, chunk), so the C×C
intermediates never reach HBM. The recurrences are the ones documented in :mod:`state_scan`; here each runs as
ONE kernel launch per direction with grid
[b·h, V / block_v]: a program owns one head's [K, block_v] slice of the state, keeps it in registers and walks all
n chunks in a ``fori_loop`` (value columns are independent in both directions, so the V split needs no
reduction). This removes the per-chunk launch and loop overhead of ``lax.scan``, which dominates at long T.

Shapes as in :mod:`state_scan`. K, C and block_v must be powers of two ≥ 16 (Triton tiles). The kernels also run
in Pallas interpret mode (``interpret=True``) on CPU, which is how the tests check them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.gated_delta.triangular import unit_lower_inverse
from layers.kernels.gated_delta.tuning import Tuning


def _is_pow2_at_least_16(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


def check_shapes(chunk: int, key_dim: int, value_dim: int) -> None:
  """Raise a ValueError naming the offending size unless the kernels support these tile sizes."""
  for name, n in (("chunk_size", chunk), ("key dim K", key_dim), ("value dim V", value_dim)):
    if not _is_pow2_at_least_16(n):
      raise ValueError(f"pallas_triton gated delta rule needs {name} a power of two >= 16, got {n}")


def _block_v(bh: int, value_dim: int) -> int:
  # Narrow value tiles give more programs when b·h alone cannot fill the GPU's ~132 SMs.
  return min(value_dim, 64 if bh * value_dim // 64 >= 132 else 32)


def _fwd_kernel(w_ref, u_ref, kd_ref, decay_ref, s0_ref, states_ref, vnew_ref, final_ref, *, n, c, dk):
  def body(i, s):
    rows, krows = pl.ds(pl.multiple_of(i * c, c), c), pl.ds(pl.multiple_of(i * dk, dk), dk)
    w_c = w_ref[rows, :]
    s_lo = s.astype(w_c.dtype)
    states_ref[krows, :] = s_lo
    v_new = (u_ref[rows, :].astype(jnp.float32) - plgpu.dot(w_c, s_lo)).astype(w_c.dtype)
    vnew_ref[rows, :] = v_new
    return decay_ref[krows][:, None] * s + plgpu.dot(kd_ref[rows, :], v_new, trans_a=True)

  final_ref[...] = jax.lax.fori_loop(0, n, body, s0_ref[...])


def _bwd_kernel(w_ref, kd_ref, decay_ref, dstates_ref, dvnew_ref, dfinal_ref, dvt_ref, lam_ref, ds0_ref, *,
                n, c, dk):
  def body(j, lam):
    i = n - 1 - j
    rows, krows = pl.ds(pl.multiple_of(i * c, c), c), pl.ds(pl.multiple_of(i * dk, dk), dk)
    kd_c = kd_ref[rows, :]
    lam_ref[krows, :] = lam
    dvt = dvnew_ref[rows, :] + plgpu.dot(kd_c, lam.astype(kd_c.dtype))
    dvt_ref[rows, :] = dvt
    w_c = w_ref[rows, :]
    return (decay_ref[krows][:, None] * lam - plgpu.dot(w_c, dvt.astype(w_c.dtype), trans_a=True)
            + dstates_ref[krows, :].astype(jnp.float32))

  ds0_ref[...] = jax.lax.fori_loop(0, n, body, dfinal_ref[...])


def _flat(x: jax.Array) -> jax.Array:
  """[b, h, n, r, d] -> [b·h, n·r, d]."""
  b, h, n, r, d = x.shape
  return x.reshape(b * h, n * r, d)


def _launch(kernel, inputs, v_tiled, out_shapes, *, bh, dv, block_v, num_warps, num_stages, interpret):
  """Grid [bh, dv / block_v]. Inputs flagged in ``v_tiled`` and all outputs are [bh, rows, dv] and get their
  last axis tiled by block_v; the other inputs are passed whole per head."""
  def spec(shape, tiled):
    if tiled:
      return pl.BlockSpec((None, shape[1], block_v), lambda i, j: (i, 0, j))
    return pl.BlockSpec((None, *shape[1:]), lambda i, j: (i,) + (0,) * (len(shape) - 1))

  return pl.pallas_call(
      kernel,
      grid=(bh, dv // block_v),
      in_specs=[spec(x.shape, tiled) for x, tiled in zip(inputs, v_tiled, strict=True)],
      out_specs=[spec(s.shape, True) for s in out_shapes],
      out_shape=out_shapes,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(*inputs)


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def forward(w, u, kd, decay, s0, *, interpret: bool = False, tuning: Tuning = Tuning()):
  """states, v_new, final of the inter-chunk recurrence (see :mod:`state_scan`), launched with ``tuning``."""
  b, h, n, c, dk = w.shape
  dv = u.shape[-1]
  check_shapes(c, dk, dv)
  bh, block_v = b * h, _block_v(b * h, dv)
  decay_rows = jnp.broadcast_to(decay[..., None], (b, h, n, dk)).reshape(bh, n * dk)
  out_shapes = (jax.ShapeDtypeStruct((bh, n * dk, dv), w.dtype), jax.ShapeDtypeStruct((bh, n * c, dv), w.dtype),
                jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32))
  states, v_new, final = _launch(
      functools.partial(_fwd_kernel, n=n, c=c, dk=dk),
      (_flat(w), _flat(u), _flat(kd), decay_rows, s0.reshape(bh, dk, dv)),
      (False, True, False, False, True), out_shapes,
      bh=bh, dv=dv, block_v=block_v, num_warps=4, num_stages=tuning.scan_forward_stages,
      interpret=interpret)
  return (states.reshape(b, h, n, dk, dv), v_new.reshape(b, h, n, c, dv), final.reshape(b, h, dk, dv))


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def backward(w, kd, decay, d_states, d_vnew, d_final, *, interpret: bool = False, tuning: Tuning = Tuning()):
  """dV_total, Λ_{c+1} per chunk and dS_0 of the reverse recurrence (see :mod:`state_scan`)."""
  b, h, n, c, dk = w.shape
  dv = d_vnew.shape[-1]
  check_shapes(c, dk, dv)
  bh, block_v = b * h, _block_v(b * h, dv)
  decay_rows = jnp.broadcast_to(decay[..., None], (b, h, n, dk)).reshape(bh, n * dk)
  f32 = jnp.float32
  out_shapes = (jax.ShapeDtypeStruct((bh, n * c, dv), f32), jax.ShapeDtypeStruct((bh, n * dk, dv), f32),
                jax.ShapeDtypeStruct((bh, dk, dv), f32))
  dvt, lam, ds0 = _launch(
      functools.partial(_bwd_kernel, n=n, c=c, dk=dk),
      (_flat(w), _flat(kd), decay_rows, _flat(d_states), _flat(d_vnew.astype(f32)),
       d_final.astype(f32).reshape(bh, dk, dv)),
      (False, False, False, True, True, True), out_shapes,
      bh=bh, dv=dv, block_v=block_v, num_warps=4, num_stages=tuning.scan_backward_stages,
      interpret=interpret)
  return dvt.reshape(b, h, n, c, dv), lam.reshape(b, h, n, dk, dv), ds0.reshape(b, h, dk, dv)


def _chunk_launch(kernel, inputs, out_shapes, *, c, num_warps, interpret):
  """Grid [b·h, n]: one program per (head, chunk). Arrays [b·h, n·c, d] are tiled [c, d]; vectors [b·h, n·c]
  are tiled [c]."""
  def spec(shape):
    if len(shape) == 3:
      return pl.BlockSpec((None, c, shape[-1]), lambda i, j: (i, j, 0))
    return pl.BlockSpec((None, c), lambda i, j: (i, j))

  bh, rows = inputs[0].shape[:2]
  return pl.pallas_call(
      kernel,
      grid=(bh, rows // c),
      in_specs=[spec(x.shape) for x in inputs],
      out_specs=[spec(o.shape) for o in out_shapes],
      out_shape=out_shapes,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(*inputs)


def _wy_kernel(k_ref, v_ref, beta_ref, gamma_ref, w_ref, u_ref, t_ref, *, c):
  k, v = k_ref[...], v_ref[...]
  beta, gamma = beta_ref[...], gamma_ref[...]
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  strict = rows > cols
  decay = jnp.exp(jnp.where(strict, gamma[:, None] - gamma[None, :], 0.0))
  inv = unit_lower_inverse(jnp.where(strict, beta[:, None] * plgpu.dot(k, k, trans_b=True) * decay, 0.0),
                           matmul=plgpu.dot)
  t_ref[...] = inv
  kb = (k.astype(jnp.float32) * (beta * jnp.exp(gamma))[:, None]).astype(k.dtype)
  w_ref[...] = plgpu.dot(inv.astype(k.dtype), kb).astype(w_ref.dtype)
  vb = (v.astype(jnp.float32) * beta[:, None]).astype(v.dtype)
  u_ref[...] = plgpu.dot(inv.astype(v.dtype), vb).astype(u_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def wy_forward(k, v, beta, gamma, *, interpret: bool = False):
  """(w, u, T) of the WY representation (see :mod:`wy`), one program per (head, chunk)."""
  b, h, n, c, dk = k.shape
  dv = v.shape[-1]
  check_shapes(c, dk, dv)
  bh = b * h
  w, u, tmat = _chunk_launch(
      functools.partial(_wy_kernel, c=c),
      (_flat(k), _flat(v), beta.reshape(bh, n * c), gamma.reshape(bh, n * c)),
      (jax.ShapeDtypeStruct((bh, n * c, dk), k.dtype), jax.ShapeDtypeStruct((bh, n * c, dv), v.dtype),
       jax.ShapeDtypeStruct((bh, n * c, c), jnp.float32)),
      c=c, num_warps=4, interpret=interpret)
  return w.reshape(k.shape), u.reshape(v.shape), tmat.reshape(b, h, n, c, c)


def _wy_bwd_kernel(k_ref, v_ref, beta_ref, gamma_ref, t_ref, dw_ref, du_ref, dk_ref, dv_ref, dbeta_ref, dgamma_ref,
                   *, c):
  """The analytic backward of :mod:`wy` (``wy._wy_bwd``) for one chunk, ordered so big tiles die early."""
  k, v, dw, du = k_ref[...], v_ref[...], dw_ref[...], du_ref[...]
  beta, gamma, tmat = beta_ref[...], gamma_ref[...], t_ref[...]
  f32, t_lo = jnp.float32, tmat.astype(k.dtype)
  kscale = beta * jnp.exp(gamma)
  dvb = plgpu.dot(t_lo, du, trans_a=True)  # Tᵀ dU
  dv_ref[...] = (dvb * beta[:, None]).astype(dv_ref.dtype)
  dbeta = jnp.sum(dvb * v.astype(f32), axis=1)
  kb = (k.astype(f32) * kscale[:, None]).astype(k.dtype)
  vb = (v.astype(f32) * beta[:, None]).astype(v.dtype)
  dt = plgpu.dot(dw, kb, trans_b=True) + plgpu.dot(du, vb, trans_b=True)
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  strict = rows > jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  da = jnp.where(strict, -plgpu.dot(plgpu.dot(tmat, dt, trans_a=True), tmat, trans_b=True), 0.0)  # −Tᵀ dT Tᵀ
  gam = jnp.where(strict, jnp.exp(jnp.where(strict, gamma[:, None] - gamma[None, :], 0.0)), 0.0)
  kk = plgpu.dot(k, k, trans_b=True)
  dkk = da * beta[:, None] * gam
  dgam = dkk * kk  # dA/dγ_r = +A_rs, dA/dγ_s = −A_rs
  dbeta += jnp.sum(da * kk * gam, axis=1)
  dgamma = jnp.sum(dgam, axis=1) - jnp.sum(dgam, axis=0)
  dkb = plgpu.dot(t_lo, dw, trans_a=True)  # Tᵀ dW
  dkk_lo = dkk.astype(k.dtype)
  dk_ref[...] = (plgpu.dot(dkk_lo, k) + plgpu.dot(dkk_lo, k, trans_a=True)
                 + dkb * kscale[:, None]).astype(dk_ref.dtype)
  kb_dot = jnp.sum(dkb * k.astype(f32), axis=1)
  dbeta_ref[...] = dbeta + kb_dot * jnp.exp(gamma)
  dgamma_ref[...] = dgamma + kb_dot * kscale


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def wy_backward(k, v, beta, gamma, tmat, dw, du, *, interpret: bool = False, num_warps: int = Tuning.wy_backward_warps):
  """(dk, dv, dbeta, dgamma) of the WY representation given T and the cotangents of W, U; one program per chunk."""
  b, h, n, c, dk = k.shape
  dv = v.shape[-1]
  check_shapes(c, dk, dv)
  bh = b * h
  f32 = jnp.float32
  d_k, d_v, dbeta, dgamma = _chunk_launch(
      functools.partial(_wy_bwd_kernel, c=c),
      (_flat(k), _flat(v), beta.reshape(bh, n * c), gamma.reshape(bh, n * c), _flat(tmat),
       _flat(dw.astype(k.dtype)), _flat(du.astype(v.dtype))),
      (jax.ShapeDtypeStruct((bh, n * c, dk), k.dtype), jax.ShapeDtypeStruct((bh, n * c, dv), v.dtype),
       jax.ShapeDtypeStruct((bh, n * c), f32), jax.ShapeDtypeStruct((bh, n * c), f32)),
      c=c, num_warps=num_warps, interpret=interpret)
  return d_k.reshape(k.shape), d_v.reshape(v.shape), dbeta.reshape(beta.shape), dgamma.reshape(gamma.shape)
