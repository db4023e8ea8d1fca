"""Full causal multi-head (grouped-query) self-attention, registered as the ``"attn"`` mixer.

The kernel is ``jax.nn.dot_product_attention``: cuDNN's fused flash attention on GPU for bf16/f16 inputs with a
head dim cuDNN supports (its ``implementation=None`` default would pick XLA's dense path, which materialises
the [b, h, t, t] logits), XLA's dense path elsewhere. Reference: "Attention Is All You Need" (arXiv 1706.03762);
grouped-query attention, "GQA: Training Generalized Multi-Query Transformer Models" (arXiv 2305.13245).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.blocks import INIT_STD, dense, rope
from research.models.cache import DecodeCache
from research.models.config import ModelConfig
from research.models.registry import register_mixer


def _implementation(q: jax.Array) -> str:
  """"cudnn" where cuDNN's fused attention applies (GPU, 16-bit inputs, head dim a multiple of 8 up to 256)."""
  fits = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
  return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


class GroupedQueryAttention(nnx.Module):
  """Skeleton of a causal GQA self-attention mixer: projections, RoPE, decode-cache bookkeeping.

  x: [b, t, d] -> ([b, t, d], {}). Heads: H query, H_kv key/value (H_kv divides H), RoPE on q and k. Subclasses
  choose who each query sees: ``_attend(q, k, v)`` for the full sequence and ``_attend_cached(q, k, v,
  positions)`` against their decode cache (made by their ``init_cache``, holding ``next_position``).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    self.head_dim, self.rope_theta = cfg.resolved_head_dim, cfg.rope_theta
    q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = dense(cfg.d_model, q_dim, cfg, rngs=rngs)
    self.k_proj = dense(cfg.d_model, kv_dim, cfg, rngs=rngs)
    self.v_proj = dense(cfg.d_model, kv_dim, cfg, rngs=rngs)
    self.o_proj = dense(q_dim, cfg.d_model, cfg, rngs=rngs,
                        std=INIT_STD / math.sqrt(2 * len(cfg.layers)))
    self.cache_dtype = cfg.compute_dtype
    self.cache: nnx.Dict | None = nnx.data(None)  # made by init_cache

  def __call__(self, x: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, t, _ = x.shape
    if use_cache and self.cache is None:
      raise ValueError("use_cache=True needs init_cache(batch_size, max_length) first")
    start = self.cache["next_position"][...] if use_cache else 0
    positions = start + jnp.arange(t, dtype=jnp.int32)
    q = rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions, self.rope_theta)
    k = rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions, self.rope_theta)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    y = self._attend_cached(q, k, v, positions) if use_cache else self._attend(q, k, v)
    return self.o_proj(y.reshape(b, t, -1)), {}


@register_mixer("attn")
class CausalSelfAttention(GroupedQueryAttention):
  """Full causal attention. Decoding: :meth:`init_cache` makes a KV cache of ``max_length`` slots (k, v
  [b, max_length, H_kv, d_head] in the compute dtype, and the next position); ``use_cache=True`` appends x's
  keys/values at the next positions and attends over the cache, so a prompt then single tokens reproduce the
  full forward.
  """

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
    del layer_index  # every full-attention layer is the same
    super().__init__(cfg, rngs=rngs)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """An empty KV cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
    shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
    self.cache = nnx.Dict(k=DecodeCache(jnp.zeros(shape, self.cache_dtype)),
                          v=DecodeCache(jnp.zeros(shape, self.cache_dtype)),
                          next_position=DecodeCache(jnp.zeros((), jnp.int32)))

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=_implementation(q))

  def _attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """Write k, v at slots ``positions`` (consecutive) and attend from those positions over every filled slot."""
    cache, t, start = self.cache, q.shape[1], positions[0]
    cache["k"][...] = jax.lax.dynamic_update_slice_in_dim(cache["k"][...], k.astype(self.cache_dtype), start, 1)
    cache["v"][...] = jax.lax.dynamic_update_slice_in_dim(cache["v"][...], v.astype(self.cache_dtype), start, 1)
    cache["next_position"][...] = start + t
    slots = jnp.arange(cache["k"].shape[1])
    visible = slots[None, :] <= (start + jnp.arange(t))[:, None]  # [t, max_length], causal over filled slots
    return jax.nn.dot_product_attention(q, cache["k"][...].astype(q.dtype), cache["v"][...].astype(q.dtype),
                                        mask=visible[None, None])
