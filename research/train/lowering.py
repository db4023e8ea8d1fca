"""A run's train step lowered on abstract inputs: XLA's buffers of the real program, with nothing materialised.

``memmap extract`` reads the buffer assignment of this program; ``benchmarks/train_step.py`` its memory analysis.
"""

from __future__ import annotations

import jax

from research.train.config import TrainConfig
from research.train.loop import build_model, build_regime


def lower_train_step(cfg: TrainConfig, devices: list[jax.Device] | None = None) -> jax.stages.Lowered:
  """The train step of ``cfg``'s regime over ``devices`` (default: all), lowered on shapes only."""
  regime = build_regime(cfg, build_model(cfg, abstract=True), devices)
  return regime.step.lower(regime.abstract_state(), regime.abstract_batch())
