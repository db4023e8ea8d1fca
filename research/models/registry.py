"""Registry of sequence mixers, so a model can be assembled from a per-layer spec such as ``"mom,attn,mom"``.

A *mixer* is the token-mixing half of a decoder block (attention, a linear-attention memory, ...). Each entry is
a factory ``factory(config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs) -> nnx.Module`` whose module maps

    mixer(x: Float[Array, "b t d"]) -> (y: Float[Array, "b t d"], aux: dict[str, Float[Array, ""]])

``aux`` holds scalar auxiliary losses (e.g. MoM's load-balancing loss); the training loop adds each one times the
weight ``ModelConfig.aux_loss_weights.get(name, 0.0)`` to the language-modelling loss and logs it. Mixers register
themselves with :func:`register_mixer`; the ``layers`` package is imported on the first lookup so that every
mixer it defines (``"swa"``, ``"mom"``, ...) is available by name without research importing layers eagerly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

MixerFactory = Callable[..., Any]

_MIXERS: dict[str, MixerFactory] = {}
# Packages imported on the first lookup; importing them registers their mixers.
_PLUGIN_PACKAGES = ("layers",)
_plugins_loaded = False


def register_mixer(name: str) -> Callable[[MixerFactory], MixerFactory]:
  """Class/function decorator that makes ``factory`` available under ``name`` in layer specs."""
  if not name.isidentifier():
    raise ValueError(f"mixer name must be an identifier, got {name!r}")

  def decorate(factory: MixerFactory) -> MixerFactory:
    if name in _MIXERS and _MIXERS[name] is not factory:
      raise ValueError(f"mixer {name!r} is already registered to {_MIXERS[name]!r}")
    _MIXERS[name] = factory
    return factory

  return decorate


def _load_plugins() -> None:
  global _plugins_loaded
  if not _plugins_loaded:
    _plugins_loaded = True
    for package in _PLUGIN_PACKAGES:
      importlib.import_module(package)


def available_mixers() -> tuple[str, ...]:
  """Sorted names of every registered mixer."""
  _load_plugins()
  return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> MixerFactory:
  """The factory registered under ``name``; ``KeyError`` naming the allowed values otherwise."""
  _load_plugins()
  try:
    return _MIXERS[name]
  except KeyError:
    raise KeyError(f"unknown layer {name!r}; registered layers: {', '.join(available_mixers())}") from None


def parse_layer_spec(spec: str | Sequence[str]) -> tuple[str, ...]:
  """``"attn, mom,attn"`` or ``["attn", "mom", "attn"]`` -> ``("attn", "mom", "attn")``, each name checked."""
  names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec))
  if not names or any(not n for n in names):
    raise ValueError(f"layer spec must be a comma-separated list of layer names, got {spec!r}")
  for n in names:
    get_mixer(n)
  return names
