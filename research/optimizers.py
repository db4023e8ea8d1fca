"""Registry of optimizers selectable by name from a training config (``--optimizer adamw``).

A factory ``factory(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation`` builds the
update rule; :func:`make_optimizer` puts global-norm clipping in front. The ``optim`` package is imported on the
first lookup so the optimizers it defines (GaLore, ...) register themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import optax

if TYPE_CHECKING:
  from research.train import TrainConfig

OptimizerFactory = Callable[["TrainConfig", optax.Schedule], optax.GradientTransformation]

_OPTIMIZERS: dict[str, OptimizerFactory] = {}
_PLUGIN_PACKAGES = ("optim",)
_plugins_loaded = False


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
  """Decorator registering ``factory`` under ``name``."""

  def decorate(factory: OptimizerFactory) -> OptimizerFactory:
    if name in _OPTIMIZERS and _OPTIMIZERS[name] is not factory:
      raise ValueError(f"optimizer {name!r} is already registered")
    _OPTIMIZERS[name] = factory
    return factory

  return decorate


def _load_plugins() -> None:
  global _plugins_loaded
  if not _plugins_loaded:
    _plugins_loaded = True
    for package in _PLUGIN_PACKAGES:
      importlib.import_module(package)


def available_optimizers() -> tuple[str, ...]:
  _load_plugins()
  return tuple(sorted(_OPTIMIZERS))


def get_optimizer(name: str) -> OptimizerFactory:
  _load_plugins()
  try:
    return _OPTIMIZERS[name]
  except KeyError:
    raise KeyError(f"unknown optimizer {name!r}; registered: {', '.join(available_optimizers())}") from None


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
