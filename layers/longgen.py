"""LongGen sparse attention layers and the hybrid schedule (registered mixers ``"swa"``, ``"sink_window"``,
``"block_sparse"``, ``"full_attn"``, ``"longgen"``, ``"longgen_block"``).

"A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial Contexts" (Ge et al.,
arXiv 2410.01485): KV-reduced attention (attention sink + sliding window, or S2-Attention's local + strided
blocks, arXiv 2407.17678) in the bottom and top thirds of the layers, full attention in the middle third.

x [b, t, d] -> (y [b, t, d], {}). Grouped-query attention with RoPE on q and k (``research.models.blocks``); the
kernel is ``layers.kernels.attention.api.attention`` (cuDNN / Pallas block-sparse / blockwise XLA by backend).
Decoding: ``init_cache(batch, max_length)`` then ``layer(x_chunk, use_cache=True)`` for a prompt chunk or one token
at a time; the cache (``layers.kv_cache``) holds exactly the tokens the layer can still see, and cached decoding
equals the full forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import kv_cache
from layers.kernels.attention import masks
from layers.kernels.attention.api import IMPLEMENTATIONS, attention, bind_heads
from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow
from layers.kernels.attention.reference import three_pass
from research.models.attention import GroupedQueryAttention
from research.models.config import ModelConfig
from research.models.registry import register_mixer

PATTERNS = ("full", "sink_window", "block_sparse")


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
  """Visibility pattern of one attention layer (defaults: attention spec §3.2).

  Attributes:
    pattern: ``"full"`` (dense causal), ``"sink_window"`` or ``"block_sparse"``.
    sink: attention-sink tokens S (sink_window).
    window: sliding window W, the current token included (sink_window).
    block, local_blocks, stride, step, offset, homo_head: LongGen/S2-Attention block pattern (block_sparse).
    implementation: attention kernel (``api.IMPLEMENTATIONS``) or None for the fastest available.
  """

  pattern: str = "sink_window"
  sink: int = 64
  window: int = 8192
  block: int = 64
  local_blocks: int = 16
  stride: int = 8
  step: int | None = None
  offset: int = 0
  homo_head: bool = False
  implementation: str | None = None

  def __post_init__(self):
    if self.pattern not in PATTERNS:
      raise ValueError(f"pattern must be one of {PATTERNS} (got {self.pattern!r})")
    if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS} (got {self.implementation!r})")
    self.attention_pattern(1, 1)  # validates the pattern's own fields

  def attention_pattern(self, num_q_heads: int, num_kv_heads: int) -> Pattern:
    if self.pattern == "full":
      return Dense(causal=True)
    if self.pattern == "sink_window":
      return SinkWindow(self.sink, self.window)
    return bind_heads(BlockSparse(self.block, self.local_blocks, self.stride, self.step, self.offset,
                                  self.homo_head), num_q_heads, num_kv_heads)


def full_layer_indices(num_layers: int, full_fraction: float = 1 / 3) -> range:
  """The centred block of ``round(num_layers · full_fraction)`` full-attention layers: 32 -> 10..20, 80 -> 26..52."""
  n_full = min(num_layers, max(0, round(num_layers * full_fraction)))
  start = (num_layers - n_full) // 2
  return range(start, start + n_full)


def longgen_layer_spec(num_layers: int, sparse: str = "sink_window", full: str = "full_attn") -> tuple[str, ...]:
  """A ``ModelConfig.layers`` spec: ``full`` in the middle third, ``sparse`` elsewhere."""
  middle = full_layer_indices(num_layers)
  return tuple(full if i in middle else sparse for i in range(num_layers))


def kv_fraction(num_layers: int, sequence_length: int, cfg: SparseAttentionConfig, num_kv_heads: int = 1) -> float:
  """KV-cache size of the hybrid stack relative to all-full attention at ``sequence_length`` tokens (§3.4)."""
  pattern = cfg.attention_pattern(num_kv_heads, num_kv_heads)
  heads = masks.head_pattern_count(pattern, num_kv_heads)
  kept = np.mean([masks.row_counts(pattern, sequence_length, h)[-1] for h in range(heads)])
  n_full = len(full_layer_indices(num_layers))
  return (n_full + (num_layers - n_full) * kept / sequence_length) / num_layers


class SparseAttention(GroupedQueryAttention):
  """Causal GQA self-attention under a LongGen pattern, with a visible-tokens-only KV cache.

  Args:
    cfg: model shape (d_model, heads, head_dim, rope_theta, dtype, number of layers for the init scale).
    attn: the layer's pattern.
    rngs: parameter initialisation randomness.
  """

  def __init__(self, cfg: ModelConfig, attn: SparseAttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.attn = attn
    self.pattern = attn.attention_pattern(cfg.num_heads, cfg.num_kv_heads)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
    self.cache = kv_cache.init(self.pattern, batch_size, self.num_kv_heads, self.head_dim, max_length,
                               self.cache_dtype)

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return attention(q, k, v, pattern=self.pattern, implementation=self.attn.implementation)

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


def attention_config_from(cfg: ModelConfig, **overrides) -> SparseAttentionConfig:
  """The layer's pattern settings from the model config's ``attn_*`` fields, with ``overrides`` applied."""
  return SparseAttentionConfig(**{
      "sink": cfg.attn_sink, "window": cfg.attn_window, "block": cfg.attn_block,
      "local_blocks": cfg.attn_local_blocks, "stride": cfg.attn_stride,
      "implementation": cfg.attn_implementation, **overrides})


def _mixer(pattern_for_layer):
  def factory(cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs) -> SparseAttention:
    return SparseAttention(cfg, attention_config_from(cfg, **pattern_for_layer(cfg, layer_index)), rngs=rngs)
  return factory


def _scheduled(sparse: str):
  def pattern(cfg: ModelConfig, layer_index: int) -> dict:
    middle = full_layer_indices(len(cfg.layers), cfg.longgen_full_fraction)
    return {"pattern": "full" if layer_index in middle else sparse}
  return pattern


register_mixer("full_attn")(_mixer(lambda cfg, i: {"pattern": "full"}))
register_mixer("swa")(_mixer(lambda cfg, i: {"pattern": "sink_window", "sink": 0}))
register_mixer("sink_window")(_mixer(lambda cfg, i: {"pattern": "sink_window"}))
register_mixer("block_sparse")(_mixer(lambda cfg, i: {"pattern": "block_sparse"}))
register_mixer("longgen")(_mixer(_scheduled("sink_window")))
register_mixer("longgen_block")(_mixer(_scheduled("block_sparse")))


def decode_sequence(layer: SparseAttention, x: jax.Array, prompt_length: int) -> jax.Array:
  """Run ``x`` [b, t, d] through a fresh cache: one prompt chunk, then one token at a time. Returns y [b, t, d].

  Equals the full forward ``layer(x)[0]`` because the cache keeps every key a later query can see.
  """
  b, t, _ = x.shape
  layer.init_cache(b, t)
  outputs = [layer(x[:, :prompt_length], use_cache=True)[0]]
  for i in range(prompt_length, t):
    outputs.append(layer(x[:, i:i + 1], use_cache=True)[0])
  return jnp.concatenate(outputs, axis=1)
