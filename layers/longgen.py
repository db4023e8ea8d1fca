"""LongGen's hybrid attention schedule (registered mixers ``"longgen"`` and ``"longgen_block"``).

"A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial Contexts" (Ge et al.,
arXiv 2410.01485): KV-reduced attention (attention sink + sliding window, or S2-Attention's local + strided blocks,
arXiv 2407.17678) in the bottom and top thirds of the layers, full attention in the middle third. Each layer is a
``layers.attention.CausalAttention`` whose pattern depends on its index in the stack; decoding keeps, per sparse
layer, only the tokens still visible (``layers.kv_cache``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from layers.attention import BlockSparseConfig, SinkWindowConfig, attention_mixer
from layers.kernels.attention import masks
from layers.kernels.attention.patterns import Dense, Pattern
from research.config import option
from research.models.registry import MixerContext, register_mixer


def full_layer_indices(num_layers: int, full_fraction: float = 1 / 3) -> range:
  """The centred block of ``round(num_layers · full_fraction)`` full-attention layers: 32 -> 10..20, 80 -> 26..52."""
  n_full = min(num_layers, max(0, round(num_layers * full_fraction)))
  start = (num_layers - n_full) // 2
  return range(start, start + n_full)


def longgen_layer_spec(num_layers: int, sparse: str = "sink_window", full: str = "attn") -> tuple[str, ...]:
  """A ``ModelConfig.layers`` spec: ``full`` in the middle third, ``sparse`` elsewhere."""
  middle = full_layer_indices(num_layers)
  return tuple(full if i in middle else sparse for i in range(num_layers))


def kv_fraction(num_layers: int, sequence_length: int, sparse: Pattern, num_kv_heads: int = 1) -> float:
  """KV-cache size of the hybrid stack (``sparse`` outside the middle third) relative to all-full attention at
  ``sequence_length`` tokens (attention spec §3.4)."""
  heads = masks.head_pattern_count(sparse, num_kv_heads)
  kept = np.mean([masks.row_counts(sparse, sequence_length, h)[-1] for h in range(heads)])
  n_full = len(full_layer_indices(num_layers))
  return (n_full + (num_layers - n_full) * kept / sequence_length) / num_layers


@dataclasses.dataclass(frozen=True)
class _HybridSchedule:
  """LongGen's schedule over a sparse attention config: full attention in a centred block of layers.

  Attributes:
    full_fraction: fraction of the whole stack, centred, whose layers are full attention (LongGen: 1/3).
  """

  full_fraction: float = option(1 / 3, minimum=0.0, maximum=1.0)

  def pattern(self, ctx: MixerContext) -> Pattern:
    if ctx.layer_index in full_layer_indices(ctx.num_layers, self.full_fraction):
      return Dense(causal=True)
    return super().pattern(ctx)


@dataclasses.dataclass(frozen=True)
class LongGenConfig(_HybridSchedule, SinkWindowConfig):
  """``longgen``: sink + window layers around a centred block of full-attention layers."""


@dataclasses.dataclass(frozen=True)
class LongGenBlockConfig(_HybridSchedule, BlockSparseConfig):
  """``longgen_block``: local + strided block layers around a centred block of full-attention layers."""


register_mixer("longgen", config=LongGenConfig)(attention_mixer)
register_mixer("longgen_block", config=LongGenBlockConfig)(attention_mixer)
