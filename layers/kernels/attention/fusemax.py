"""Exact attention as literal einsum cascades (FuseMax): the oracle's algebra and selectable implementations.

"FuseMax: Leveraging Extended Einsums to Optimize Attention Accelerator Design" (Nayak et al., MICRO 2024,
arXiv 2406.10491) writes attention as cascades of extended einsums and counts the passes over the key fiber M
that each cascade needs. This module spells them out with the paper's tensor names so that each line can be
held against the paper:

* ``naive`` (C0): SN = exp(QK) without max subtraction; overflows once a logit exceeds 88.7 (negative control).
* ``three_pass`` (C4): GM = max QK; SN = exp(QK - GM), SD = sum SN; A = SN / SD, AV = A·V.
* ``two_pass`` (C2p): online normaliser (Milakov & Gimelshein, arXiv 1805.02867): one scan for (RM, RD), a
  second scan for AV = exp(QK - RM)/RD · V.
* ``one_pass`` (C5): running max RM, denominator RD and numerator RNV with correction PRM = exp(RM - RM'),
  the division deferred to the end (FlashAttention-2 forward).
* ``twopass_softmax``: "The Two-Pass Softmax Algorithm" (Dukhan & Ablandov, arXiv 2001.04438), softmax from
  (mantissa, exponent) pairs exp(x) = m·2^e with an associative pair reduction and no max pass.
* ``merge``: combine attention over disjoint key segments through their logsumexps (exact, differentiable).

``three_pass`` over a pattern's dense mask is the oracle (``reference.py``); the three stable cascades are also
implementations of ``api.attention`` (``"fusemax_3pass"``, ``"fusemax_2pass"``, ``"fusemax_1pass"``), never chosen
automatically: each materialises the [T, S] mask and is meant for studying the cascades, not for speed.

Shapes (as ``jax.nn.dot_product_attention``): q [B, T, Hq, E], k [B, S, Hkv, E], v [B, S, Hkv, F]; query head g
uses KV head g // (Hq / Hkv); ``mask`` bool broadcastable to [Hkv, T, S] (True = visible). Every cascade returns
(o [B, T, Hq, F] in q's dtype, lse [B, T, Hq] natural-log logsumexp in float32, or float64 under x64). Rows with
no visible key give o = 0 and lse = -inf, never NaN: logits are masked with the finite ``NEG`` because
exp(-inf - (-inf)) is NaN, and a SEEN flag zeroes those rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from layers.kernels.attention.call import AttentionCall, Implementation
from layers.kernels.attention.masks import traced_mask

NEG = -0.7 * float(np.finfo(np.float32).max)


def _prepare(q, k, v, mask, scale):
  """Compute-dtype operands split for GQA: q5 [B, T, Hkv, G, E]; valid [1, Hkv|1, 1, T, S]; scale s."""
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  b, t, hq, e = q.shape
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
  s = 1.0 / math.sqrt(e) if scale is None else scale
  q5 = q.astype(dtype).reshape(b, t, hkv, hq // hkv, e)
  valid = jnp.ones((1, 1, 1, t, k.shape[1]), bool) if mask is None else jnp.asarray(mask)[None, :, None]
  return q5, k.astype(dtype), v.astype(dtype), s, valid


def _finish(av, lse, seen, out_dtype):
  """av [B, T, Hkv, G, F], lse/seen [B|1, Hkv|1, G|1, T] -> (o [B, T, Hq, F], lse [B, T, Hq])."""
  b, t, hkv, g, f = av.shape
  seen_o = jnp.moveaxis(jnp.broadcast_to(seen, (b, hkv, g, t)), 3, 1)[..., None]
  lse = jnp.where(jnp.broadcast_to(seen, lse.shape), lse, -jnp.inf)
  o = jnp.where(seen_o, av, 0.0).reshape(b, t, hkv * g, f).astype(out_dtype)
  return o, jnp.moveaxis(lse, 3, 1).reshape(b, t, hkv * g)


def naive(q, k, v, mask=None, scale=None):
  """C0: SN = exp(QK) (no max), AV = (SN·V) / SD. Overflows to inf/NaN once a logit exceeds ~88.7 in fp32."""
  q5, k, v, s, valid = _prepare(q, k, v, mask, scale)
  qk = jnp.where(valid, jnp.einsum("bphge,bmhe->bhgpm", q5, k) * s, NEG)
  sn = jnp.exp(qk)
  sd = jnp.einsum("bhgpm->bhgp", sn)
  av = jnp.einsum("bhgpm,bmhf->bphgf", sn, v) / jnp.moveaxis(sd, 3, 1)[..., None]
  return _finish(av, jnp.log(sd), jnp.any(valid, -1), q.dtype)


def three_pass(q, k, v, mask=None, scale=None):
  """C4, numerically stable 3-pass softmax attention (pass 1: GM; pass 2: SN, SD; pass 3: A, AV)."""
  q5, k, v, s, valid = _prepare(q, k, v, mask, scale)
  qk = jnp.where(valid, jnp.einsum("bphge,bmhe->bhgpm", q5, k) * s, NEG)
  gm = jnp.max(qk, axis=-1)
  sn = jnp.exp(qk - gm[..., None])
  sd = jnp.einsum("bhgpm->bhgp", sn)
  a = sn / sd[..., None]
  av = jnp.einsum("bhgpm,bmhf->bphgf", a, v)
  return _finish(av, gm + jnp.log(sd), jnp.any(valid, -1), q.dtype)


def _key_tiles(k, v, valid, m0):
  """Pad M to a multiple of M0 (padding masked) and tile: BK [M1, B, M0, Hkv, E], BV, BVALID [M1, ..., M0]."""
  m = k.shape[1]
  m1 = -(-m // m0)
  pad = m1 * m0 - m
  k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  valid = jnp.pad(valid, ((0, 0),) * 4 + ((0, pad),))
  tile = lambda x, axis: jnp.moveaxis(x.reshape(*x.shape[:axis], m1, m0, *x.shape[axis + 1:]), axis, 0)
  return tile(k, 1), tile(v, 1), tile(valid, 4)


def two_pass(q, k, v, mask=None, scale=None, block_k=64):
  """C2p, online normaliser: pass 1 scans key tiles for (RM, RD); pass 2 recomputes BQK and accumulates AV."""
  q5, k, v, s, valid = _prepare(q, k, v, mask, scale)
  bk, bv, bvalid = _key_tiles(k, v, valid, block_k)
  b, t, hkv, g, _ = q5.shape

  def logits(bk_m1, valid_m1):
    return jnp.where(valid_m1, jnp.einsum("bphge,bnhe->bhgpn", q5, bk_m1) * s, NEG)

  def pass1(carry, tile):
    rm, rd = carry
    bqk = logits(tile[0], tile[1])
    rm_new = jnp.maximum(rm, jnp.max(bqk, axis=-1))
    rd = rd * jnp.exp(rm - rm_new) + jnp.einsum("bhgpn->bhgp", jnp.exp(bqk - rm_new[..., None]))
    return (rm_new, rd), None

  init = (jnp.full((b, hkv, g, t), -jnp.inf, q5.dtype), jnp.zeros((b, hkv, g, t), q5.dtype))
  (rm, rd), _ = lax.scan(pass1, init, (bk, bvalid))

  def pass2(av, tile):
    a = jnp.exp(logits(tile[0], tile[1]) - rm[..., None]) / rd[..., None]
    return av + jnp.einsum("bhgpn,bnhf->bphgf", a, tile[2]), None

  av, _ = lax.scan(pass2, jnp.zeros((b, t, hkv, g, v.shape[-1]), q5.dtype), (bk, bvalid, bv))
  return _finish(av, rm + jnp.log(rd), jnp.any(valid, -1), q.dtype)


def one_pass(q, k, v, mask=None, scale=None, block_k=64, base2=False):
  """C5, FuseMax's 1-pass cascade: one scan over key tiles with carries (RM, RD, RNV, SEEN).

  ``base2=True`` evaluates exp as exp2 on logits scaled by log2(e) (as GPU kernels do); lse is returned in the
  natural log either way. Differentiating this with ``jax.grad`` stores per-tile intermediates (O(T·S)); the
  memory-lean training path is ``blockwise.py``.
  """
  q5, k, v, s, valid = _prepare(q, k, v, mask, scale)
  bk, bv, bvalid = _key_tiles(k, v, valid, block_k)
  b, t, hkv, g, _ = q5.shape
  exp, unit = (jnp.exp2, math.log2(math.e)) if base2 else (jnp.exp, 1.0)

  def step(carry, tile):
    rm, rd, rnv, seen = carry
    bk_m1, valid_m1, bv_m1 = tile
    bqk = jnp.where(valid_m1, jnp.einsum("bphge,bnhe->bhgpn", q5, bk_m1) * (s * unit), NEG)
    lm = jnp.max(bqk, axis=-1)
    rm_new = jnp.maximum(rm, lm)
    sln = exp(bqk - rm_new[..., None])
    sld = jnp.einsum("bhgpn->bhgp", sln)
    slnv = jnp.einsum("bhgpn,bnhf->bphgf", sln, bv_m1)
    prm = exp(rm - rm_new)
    rd = sld + rd * prm
    rnv = slnv + rnv * jnp.moveaxis(prm, 3, 1)[..., None]
    seen = seen | jnp.any(valid_m1, -1)
    return (rm_new, rd, rnv, seen), None

  init = (jnp.full((b, hkv, g, t), -jnp.inf, q5.dtype), jnp.zeros((b, hkv, g, t), q5.dtype),
          jnp.zeros((b, t, hkv, g, v.shape[-1]), q5.dtype), jnp.zeros((1, valid.shape[1], 1, t), bool))
  (rm, rd, rnv, seen), _ = lax.scan(step, init, (bk, bvalid, bv))
  av = rnv / jnp.moveaxis(jnp.where(rd > 0, rd, 1.0), 3, 1)[..., None]
  return _finish(av, rm / unit + jnp.log(rd), seen, q.dtype)


_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # Cody-Waite split: e·ln2_hi is exact in fp32 for |e| < 2^15


def twopass_softmax(x, mask=None, axis=-1):
  """Softmax in two passes over (mantissa, exponent) pairs, no max pass (Dukhan & Ablandov 2020).

  Pass 1: exp(x) = m·2^e with e = round(x·log2 e) and m in [2^-0.5, 2^0.5]; an associative reduction of
  (n, E) pairs gives n = Σ m·2^(e - E) with E = max e. Pass 2: y = m·2^(e - E) / n. Masked entries give 0.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  e = jnp.round(x * math.log2(math.e))
  m = jnp.exp(x - e * _LN2_HI - e * _LN2_LO)
  if mask is not None:
    m, e = jnp.where(mask, m, 0.0), jnp.where(mask, e, -jnp.inf)

  def combine(a, b):
    (na, ea), (nb, eb) = a, b
    top = jnp.maximum(ea, eb)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    return na * jnp.exp2(ea - safe) + nb * jnp.exp2(eb - safe), top

  axis = axis % x.ndim
  zero, low = jnp.zeros((), x.dtype), jnp.array(-jnp.inf, x.dtype)
  n, top = lax.reduce((m, e), (zero, low), combine, (axis,))
  n, top = jnp.expand_dims(n, axis), jnp.expand_dims(top, axis)
  return jnp.where(n > 0, m * jnp.exp2(e - jnp.where(jnp.isfinite(top), top, 0.0)) / jnp.where(n > 0, n, 1.0), 0.0)


