"""Miras memories, chunkwise parallel: closed-form gradients and dual-form per-token reads, ``lax.scan`` over chunks.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4, Eq. 28–32) after Titans' mini-batch form ("Titans:
Learning to Memorize at Test Time", arXiv 2501.00663, §3.2, Eq. 16–18) and TTT's dual form ("Learning to (Learn at
Test Time)", arXiv 2407.04620). Same semantics as the frozen-gradient loop R1 (:mod:`reference`); per head and chunk
of c tokens, from the chunk-start state S₀ (W₀ = view(S₀), s₀ = Moneta's read scale, else 1):

  1. forward the chunk's keys through W₀, y = M(W₀; K); per-layer inputs a_i and errors e_i of ∂ℓ_i/∂y_i
     (closed form, ``memory.backprop``): ∇_W ℓ_i = e_i a_iᵀ for every token at once (errors rescaled so that
     ‖∇_W ℓ_i‖ ≤ τ with ``spec.inner_clip``);
  2. log B_t = Σ_{j≤t} log α_j (float32, chunk-local); coefficients C[t, i] = η_i · B_t / B_i for i ≤ t (i < t for
     ``read="pre"``), masked *before* the exp so no positive exponent is evaluated; per channel for channel gates;
     with momentum (per-head gates) C = (B-ratios) @ (μ-ratios) · η, since W_t = B_t W₀ + Σ_{j≤t} (B_t/B_j) M_j;
  3. per-token reads through the same memory function with per-token weights W_t = B_t ⊙ W₀ − s₀ Σ_i C[t,i] e_i a_iᵀ,
     never materialised: each layer's product is W₀-part + Σ_i C[t,i] (a_i · x_t) e_i, masked matmuls (the dual form);
  4. the chunk-end state S = B_c ⊙ S₀ − Σ_i (η_i B_c / B_i) e_i a_iᵀ (+ momentum terms), one matmul per layer, then the
     retention's chunk-end rule: ``close`` (Moneta keeps A, elastic net thresholds), or Memora's lag token, whose
     exact softmax step starts from the state after the other c − 1 tokens; the last token then reads the new state.

Step 1 is :func:`stage_gradients`, step 3 :func:`stage_reads`, step 4 :func:`stage_close` (each computes the step-2
coefficients it needs); :func:`chunk_step` chains them. The log-gate sums log B are taken for all chunks at once,
before the scan.

Channel gates scale each weight along its d-sized axis; their intra-chunk products are formed element-wise in
float32 over [c, c, d] (stable: every exponent ≤ 0). The scan carries only S (and M); ``remat=True`` recomputes
the chunk body in the backward pass instead of storing its intermediates.

Shapes: q, k, v [b, t, h, d] (any t; a trailing partial chunk is read but not closed); gates [b, t, h, g]; state
{layer: [b, h, out, in]} float32; ln (γ, β) [h, d]. Returns (o [b, t, h, d] float32, state, momentum).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.kernels.miras import channel_gates
from layers.miras.memory import MATMULS, matmul
from layers.miras.spec import Gates, MemorySpec, along, gates_along


def _ratios(log_b_rows: jax.Array, log_b: jax.Array, mask: jax.Array) -> jax.Array:
  """exp(log_b_rows[t] − log_b[i]) where mask[t, i], else 0: [c, c, g], exponents masked before the exp."""
  diff = jnp.where(mask[..., None], log_b_rows[:, None, :] - log_b[None, :, :], -jnp.inf)
  return jnp.exp(diff)


def _layer_read(x, w0, a, e, axis, decay, coef, scale, mode, m0=None, c_mom=None):
  """Rows x_t [c, in] through per-token weights W_t = decay_t ⊙ W₀ − scale·Σ_i coef[t, i] ⊙ e_i a_iᵀ [c, out].

  decay [c, g]; coef: per head [c, c, 1], or per channel along ``axis`` (g = d) ``channel_gates.Coefficients``,
  whose products never form [c, c, d]; momentum adds c_mom[t]·M₀. ``mode``: matmul operands
  (``layers.miras.memory.MATMULS``).
  """
  _dot = functools.partial(_mode_dot, mode=mode)
  if not isinstance(coef, channel_gates.Coefficients):
    base = decay * _dot("ti,oi->to", x, w0)
    out = base - scale * _dot("ts,so->to", _dot("ti,si->ts", x, a) * coef[..., 0], e)
    if m0 is not None:
      out = out + c_mom * _dot("ti,oi->to", x, m0)
    return out
  if axis == "in":  # W_t = W₀ diag(B_t) − Σ_i e_i (a_i ⊙ coef_ti)ᵀ
    return _dot("ti,oi->to", x * decay, w0) - scale * _dot("ts,so->to", coef.scores(x, a), e)
  scores = _dot("ti,si->ts", x, a)  # W_t = diag(B_t) W₀ − Σ_i (coef_ti ⊙ e_i) a_iᵀ
  return decay * _dot("ti,oi->to", x, w0) - scale * coef.mix(scores, e)


def _mode_dot(spec: str, a: jax.Array, b: jax.Array, mode: str) -> jax.Array:
  return matmul(spec, a, b, mode)


def _state_at(s0, acts, gate_axes, decay, coef, mode, m0=None, c_mom=None):
  """S = decay ⊙ S₀ − Σ_i coef_i ⊙ e_i a_iᵀ (+ c_mom·M₀) per layer; decay [g], coef [c, g]."""
  _dot = functools.partial(_mode_dot, mode=mode)
  out = {}
  for name, (a, e) in acts.items():
    axis = gate_axes[name]
    if axis == "in":
      upd = _dot("so,si->oi", e, a * coef)
    else:
      upd = _dot("so,si->oi", e * coef, a)
    out[name] = along(decay, axis) * s0[name] - upd
    if m0 is not None:
      out[name] = out[name] + c_mom * m0[name]
  return out


def coefficients(spec: MemorySpec, eta, la, lb, lp) -> dict:
  """The chunk's decay and step coefficients (gates [c, g]; see the module docstring, step 2)."""
  c = eta.shape[0]
  t = jnp.arange(c)
  post = spec.read == "post"
  lend = lb[-1]  # log B_c [g]
  lread = lb if post else lb - la
  ratio = _ratios(lread, lb, t[:, None] >= t[None, :] if post else t[:, None] > t[None, :])
  end_ratio = jnp.exp(lend[None, :] - lb)  # [c, g]: B_c / B_i
  out = {"decay": jnp.exp(lread), "end_decay": jnp.exp(lend), "c_read": None, "c_end": None}
  if spec.momentum:  # per-head gates: W_t = B_t W₀ + Σ_{j≤t} (B_t / B_j) M_j, M_j = P_j M₀ − Σ_{i≤j} η_i P_j / P_i g_i
    mu_ratio = _ratios(lp, lp, t[:, None] >= t[None, :])[..., 0]  # [c, c]: P_j / P_i, i ≤ j
    out["coef"] = (ratio[..., 0] @ mu_ratio)[..., None] * eta[None]
    out["c_read"] = ratio[..., 0] @ jnp.exp(lp)  # [c, 1]
    out["end_coef"] = (end_ratio[:, 0] @ mu_ratio)[:, None] * eta
    out["c_end"] = end_ratio[:, 0] @ jnp.exp(lp)
  else:
    out["coef"], out["end_coef"] = ratio * eta[None], end_ratio * eta
  return out


