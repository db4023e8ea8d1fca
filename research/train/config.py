"""The run config (:class:`TrainConfig`): core fields only, plus the configs of the chosen optimizer, task and regime.

The optimizer (``--optimizer``), data task (``--task``) and training regime (``--regime``) are plugins chosen by name;
each owns a config dataclass, held in ``plugins`` under its name (flags ``--<name>.<field>``). The model's mixers
likewise live in ``model.mixers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optax

from research.config import Config, Problem, option, plugin_slot
from research.data import TASKS
from research.mesh import parse_mesh
from research.models.config import ModelConfig
from research.optimizers import OPTIMIZERS
from research.registry import Registry

# Training regimes by name: factories (config, run, model, devices) -> research.train.regime.Regime.
REGIMES: Registry[Callable[..., Any]] = Registry("regime")


class TrainError(ValueError):
  """A training run cannot start as configured (bad value, incompatible workdir, unusable data)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
  """One training run. ``model`` is the LM; the rest is data, optimisation and bookkeeping.

  Attributes:
    model: the language model.
    task: registered data task (``research.data``): ``text`` (byte-level LM) or ``mqar`` (associative recall).
    seq_len: tokens per example T.
    batch_size: examples per optimizer step (split over devices, then into ``grad_accum`` micro-batches).
    grad_accum: micro-batches per optimizer step.
    steps: optimizer steps to train for.
    optimizer: registered optimizer (``research.optimizers``; ``optim`` adds GaLore and its variants).
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up steps, then cosine decay to 10% of the peak at ``steps``.
    grad_clip: global-norm gradient clipping threshold; 0 disables clipping.
    regime: registered training regime (``research.train.regime``): how one step updates the state.
    skip_nonfinite: updates with a non-finite loss or gradient that may be skipped (the state is kept) before the
      run stops; 0 stops at the first one.
    init_from: a run folder whose newest intact checkpoint gives the initial parameters (fine-tuning; the model must
      be the same); None initialises from ``seed``.
    eval_every: evaluation period in steps.
    eval_batches: held-out batches per evaluation.
    checkpoint_every: checkpoint period in steps.
    keep_checkpoints: how many checkpoints to keep.
    log_every: steps between progress lines (metrics are pulled to the host only then).
    seed: initialisation and data seed.
    mesh: device mesh, e.g. ``data=8``, ``fsdp=8``, ``data=2,fsdp=4``, ``fsdp=4,tensor=2`` (``research.mesh``: axes
      data, fsdp and tensor, sizes multiplying to the device count, -1 for the rest); a run may resume on another.
    plugins: the configs of the chosen optimizer, task and regime, by name (missing ones take their defaults).
  """

  model: ModelConfig
  task: str = option("text", registry=TASKS)
  seq_len: int = option(128, minimum=1)
  batch_size: int = option(16, minimum=1)
  grad_accum: int = option(1, minimum=1)
  steps: int = option(300, minimum=1)
  optimizer: str = option("adamw", registry=OPTIMIZERS)
  learning_rate: float = option(3e-3, minimum=0.0)
  warmup_steps: int = option(30, minimum=0)
  grad_clip: float = option(1.0, minimum=0.0)
  regime: str = option("first_order", registry=REGIMES)
  skip_nonfinite: int = option(0, minimum=0, resumable=True)
  init_from: str | None = None
  eval_every: int = option(100, minimum=1, resumable=True)
  eval_batches: int = option(8, minimum=1)
  checkpoint_every: int = option(100, minimum=1, resumable=True)
  keep_checkpoints: int = option(3, minimum=1, resumable=True)
  log_every: int = option(10, minimum=1, resumable=True)
  seed: int = option(0, minimum=0)
  mesh: str = option("data=-1", resumable=True)
  plugins: Mapping[str, Any] = plugin_slot("optimizer", "task", "regime")

  def check(self) -> Iterable[Problem]:
    try:
      parse_mesh(self.mesh)
    except ValueError as e:
      yield Problem("mesh", str(e))
    if self.batch_size % self.grad_accum:
      yield Problem("batch_size", f"({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def optimizer_config(self) -> Any:
    return self.plugins[self.optimizer]

  @property
  def task_config(self) -> Any:
    return self.plugins[self.task]

  @property
  def regime_config(self) -> Any:
    return self.plugins[self.regime]


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up to ``cfg.learning_rate``, then cosine decay to 10% of it at ``cfg.steps``."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
                                            end_value=0.1 * cfg.learning_rate)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Gradient clipping (when ``cfg.grad_clip > 0``) followed by the registered optimizer ``cfg.optimizer``."""
  tx = OPTIMIZERS.get(cfg.optimizer)(cfg.optimizer_config, learning_rate_schedule(cfg), cfg.model)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx
