"""Registry of optimizers selectable by name from a training config (``--optimizer adamw``).

A factory ``factory(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation`` builds the
update rule; :func:`make_optimizer` puts global-norm clipping in front. The ``optim`` package is imported on the
first lookup so the optimizers it defines (GaLore, ...) register themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import optax

from research.registry import Registry

if TYPE_CHECKING:
  from research.train import TrainConfig

OptimizerFactory = Callable[["TrainConfig", optax.Schedule], optax.GradientTransformation]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", plugins=("optim",))
register_optimizer = OPTIMIZERS.register
available_optimizers = OPTIMIZERS.names
get_optimizer = OPTIMIZERS.get


def decay_mask(params: Any) -> Any:
  """True for matrices (ndim ≥ 2), False for vectors such as norm weights: only matrices get weight decay."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def learning_rate_schedule(cfg: "TrainConfig") -> optax.Schedule:
  """Linear warm-up to ``cfg.learning_rate``, then cosine decay to 10% of it at ``cfg.steps``."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
                                            end_value=0.1 * cfg.learning_rate)


@register_optimizer("adamw")
def _adamw(cfg: "TrainConfig", schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


@register_optimizer("sgd")
def _sgd(cfg: "TrainConfig", schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.sgd(schedule, momentum=cfg.b1)


def make_optimizer(cfg: "TrainConfig") -> optax.GradientTransformation:
  """Gradient clipping (when ``cfg.grad_clip > 0``) followed by the registered optimizer ``cfg.optimizer``."""
  tx = get_optimizer(cfg.optimizer)(cfg, learning_rate_schedule(cfg))
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx
