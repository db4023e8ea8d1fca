"""Named run configs (``--config tiny``): a registry that experiment packages fill.

``experiments.configs`` registers memlab's presets (``tiny``, ``gpu``, ``mqar_tiny``, ...) with
``@register_preset("tiny")`` on a function returning a :class:`~research.train.config.TrainConfig`; library code that
needs a preset by name (``memmap extract --config tiny``) looks it up here without importing the experiments.
"""

from __future__ import annotations

from collections.abc import Callable

from research.registry import Registry
from research.train.config import TrainConfig

PRESETS: Registry[Callable[[], TrainConfig]] = Registry("preset")
register_preset = PRESETS.register


def get_preset(name: str) -> TrainConfig:
  """The preset called ``name``; ``KeyError`` listing the registered ones otherwise."""
  return PRESETS.get(name)()