def stage_gradients(spec: MemorySpec, s, k, v, delta, ln) -> dict:
  """Stage 1: every token's (a_i, e_i) per layer at the chunk-start weights W₀ = view(S₀) (step 1)."""
  mem, ret = spec.memory, spec.retention
  w0 = ret.gradient_point(s)
  y, cache = mem.forward(w0, k, ln)
  return spec.clip_errors(mem.backprop(w0, cache, spec.bias.grad(y, v, delta), ln))


def stage_reads(spec: MemorySpec, s, m, acts, q, eta, la, lb, lp, ln) -> jax.Array:
  """Stage 2: the per-token reads o [c, d] through the dual form (step 3)."""
  mem, ret = spec.memory, spec.retention
  co = coefficients(spec, eta, la, lb, lp)
  s0 = ret.read_scale(s)
  coef = co["coef"] if eta.shape[-1] == 1 else channel_gates.Coefficients.from_gates(  # ([c, c, d] goes unused)
      eta, la, lb, post=spec.read == "post")

  def matvec(name, w, x):
    a, e = acts[name]
    return _layer_read(x, w, a, e, mem.gate_axes[name], co["decay"], coef, s0[name], mem.matmul,
                       m[name] if spec.momentum else None, co["c_read"])

  return mem.apply(ret.gradient_point(s), q, ln, matvec=matvec)


