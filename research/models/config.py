"""Configuration of the decoder-only language model assembled by :mod:`research.models.transformer`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from research.config import Config, Problem, option, plugin_slot
from research.models.registry import DTYPES, MIXERS, MixerContext


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Config):
  """Shape of a decoder-only LM; ``layers`` names one registered mixer per block, ``mixers`` holds their configs.

  Attributes:
    vocab_size: number of token ids (256 for byte-level language modelling).
    layers: registered mixer of each block, e.g. ``("attn", "attn")`` or ``("mom", "attn", "mom")``.
    d_model: residual stream width D.
    num_heads: query heads H.
    num_kv_heads: key/value heads (H for multi-head, fewer for grouped-query attention); must divide H.
    head_dim: per-head width; None means d_model / num_heads.
    mlp_hidden: SwiGLU hidden width; None means 8/3·D rounded up to a multiple of 64.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: share the input embedding with the output head.
    dtype: compute dtype; parameters are always float32.
    aux_loss_weight: weight of every auxiliary loss a mixer returns (e.g. MoM load balancing).
    mixers: the config of each mixer named in ``layers`` (the mixer's own dataclass, e.g. ``layers.mom.MoMConfig``);
      missing ones take their defaults.
  """

  vocab_size: int = option(256, minimum=2)
  layers: tuple[str, ...] = option(registry=MIXERS)
  d_model: int = option(128, minimum=1)
  num_heads: int = option(4, minimum=1)
  num_kv_heads: int = option(4, minimum=1)
  head_dim: int | None = option(None, minimum=2)
  mlp_hidden: int | None = option(None, minimum=1)
  rope_theta: float = option(10_000.0, minimum=1.0)
  norm_eps: float = option(1e-6, minimum=0.0)
  tie_embeddings: bool = True
  dtype: str = option("float32", choices=tuple(DTYPES))
  aux_loss_weight: float = option(0.01, minimum=0.0)
  mixers: Mapping[str, Any] = plugin_slot("layers")

  def check(self) -> Iterable[Problem]:
    if not self.layers:
      yield Problem("layers", "must name at least one layer")
    if self.num_heads % self.num_kv_heads:
      yield Problem("num_kv_heads", f"({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
    if self.head_dim is None and self.d_model % self.num_heads:
      yield Problem("d_model", f"({self.d_model}) must be divisible by num_heads ({self.num_heads}) unless "
                    "head_dim is given")
    if self.head_dim is not None and self.head_dim % 2:
      yield Problem("head_dim", f"must be a positive even integer for RoPE (got {self.head_dim})")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_mlp_hidden(self) -> int:
    return self.mlp_hidden if self.mlp_hidden is not None else -(-8 * self.d_model // 3 // 64) * 64

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def mixer_context(self, layer_index: int) -> MixerContext:
    """What the mixer of block ``layer_index`` may know about this model."""
    return MixerContext(d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.resolved_head_dim, dtype=self.dtype, rope_theta=self.rope_theta,
                        norm_eps=self.norm_eps, num_layers=len(self.layers), layer_index=layer_index)
