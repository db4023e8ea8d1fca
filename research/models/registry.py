"""Registry of sequence mixers, so a model can be assembled from a per-layer spec such as ``"mom,attn,mom"``.

A *mixer* is the token-mixing half of a decoder block (attention, a linear-attention memory, ...). Each entry is
a factory ``factory(config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs) -> nnx.Module`` whose module maps

    mixer(x: Float[Array, "b t d"]) -> (y: Float[Array, "b t d"], aux: dict[str, Float[Array, ""]])

``aux`` holds scalar auxiliary losses (e.g. MoM's load-balancing loss); the training loop adds each one times the
weight ``ModelConfig.aux_loss_weight`` to the language-modelling loss and logs it. Mixers register
themselves with :func:`register_mixer`; the ``layers`` package is imported on the first lookup so that every
mixer it defines (``"swa"``, ``"mom"``, ...) is available by name without research importing layers eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from research.registry import Registry

MixerFactory = Callable[..., Any]

MIXERS: Registry[MixerFactory] = Registry("layer", plugins=("layers",))
register_mixer = MIXERS.register
available_mixers = MIXERS.names
get_mixer = MIXERS.get


def parse_layer_spec(spec: str | Sequence[str]) -> tuple[str, ...]:
  """``"attn, mom,attn"`` or ``["attn", "mom", "attn"]`` -> ``("attn", "mom", "attn")``, each name checked."""
  names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec))
  if not names or any(not n for n in names):
    raise ValueError(f"layer spec must be a comma-separated list of layer names, got {spec!r}")
  for n in names:
    get_mixer(n)
  return names