def stage_close(spec: MemorySpec, s, m, acts, o, q, k, v, eta, la, lb, lp, delta, complete, ln):
  """Stage 3: the chunk-end state and momentum (step 4) and the last token's read of the closed state."""
  mem, ret = spec.memory, spec.retention
  mode = mem.matmul
  c = q.shape[0]
  t = jnp.arange(c)
  co = coefficients(spec, eta, la, lb, lp)
  lend = lb[-1]
  s_lin = _state_at(s, acts, mem.gate_axes, co["end_decay"], co["end_coef"], mode, m if spec.momentum else None,
                    co["c_end"])
  if spec.momentum:
    lp_end = lp[-1]
    mom_coef = jnp.exp(lp_end[None, :] - lp) * eta  # [c, 1]
    m_new = _state_at(m, acts, mem.gate_axes, jnp.exp(lp_end), mom_coef, mode)
  else:
    m_new = m

  if ret.lag:  # Memora's lag token: the exact step from the state after tokens 0..c−2, gradient there
    before = jnp.exp(lend - la[-1])  # B_{c−1}
    before_coef = jnp.exp(jnp.where(t[:, None] < c - 1, lend[None, :] - la[-1][None, :] - lb, -jnp.inf)) * eta
    s_prev = _state_at(s, acts, mem.gate_axes, before, before_coef, mode)
    y1, cache1 = mem.forward(s_prev, k[-1:], ln)
    acts1 = spec.clip_errors(mem.backprop(s_prev, cache1, spec.bias.grad(y1, v[-1:], delta[-1:]), ln))
    grad1 = {name: matmul("so,si->oi", e1, a1, mode) for name, (a1, e1) in acts1.items()}
    s_new = ret.lag_step(s_prev, grad1, gates_along(mem, jnp.exp(la[-1])), gates_along(mem, eta[-1]))
  else:
    s_new = ret.close(s_lin)
  if spec.reads_closed_state:  # the chunk's last token reads the closed state
    last = mem.apply(ret.gradient_point(s_new), q[-1:], ln)
    o = o.at[-1:].set(jnp.where(complete, last, o[-1:]))
  keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(complete, x, y), new, old)
  return keep(s_new, s), keep(m_new, m), o


def chunk_step(spec: MemorySpec, carry, xs, ln):
  """One chunk of one head: carry (S₀, M₀), xs (q, k, v [c, d], η, log α, log B, log P [c, g], δ [c], complete
  flag), log B and log P the chunk-local inclusive cumulative sums of log α and of the momentum's log μ; three
  stages, gradients → reads → close."""
  s, m = carry
  q, k, v, eta, la, lb, lp, delta, complete = xs
  acts = stage_gradients(spec, s, k, v, delta, ln)
  o = stage_reads(spec, s, m, acts, q, eta, la, lb, lp, ln)
  s_new, m_new, o = stage_close(spec, s, m, acts, o, q, k, v, eta, la, lb, lp, delta, complete, ln)
  return (s_new, m_new), o


