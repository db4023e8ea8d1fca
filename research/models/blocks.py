"""Building blocks shared by every decoder: RMSNorm, SwiGLU MLP, rotary position embeddings, and the dense layer
whose kernel records its logical axes (``research.sharding``).

References: RMSNorm, "Root Mean Square Layer Normalization" (arXiv 1910.07467); SwiGLU, "GLU Variants Improve
Transformer" (arXiv 2002.05202); RoPE, "RoFormer: Enhanced Transformer with Rotary Position Embedding"
(arXiv 2104.09864).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


Axes = tuple[str | None, ...]


def annotated(initializer, axes: Axes):
  """``initializer`` whose Param records its logical axes (``research.sharding`` maps them to mesh axes)."""
  return nnx.with_metadata(initializer, logical_axes=axes)


def dense(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, axes: Axes | None = None,
          std: float = INIT_STD) -> nnx.Linear:
  """Bias-free linear layer with N(0, std²) init, float32 parameters, compute dtype ``dtype`` and the kernel's
  logical ``axes`` (e.g. ``("embed", "mlp")``; every memlab layer gives them, None leaves the kernel replicated)."""
  init = nnx.initializers.normal(std)
  return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=annotated(init, axes) if axes is not None else init, rngs=rngs)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · w, computed in float32 and returned in the input dtype. x: [..., d]."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
  """MLP(x) = W_down (silu(W_gate x) ⊙ W_up x). x: [b, t, d] -> [b, t, d]."""

  def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs, out_std: float = INIT_STD):
    self.gate = dense(d_model, hidden, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
    self.up = dense(d_model, hidden, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
    self.down = dense(hidden, d_model, dtype=dtype, rngs=rngs, axes=("mlp", "embed"), std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate channel pairs (i, i + d/2) of x: [b, t, h, d] by angle positions[t] · theta^(-2i/d).

  positions: int [t] or [b, t]. Computed in float32, returned in x's dtype.
  """
  d = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  pos = positions.astype(jnp.float32)
  pos = pos[None] if pos.ndim == 1 else pos
  angles = pos[..., None, None] * inv_freq  # [b, t, 1, d/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
