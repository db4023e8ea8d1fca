"""Full causal multi-head (grouped-query) self-attention, registered as the ``"attn"`` mixer.

The kernel is ``jax.nn.dot_product_attention``: cuDNN's fused flash attention on GPU for bf16/f16 inputs with a
head dim cuDNN supports (its ``implementation=None`` default would pick XLA's dense path, which materialises
the [b, h, t, t] logits), XLA's dense path elsewhere. Reference: "Attention Is All You Need" (arXiv 1706.03762); grouped-query
attention, "GQA: Training Generalized Multi-Query Transformer Models" (arXiv 2305.13245).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.blocks import INIT_STD, dense, rope
from research.models.config import ModelConfig
from research.models.registry import register_mixer


def _implementation(q: jax.Array) -> str:
  """"cudnn" where cuDNN's fused attention applies (GPU, 16-bit inputs, head dim a multiple of 8 up to 256)."""
  fits = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
  return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


@register_mixer("attn")
class CausalSelfAttention(nnx.Module):
  """x: [b, t, d] -> ([b, t, d], {}). Heads: H query, H_kv key/value (H_kv divides H), RoPE on q and k."""

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
    del layer_index  # every full-attention layer is the same
    self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    self.head_dim, self.rope_theta = cfg.resolved_head_dim, cfg.rope_theta
    q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = dense(cfg.d_model, q_dim, cfg, rngs=rngs)
    self.k_proj = dense(cfg.d_model, kv_dim, cfg, rngs=rngs)
    self.v_proj = dense(cfg.d_model, kv_dim, cfg, rngs=rngs)
    self.o_proj = dense(q_dim, cfg.d_model, cfg, rngs=rngs,
                        std=INIT_STD / math.sqrt(2 * len(cfg.layers)))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, t, _ = x.shape
    positions = jnp.arange(t)
    q = rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions, self.rope_theta)
    k = rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions, self.rope_theta)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=_implementation(q))
    return self.o_proj(y.reshape(b, t, -1)), {}