def merge(outputs, lses):
  """Combine attention over disjoint key segments: o = Σ exp(lse_i - lse)·o_i, lse = logaddexp_i lse_i.

  outputs: sequence of [B, T, H, F]; lses: sequence of [B, T, H] (-inf for segments with no visible key).
  All-empty rows give (0, -inf) with zero gradients.
  """
  lse_all = jnp.stack([l.astype(jnp.promote_types(l.dtype, jnp.float32)) for l in lses])
  top = jnp.max(lse_all, axis=0)
  top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  weights = jnp.exp(lse_all - top)
  total = jnp.sum(weights, axis=0)
  nonempty = total > 0
  lse = jnp.where(nonempty, top + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)
  w = jnp.where(nonempty, weights / jnp.where(nonempty, total, 1.0), 0.0)
  o = sum(w_i[..., None] * o_i.astype(w.dtype) for w_i, o_i in zip(w, outputs))
  return o.astype(outputs[0].dtype), lse


CASCADES = {"naive": naive, "three_pass": three_pass, "two_pass": two_pass, "one_pass": one_pass}


def dot_product_softmax(q, k, v, mask=None, scale=None):
  """Plain softmax(QKᵀ)V via ``jax.nn.softmax`` on masked logits (the naive oracle, O(T·S) memory)."""
  q5, k, v, s, valid = _prepare(q, k, v, mask, scale)
  qk = jnp.where(valid, jnp.einsum("bphge,bmhe->bhgpm", q5, k) * s, -jnp.inf)
  p = jax.nn.softmax(qk, axis=-1)
  av = jnp.einsum("bhgpm,bmhf->bphgf", jnp.where(valid, p, 0.0), v)
  return _finish(av, jax.nn.logsumexp(qk, axis=-1), jnp.any(valid, -1), q.dtype)


def _cascade_implementation(name: str, cascade) -> Implementation:
  """``cascade`` over the call's dense pattern mask (any backend, pattern and offset)."""

  def attend(c: AttentionCall):
    return cascade(c.q, c.k, c.v, traced_mask(c.pattern, c.q.shape[1], c.k.shape[1], c.k.shape[2], c.q_offset),
                   c.scale)

  return Implementation(name, unsupported=lambda call: None, attend=attend)


IMPLEMENTATIONS = (_cascade_implementation("fusemax_3pass", three_pass),
                   _cascade_implementation("fusemax_2pass", two_pass),
                   _cascade_implementation("fusemax_1pass", one_pass))
