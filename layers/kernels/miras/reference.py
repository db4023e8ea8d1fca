"""Miras memories token by token: the exact recurrence (R0) and the frozen-gradient loop (R1), both with ``jax.grad``.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.2–5.4, Eq. 24–32); spec oracles R0/R1 (§10). Per head,
with state S (and momentum M for Titans, arXiv 2501.00663 Eq. 13–14), inner loss ℓ_t(W) = bias(M(W; k_t), v_t):

  R0 (exact):  W = view(S);  g = ∇_W ℓ_t(W);  S ← rule(S, g, α_t, η_t);  o_t = M(view(S); q_t)

  R1 (chunks of b tokens, t' = the chunk start): every g_t = ∇ℓ_t(view(S_{t'})); the state accumulates linearly
      L_t = α_t ⊙ L_{t−1} − η_t ⊙ g_t (L_{t'} = S_{t'}); token t reads s₀·L_t (s₀ = Moneta's frozen scale, else 1);
      the chunk's last token closes it: S = close(L) (Moneta: A, elastic net: soft threshold) and reads view(S), or,
      for Memora, takes the exact softmax step from L_{t−1} with its gradient at L_{t−1} (the lag token).

``read="pre"`` makes token t read the weights before its own write. A trailing chunk that is not complete (the
sequence, or ``lengths[b]``, ends inside it) is read but not closed: the returned state is the one at the last
chunk boundary, which is what a decoder holding the trailing tokens in a buffer continues from.

Shapes: q, k, v [b, t, h, d]; gates per :class:`layers.miras.spec.Gates`; state {layer: [b, h, out, in]} float32
(momentum likewise, or None); ln = (γ [h, d], β [h, d]) or None. Returns (o [b, t, h, d] float32, state, momentum).
With ``spec.inner_clip`` each ``jax.grad`` is rescaled to norm ≤ τ as a whole tree. These loops take one
``jax.grad`` per token: slow, obviously correct, and independent of the closed-form gradients and dual-form reads of
:mod:`layers.kernels.miras.chunked`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.miras.retention import exact_step
from layers.miras.spec import Gates, MemorySpec, along, gates_along


def _per_head(fn, q, k, v, gates: Gates, state: dict, momentum: dict | None, ln, *extra_b):
  """vmap ``fn`` over batch and heads; inputs [b, t, h, ...] become per-head [t, ...]."""
  b, t, h, _ = q.shape
  delta = gates.delta if gates.delta is not None else jnp.ones((b, t, h), jnp.float32)
  lmu = gates.log_momentum if gates.log_momentum is not None else jnp.zeros_like(gates.log_alpha)
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32, or float64 in tests
  seq = tuple(jnp.moveaxis(f32(x), 2, 1) for x in (q, k, v, gates.eta, gates.log_alpha, delta, lmu))
  ln = ln if ln is not None else (jnp.ones((h, q.shape[-1])), jnp.zeros((h, q.shape[-1])))
  momentum = momentum if momentum is not None else {}
  per_b = jax.vmap(fn, in_axes=(0,) * 7 + (0, 0, 0) + (None,) * len(extra_b))
  per_bh = jax.vmap(per_b, in_axes=(0,) * 7 + (0, 0, None) + (0,) * len(extra_b))
  o, s, m = per_bh(*seq, state, momentum, ln, *extra_b)
  return jnp.moveaxis(o, 1, 2), s, (m if m else None)


def exact_recurrence(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None,
                     ln=None) -> tuple[jax.Array, dict, dict | None]:
  """R0: the exact per-token recurrence (gradient at W_{t−1}, the retention map after every token)."""
  mem, ret = spec.memory, spec.retention

  def head(q, k, v, eta, la, delta, lmu, s, m, ln):
    def step(carry, x):
      s, m = carry
      qt, kt, vt, et, lat, dt, lmt = x
      w = ret.gradient_point(s)
      g = spec.clip_gradient(jax.grad(spec.token_loss)(w, kt, vt, dt, ln))
      alpha, eta_ = gates_along(mem, jnp.exp(lat)), gates_along(mem, et)
      if spec.momentum:
        m = {n: along(jnp.exp(lmt), mem.gate_axes[n]) * m[n] - eta_[n] * g[n] for n in m}
        s = {n: alpha[n] * s[n] + m[n] for n in s}
      else:
        s = exact_step(ret, s, g, alpha, eta_)
      read = ret.gradient_point(s) if spec.read == "post" else w
      return (s, m), mem.apply(read, qt, ln)

    (s, m), o = jax.lax.scan(step, (s, m), (q, k, v, eta, la, delta, lmu))
    return o, s, m

  return _per_head(head, q, k, v, gates, initial_state, initial_momentum, ln)


def frozen_gradient_loop(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None,
                         ln=None, chunk_size: int = 64, lengths: jax.Array | None = None,
                         ) -> tuple[jax.Array, dict, dict | None]:
  """R1: token by token, every gradient at the chunk-start weights; chunk-end rules as in the module docstring.

  ``lengths`` (int [b], default t): tokens at or past it are padding; only chunks that end by it are closed.
  """
  mem, ret, c = spec.memory, spec.retention, chunk_size
  b, t = q.shape[:2]
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  where = lambda cond, x, y: jax.tree.map(lambda a, b_: jnp.where(cond, a, b_), x, y)

  def head(q, k, v, eta, la, delta, lmu, s, m, ln, length):
    def step(carry, x):
      s_b, m_b, lin, mom = carry
      qt, kt, vt, et, lat, dt, lmt, i = x
      first, end = i % c == 0, (i % c == c - 1) & ((i // c + 1) * c <= length)
      lin, mom = where(first, s_b, lin), where(first, m_b, mom)
      w0, s0 = ret.gradient_point(s_b), ret.read_scale(s_b)
      g = spec.clip_gradient(jax.grad(spec.token_loss)(w0, kt, vt, dt, ln))
      alpha, eta_ = gates_along(mem, jnp.exp(lat)), gates_along(mem, et)
      pre_read = {n: s0[n] * lin[n] for n in lin}
      if spec.momentum:
        mom = {n: along(jnp.exp(lmt), mem.gate_axes[n]) * mom[n] - eta_[n] * g[n] for n in mom}
        new_lin = {n: alpha[n] * lin[n] + mom[n] for n in lin}
      else:
        new_lin = {n: alpha[n] * lin[n] - eta_[n] * g[n] for n in lin}
      if ret.lag:  # the exact step from the linear state, with the gradient there
        g_lag = spec.clip_gradient(jax.grad(spec.token_loss)(lin, kt, vt, dt, ln))
        s_end = ret.lag_step(lin, g_lag, alpha, eta_)
      else:
        s_end = ret.close(new_lin)
      post_read = where(end, ret.gradient_point(s_end), {n: s0[n] * new_lin[n] for n in new_lin})
      o = mem.apply(post_read if spec.read == "post" else pre_read, qt, ln)
      return (where(end, s_end, s_b), where(end, mom, m_b), new_lin, mom), o

    xs = (q, k, v, eta, la, delta, lmu, jnp.arange(q.shape[0]))
    (s, m, _, _), o = jax.lax.scan(step, (s, m, s, m), xs)
    return o, s, m

  return _per_head(head, q, k, v, gates, initial_state, initial_momentum, ln, lengths)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size"))
def miras_reference(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None,
                    ln=None, chunk_size: int = 64, lengths=None):
  """The api's ``reference`` implementation: :func:`frozen_gradient_loop` (R0 when ``chunk_size`` is 1)."""
  return frozen_gradient_loop(q, k, v, gates, spec=spec, initial_state=initial_state,
                              initial_momentum=initial_momentum, ln=ln, chunk_size=chunk_size, lengths=lengths)
