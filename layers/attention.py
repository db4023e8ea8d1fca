"""Causal self-attention mixers, every one through ``layers.kernels.attention.api``: ``attn`` (full causal),
``swa`` (sliding window), ``sink_window`` (attention sinks + window) and ``block_sparse`` (local + strided blocks).

References: "Attention Is All You Need" (arXiv 1706.03762); grouped-query attention, "GQA: Training Generalized
Multi-Query Transformer Models" (arXiv 2305.13245); sinks, "Efficient Streaming Language Models with Attention
Sinks" (arXiv 2309.17453); local + strided blocks, S2-Attention (arXiv 2407.17678) as used by LongGen
(arXiv 2410.01485, see ``layers.longgen`` for its hybrid schedule).

x [b, t, d] -> (y [b, t, d], {}). H query heads, H_kv key/value heads (H_kv divides H), RoPE on q and k. The kernel
is chosen by ``api.attention`` (cuDNN / Pallas / XLA / blockwise by backend and shape) unless a config's
``implementation`` names one. Decoding: ``init_cache(batch, max_length)`` then ``layer(x_chunk, use_cache=True)``
for a prompt chunk or one token at a time; the cache (``layers.kv_cache``) holds exactly the tokens the layer can
still see, and cached decoding equals the full forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers import kv_cache
from layers.kernels.attention.api import IMPLEMENTATIONS, attention, bind_heads
from layers.kernels.attention.fusemax import three_pass
from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow
from research.config import Config, option
from research.models.blocks import dense, rope
from research.models.registry import MixerContext, register_mixer


@dataclasses.dataclass(frozen=True)
class AttentionConfig(Config):
  """Full causal attention (``attn``).

  Attributes:
    implementation: attention kernel (``layers.kernels.attention.api.IMPLEMENTATIONS``), None for the fastest that
      supports the call.
  """

  implementation: str | None = option(None, choices=IMPLEMENTATIONS, resumable=True)

  def pattern(self, ctx: MixerContext) -> Pattern:
    """Who each query of the layer ``ctx`` sees."""
    del ctx
    return Dense(causal=True)


@dataclasses.dataclass(frozen=True)
class WindowConfig(AttentionConfig):
  """Sliding-window attention (``swa``).

  Attributes:
    window: keys each query sees, itself included.
  """

  window: int = option(8192, minimum=1)

  def pattern(self, ctx: MixerContext) -> Pattern:
    del ctx
    return SinkWindow(0, self.window)


@dataclasses.dataclass(frozen=True)
class SinkWindowConfig(AttentionConfig):
  """Attention sinks + sliding window (``sink_window``; defaults: attention spec §3.2).

  Attributes:
    sink: the first ``sink`` tokens, which every query sees.
    window: keys each query sees besides the sinks, itself included.
  """

  sink: int = option(64, minimum=0)
  window: int = option(8192, minimum=1)

  def pattern(self, ctx: MixerContext) -> Pattern:
    del ctx
    return SinkWindow(self.sink, self.window)


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig(AttentionConfig):
  """LongGen / S2-Attention local + strided blocks (``block_sparse``; defaults: attention spec §3.2).

  Attributes:
    block: block size b (tokens).
    local_blocks: the newest L blocks every query sees.
    stride: strided blocks: every s-th older block (per-head offsets spread the residues over heads).
    step: residue step between KV heads; None for the DKernel default.
    offset: residue of KV head 0.
    homo_head: every head uses the same residue.
  """

  block: int = option(64, minimum=1)
  local_blocks: int = option(16, minimum=1)
  stride: int = option(8, minimum=1)
  step: int | None = option(None, minimum=0)
  offset: int = option(0, minimum=0)
  homo_head: bool = False

  def pattern(self, ctx: MixerContext) -> Pattern:
    return bind_heads(BlockSparse(self.block, self.local_blocks, self.stride, self.step, self.offset,
                                  self.homo_head), ctx.num_heads, ctx.kv_heads)


class CausalAttention(nnx.Module):
  """Causal GQA self-attention under a visibility pattern, with a visible-tokens-only KV cache.

  Args:
    ctx: the model around the layer (width, heads, head_dim, RoPE base, dtype, depth for the init scale).
    pattern: who each query sees (``patterns.Dense(causal=True)``, ``SinkWindow`` or a head-bound ``BlockSparse``).
    implementation: attention kernel, None for the fastest available.
    rngs: parameter initialisation randomness.
  """

  def __init__(self, ctx: MixerContext, pattern: Pattern, *, implementation: str | None = None, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads = ctx.num_heads, ctx.kv_heads
    self.head_dim, self.rope_theta = ctx.resolved_head_dim, ctx.rope_theta
    q_dim, kv_dim, dtype = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, ctx.compute_dtype
    self.q_proj = dense(ctx.d_model, q_dim, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
    self.k_proj = dense(ctx.d_model, kv_dim, dtype=dtype, rngs=rngs, axes=("embed", "kv_heads"))
    self.v_proj = dense(ctx.d_model, kv_dim, dtype=dtype, rngs=rngs, axes=("embed", "kv_heads"))
    self.o_proj = dense(q_dim, ctx.d_model, dtype=dtype, rngs=rngs, axes=("heads", "embed"), std=ctx.out_init_std)
    self.pattern, self.implementation, self.cache_dtype = pattern, implementation, dtype
    self.cache: nnx.Dict | None = nnx.data(None)  # made by init_cache

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
    self.cache = kv_cache.init(self.pattern, batch_size, self.num_kv_heads, self.head_dim, max_length,
                               self.cache_dtype)

  def __call__(self, x: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, t, _ = x.shape
    if use_cache and self.cache is None:
      raise ValueError("use_cache=True needs init_cache(batch_size, max_length) first")
    start = self.cache["next_position"][...] if use_cache else 0
    positions = start + jnp.arange(t, dtype=jnp.int32)
    q = rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions, self.rope_theta)
    k = rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions, self.rope_theta)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if use_cache:
      y = self._attend_cached(q, k, v, positions)
    else:
      y = attention(q, k, v, pattern=self.pattern, implementation=self.implementation)
    return self.o_proj(y.reshape(b, t, -1)), {}

  def _attend_cached(self, q, k, v, positions):
    """Queries at ``positions`` over (cached ∪ new) keys with the pattern's mask, then keep the visible ones.

    Costs O(t · (slots + t)) for a chunk of t tokens: meant for decoding and moderate prompt chunks.
    """
    cache = self.cache
    hkv, t = self.num_kv_heads, positions.shape[0]
    k_all = jnp.concatenate([cache["k"][...], jnp.swapaxes(k, 1, 2).astype(self.cache_dtype)], axis=2)
    v_all = jnp.concatenate([cache["v"][...], jnp.swapaxes(v, 1, 2).astype(self.cache_dtype)], axis=2)
    pos_all = jnp.concatenate([cache["positions"][...], jnp.broadcast_to(positions, (hkv, t))], axis=1)
    mask = kv_cache.visible_mask(self.pattern, positions, pos_all)
    y, _ = three_pass(q, jnp.swapaxes(k_all, 1, 2), jnp.swapaxes(v_all, 1, 2), mask)
    cache["next_position"][...] = positions[-1] + 1
    kv_cache.update(self.pattern, cache, k_all, v_all, pos_all)
    return y.astype(q.dtype)


def attention_mixer(cfg: AttentionConfig, ctx: MixerContext, *, rngs: nnx.Rngs) -> CausalAttention:
  """Registry factory of every attention mixer: the config's pattern for this layer, and its kernel choice."""
  return CausalAttention(ctx, cfg.pattern(ctx), implementation=cfg.implementation, rngs=rngs)


register_mixer("attn", config=AttentionConfig)(attention_mixer)
register_mixer("swa", config=WindowConfig)(attention_mixer)
register_mixer("sink_window", config=SinkWindowConfig)(attention_mixer)
register_mixer("block_sparse", config=BlockSparseConfig)(attention_mixer)


def decode_sequence(layer: CausalAttention, x: jax.Array, prompt_length: int) -> jax.Array:
  """Run ``x`` [b, t, d] through a fresh cache: one prompt chunk, then one token at a time. Returns y [b, t, d].

  Equals the full forward ``layer(x)[0]`` because the cache keeps every key a later query can see.
  """
  b, t, _ = x.shape
  layer.init_cache(b, t)
  outputs = [layer(x[:, :prompt_length], use_cache=True)[0]]
  for i in range(prompt_length, t):
    outputs.append(layer(x[:, i:i + 1], use_cache=True)[0])
  return jnp.concatenate(outputs, axis=1)
