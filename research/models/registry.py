"""Registry of sequence mixers, so a model can be assembled from a per-layer spec such as ``"mom,attn,mom"``.

A *mixer* is the token-mixing half of a decoder block (attention, a linear-attention memory, ...). A plugin registers
a factory with the frozen config dataclass it owns::

    @register_mixer("mom", config=MoMConfig)
    def mom_mixer(cfg: MoMConfig, ctx: MixerContext, *, rngs: nnx.Rngs) -> nnx.Module: ...

``cfg`` is the layer's own config (``ModelConfig.mixers["mom"]``; flags ``--mom.<field>``) and ``ctx`` the model
around the layer (:class:`MixerContext`). The module maps

    mixer(x: Float[Array, "b t d"]) -> (y: Float[Array, "b t d"], aux: dict[str, Float[Array, ""]])

``aux`` holds scalar auxiliary losses (e.g. MoM's load-balancing loss); the training loop adds each one times
``ModelConfig.aux_loss_weight`` to the language-modelling loss and logs it. Mixers that decode incrementally also
have ``init_cache(batch_size, max_length)`` and accept ``use_cache=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from research.models.blocks import INIT_STD
from research.registry import Registry

MixerFactory = Callable[..., Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

MIXERS: Registry[MixerFactory] = Registry("layer")
register_mixer = MIXERS.register
available_mixers = MIXERS.names
get_mixer = MIXERS.get


@dataclasses.dataclass(frozen=True)
class MixerContext:
  """What a mixer may know about the model around it: widths, heads, dtype and its place in the stack.

  Attributes:
    d_model: residual stream width D.
    num_heads: query heads H (memories: heads).
    num_kv_heads: key/value heads (divides H); None means H.
    head_dim: per-head width; None means D / H.
    dtype: compute dtype name (``"float32"`` or ``"bfloat16"``); parameters are float32.
    rope_theta: RoPE base frequency (attention).
    norm_eps: RMSNorm epsilon.
    num_layers: depth of the model (output projections are initialised with std 0.02 / sqrt(2 · depth)).
    layer_index: this layer's index in the stack (schedules such as LongGen's use it).
  """

  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  dtype: str = "float32"
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  num_layers: int = 1
  layer_index: int = 0

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def out_init_std(self) -> float:
    """Init std of projections that write into the residual stream (GPT-2's 1/sqrt(2·depth) scaling)."""
    return INIT_STD / math.sqrt(2 * self.num_layers)


def parse_layer_spec(spec: str | Sequence[str]) -> tuple[str, ...]:
  """``"attn, mom,attn"`` or ``["attn", "mom", "attn"]`` -> ``("attn", "mom", "attn")``, each name checked."""
  names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec))
  if not names or any(not n for n in names):
    raise ValueError(f"layer spec must be a comma-separated list of layer names, got {spec!r}")
  for n in names:
    MIXERS.entry(n)
  return names