def _to_chunks(x: jax.Array, c: int) -> jax.Array:
  """[b, t, h, ...] (t a multiple of c) -> [n, b, h, c, ...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // c, c, h, *x.shape[3:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


class Chunked(NamedTuple):
  """A sequence cut into chunks for the scan: every field [n, b, h, c, ...] (float32; q, k, v in their own dtype
  with :func:`chunk_sequence`'s ``keep_dtype``), flags [n, b]."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  eta: jax.Array  # [n, b, h, c, g]
  log_alpha: jax.Array  # [n, b, h, c, g]
  log_b: jax.Array  # chunk-local inclusive cumulative sum of log α
  log_p: jax.Array  # chunk-local cumulative sum of the momentum's log μ (zeros without momentum)
  delta: jax.Array  # [n, b, h, c]
  complete: jax.Array  # [n, b]: the chunk ends at or before the row's length (it is closed into the state)


def chunk_sequence(q, k, v, gates: Gates, spec: MemorySpec, c: int, lengths=None,
                   keep_dtype: bool = False) -> Chunked:
  """Pads [b, t, h, ...] inputs to whole chunks of c with identity tokens (η = 0, α = 1, δ = 1), cuts them into
  chunks and takes the chunk-local cumulative log-gates for all chunks at once, outside the sequential scan.
  ``keep_dtype``: q, k and v keep their dtype (bf16 stays bf16, for kernels that take them in float32 where they
  compute and return their cotangents in it: half the HBM traffic of the chunked copies); the gates are float32."""
  b, t, h, _ = q.shape
  pad = -t % c
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32, or float64 in tests
  delta = gates.delta if gates.delta is not None else jnp.ones((b, t, h), jnp.float32)
  lmu = gates.log_momentum if gates.log_momentum is not None else jnp.zeros_like(gates.log_alpha)
  seq = [x if keep_dtype else f32(x) for x in (q, k, v)] + [f32(x) for x in (gates.eta, gates.log_alpha, lmu, delta)]
  if pad:  # identity tokens; they are never closed into the state
    seq = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=1.0 if i == 6 else 0.0)
           for i, x in enumerate(seq)]
  n = (t + pad) // c
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  complete = (jnp.arange(1, n + 1) * c)[:, None] <= lengths[None, :]  # [n, b]
  qc, kc, vc, eta, la, lmu, delta = (_to_chunks(x, c) for x in seq)
  # (a cumulative sum of constant zeros would be constant-folded by XLA, ~10 s per compile at 8 × 4096 tokens)
  lp = jnp.cumsum(lmu, axis=3) if spec.momentum else lmu
  return Chunked(qc, kc, vc, eta, la, jnp.cumsum(la, axis=3), lp, delta, complete)


def unchunk(o: jax.Array, t: int) -> jax.Array:
  """[n, b, h, c, d] -> [b, t, h, d] (the padding dropped)."""
  n, b, h, c, d = o.shape
  o = jnp.moveaxis(o, 0, 1)  # [b, n, h, c, d]
  return jnp.moveaxis(o, 2, 3).reshape(b, n * c, h, d)[:, :t]


def with_matmul(spec: MemorySpec, matmul: str) -> MemorySpec:
  """``spec`` whose memory multiplies in ``matmul`` mode (``layers.miras.memory.MATMULS``)."""
  if matmul not in MATMULS:
    raise ValueError(f"matmul must be one of {MATMULS} (got {matmul!r})")
  return dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, matmul=matmul))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "remat", "matmul"))
def miras_chunked(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None, ln=None,
                  chunk_size: int = 64, lengths=None, remat: bool = False, matmul: str = "float32"):
  """Chunkwise-parallel Miras memory; same contract as :func:`reference.frozen_gradient_loop`.

  Args:
    q, k, v: [b, t, h, d]; gates: :class:`Gates` ([b, t, h, g] with g ∈ {1, d}; δ [b, t, h]).
    spec: the memory (static). initial_state: {layer: [b, h, out, in]}; initial_momentum likewise (momentum only).
    ln: (γ, β) [h, d] of the MLP memory's LayerNorm, or None.
    chunk_size: tokens per chunk c ≥ 1. lengths: int [b] or None; tokens at or past it are padding.
    remat: ``jax.checkpoint`` the chunk body.
    matmul: ``float32`` (full precision) or ``bfloat16`` operands with float32 accumulation for every matmul of
      the chunk body (states, gates, cumulative sums and element-wise products stay float32).

  Returns:
    (o [b, t, h, d] float32, state at the last chunk boundary, momentum there or None).
  """
  spec = with_matmul(spec, matmul)
  b, t, h, d = q.shape
  xs = chunk_sequence(q, k, v, gates, spec, chunk_size, lengths)
  ln = ln if ln is not None else (jnp.ones((h, d)), jnp.zeros((h, d)))
  momentum = initial_momentum if spec.momentum else {}

  per_head = jax.vmap(functools.partial(chunk_step, spec), in_axes=((0, 0), (0,) * 8 + (None,), 0))
  per_batch = jax.vmap(per_head, in_axes=((0, 0), (0,) * 9, None))
  step = jax.checkpoint(per_batch) if remat else per_batch
  (state, mom), o = jax.lax.scan(lambda carry, x: step(carry, x, ln), (initial_state, momentum), tuple(xs))
  return unchunk(o, t), state, (mom if spec.momentum else None)
