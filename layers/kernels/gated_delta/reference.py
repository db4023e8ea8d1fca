"""Gated delta rule, token by token: the reference recurrence and the one-token decode step.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464); as used per memory by
"MoM: Linear Sequence Modeling with Mixture-of-Memories" (arXiv 2502.13685). Per head, with a state
S ∈ R^{K×V} and, for each token t, query/key q_t, k_t ∈ R^K, value v_t ∈ R^V, log-decay g_t ≤ 0, step β_t:

    S ← exp(g_t) · S                  # decay first
    u_t = β_t · (v_t − Sᵀ k_t)         # delta-rule error on the decayed state
    S ← S + k_t u_tᵀ ;  o_t = Sᵀ (scale · q_t)

Shapes (layout shared by every implementation in this package): q, k [b, t, h, K]; v [b, t, h, V];
g, beta [b, t, h]; state [b, h, K, V] (float32). Outputs are returned in v's dtype, the state in float32.
The recurrence runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def resolve_scale(scale: float | None, head_dim: int) -> float:
  """The query scale: ``head_dim ** -0.5`` unless given."""
  return head_dim ** -0.5 if scale is None else scale


def zero_state(batch: int, heads: int, key_dim: int, value_dim: int) -> jax.Array:
  """The empty memory, float32 [b, h, K, V]."""
  return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)


def recurrent_step(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                   state: jax.Array, *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One token of the recurrence: O(K·V) work and memory per head, for decoding.

  Args:
    q, k: [b, h, K]; v: [b, h, V]; g, beta: [b, h]; state: float32 [b, h, K, V].
    scale: query scale (default K^-0.5).

  Returns:
    (o [b, h, V] in v's dtype, new state float32 [b, h, K, V]).
  """
  scale = resolve_scale(scale, q.shape[-1])
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  s = state * jnp.exp(g.astype(jnp.float32))[..., None, None]
  recalled = jnp.einsum("bhkv,bhk->bhv", s, k32, precision=_HIGHEST)
  u = beta.astype(jnp.float32)[..., None] * (v32 - recalled)
  s = s + k32[..., :, None] * u[..., None, :]
  o = jnp.einsum("bhkv,bhk->bhv", s, q32 * scale, precision=_HIGHEST)
  return o.astype(v.dtype), s


def gated_delta_rule_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None, resets: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The whole sequence through :func:`recurrent_step` with ``lax.scan`` (T sequential steps).

  Args:
    q, k: [b, t, h, K]; v: [b, t, h, V]; g (log-decay, ≤ 0), beta: [b, t, h].
    scale: query scale (default K^-0.5).
    initial_state: float32 [b, h, K, V]; zeros if None.
    resets: bool [b, t] or None: the state is zeroed before every token where True (packed sequences).

  Returns:
    (o [b, t, h, V] in v's dtype, final state float32 [b, h, K, V]).
  """
  b, t, h, dk = q.shape
  state = zero_state(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.astype(jnp.float32)
  resets = jnp.zeros((b, t), bool) if resets is None else resets

  def step(s, xs):
    *token, reset = xs
    o, s = recurrent_step(*token, jnp.where(reset[:, None, None, None], 0.0, s), scale=scale)
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, resets))
  final, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1), final
