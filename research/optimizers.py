"""Registry of optimizers selectable by name from a training config (``--optimizer adamw``), and the two plain ones.

A plugin registers a factory with the frozen config dataclass it owns::

    @register_optimizer("galore", config=GaLoreConfig)
    def galore_optimizer(cfg: GaLoreConfig, schedule: optax.Schedule, model: ModelConfig)
        -> optax.GradientTransformation: ...

``cfg`` is ``TrainConfig.plugins[<name>]`` (flags ``--<name>.<field>``), ``schedule`` the run's learning-rate
schedule and ``model`` the LM it trains (e.g. for a rank relative to d_model). The training loop puts global-norm
clipping in front (``research.train.config.make_optimizer``). ``optim`` registers GaLore and its variants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from research.config import Config, option
from research.models.config import ModelConfig
from research.registry import Registry

OptimizerFactory = Callable[[Any, optax.Schedule, ModelConfig], optax.GradientTransformation]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
register_optimizer = OPTIMIZERS.register
available_optimizers = OPTIMIZERS.names
get_optimizer = OPTIMIZERS.get


def decay_mask(params: Any) -> Any:
  """True for matrices (ndim ≥ 2), False for vectors such as norm weights: only matrices get weight decay."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class AdamWConfig(Config):
  """AdamW ("Decoupled Weight Decay Regularization", arXiv 1711.05101), decay on matrices only (``adamw``).

  Attributes:
    b1: first-moment decay.
    b2: second-moment decay.
    weight_decay: decoupled weight decay (times the learning rate), applied to matrices only.
  """

  b1: float = option(0.9, minimum=0.0, below=1.0)
  b2: float = option(0.95, minimum=0.0, below=1.0)
  weight_decay: float = option(0.1, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class SGDConfig(Config):
  """SGD with heavy-ball momentum (``sgd``).

  Attributes:
    momentum: momentum coefficient (0 for plain SGD).
  """

  momentum: float = option(0.9, minimum=0.0, below=1.0)


@register_optimizer("adamw", config=AdamWConfig)
def _adamw(cfg: AdamWConfig, schedule: optax.Schedule, model: ModelConfig) -> optax.GradientTransformation:
  del model
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


@register_optimizer("sgd", config=SGDConfig)
def _sgd(cfg: SGDConfig, schedule: optax.Schedule, model: ModelConfig) -> optax.GradientTransformation:
  del model
  return optax.sgd(schedule, momentum=cfg.momentum)
