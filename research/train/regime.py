"""Training regimes: what one optimisation step does, on which state, and what it saves and reports.

The loop (:mod:`research.train.loop`) is written once: data, progress, evaluation, checkpoints, metrics, resume.
A *regime* plugs into it by name (``--regime first_order``), with its own config (``--<name>.<field>``)::

    @register_regime("zo_spsa", config=ZOConfig)
    class ZOSPSA(Regime): ...

and owns:

* its **mesh** (``self.mesh``): the devices and named axes the step runs over (first-order: one ``data`` axis;
  DiLoCo adds a replica axis);
* its **state** (:meth:`init_state`; its layout :meth:`abstract_state`): one pytree of device arrays (params,
  optimizer state, replicas, ...), all of it checkpointed, and restored by the loop into that layout;
* its **step** (:attr:`step`): a jitted ``(state, batch) -> (state, metrics)`` that donates the state; the loop
  lowers and compiles it once (and prints XLA's memory analysis of it);
* its **batches** (:meth:`place_batch`, :meth:`abstract_batch`): how a host batch [B, T] lands on the mesh;
* what is **evaluated** (:meth:`eval_params`, on batches laid out by :meth:`eval_sharding`) and **reported**
  (:meth:`record` sees the metrics of every step when they reach the host, :meth:`summary` adds entries to
  ``summary.json``).

Metrics are scalars the loop logs and averages; a regime may return other per-step outputs in them and take them
out in :meth:`record` (e.g. the seeds and codes of a zeroth-order step for its ledger). The loop stops at the first
step whose scalar metrics are not finite (before any checkpoint could hold it), unless the regime skipped that
update: a step wrapped by :func:`skip_nonfinite_updates` keeps the old state and reports ``metrics["skipped"] = 1``,
and the run stops only when more than ``run.skip_nonfinite`` updates were skipped.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.mesh import batch_sharded
from research.sharding import logical_axes
from research.train.config import REGIMES, TrainConfig


class SplitModel(NamedTuple):
  """The LM split once for jitted steps: ``params`` is a plain nested dict (arrays, or ShapeDtypeStructs when
  abstract); ``graphdef`` and ``rest`` rebuild the module around any params (``nnx.merge``); ``axes`` holds each
  param's logical axes (``research.sharding``), the same tree as ``params``."""

  graphdef: nnx.GraphDef
  params: Any
  rest: nnx.State
  axes: Any

  def merge(self, params: Any) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)


class Regime(abc.ABC):
  """Base of every training regime (module docstring). Subclasses get ``(config, run, model, devices)``.

  Args:
    config: the regime's own config (``run.plugins[name]``), None for a regime without settings.
    run: the whole run config (model, optimizer, batch, schedule, ...).
    model: the split LM (abstract params when only lowering the step).
    devices: the devices to run on (default: every device of every process).
  """

  def __init__(self, config: Any, run: TrainConfig, model: SplitModel, devices: list[jax.Device] | None = None):
    self.config, self.run, self.model = config, run, model
    self.devices = list(devices) if devices is not None else jax.devices()

  @property
  @abc.abstractmethod
  def mesh(self) -> jax.sharding.Mesh:
    """The devices and named axes of the step."""

  @abc.abstractmethod
  def init_state(self, params: Any) -> Any:
    """The initial state (device arrays on :attr:`mesh`) from freshly initialised params."""

  @property
  @abc.abstractmethod
  def step(self) -> Callable:
    """The jitted ``(state, batch) -> (state, metrics)``; state donated."""

  @abc.abstractmethod
  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch {"inputs", "labels": [B, T]} as the global arrays :attr:`step` takes."""

  @abc.abstractmethod
  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and shardings of :meth:`place_batch`'s output, for lowering without data."""

  @abc.abstractmethod
  def abstract_state(self) -> Any:
    """The state's shapes, dtypes and shardings (``jax.ShapeDtypeStruct``s): the layout a checkpoint is restored
    into, and the inputs the step is lowered on without materialising anything."""

  def check_devices(self) -> None:
    """Raise ``ValueError`` (one line) if the run cannot be laid out on :attr:`devices`."""

  def eval_sharding(self) -> jax.sharding.Sharding:
    """How held-out batches [B, T] are laid out for evaluation (default: split over the mesh's batch axes)."""
    return batch_sharded(self.mesh, 0)

  def eval_params(self, state: Any) -> Any:
    """The params to evaluate (default: ``state["params"]``)."""
    return state["params"]

  def record(self, first_step: int, metrics: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Metrics of steps first_step, first_step + 1, ... on the host; returns the scalar metrics to log."""
    del first_step, workdir
    return metrics

  def summary(self, state: Any) -> dict[str, Any]:
    """Entries the regime adds to ``summary.json``."""
    del state
    return {}


register_regime = REGIMES.register


def skip_nonfinite_updates(step: Callable) -> Callable:
  """``step(state, batch) -> (state, metrics)`` that keeps the old state when any float scalar metric of the new one
  (loss, gradient norm, ...) is not finite, and says so in ``metrics["skipped"]`` (0 or 1, float32).

  The select costs one elementwise pass over the state; the old state's buffers stay donated."""

  def guarded(state, batch):
    new_state, metrics = step(state, batch)
    scalars = [m for m in jax.tree.leaves(metrics) if m.ndim == 0 and jnp.issubdtype(m.dtype, jnp.floating)]
    finite = jnp.all(jnp.stack([jnp.isfinite(m) for m in scalars])) if scalars else jnp.bool_(True)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return kept, {**metrics, "skipped": (~finite).astype(jnp.float32)}

  return guarded


def split_model(model: nnx.Module) -> SplitModel:
  """``model`` as (graphdef, params as a nested dict, everything else)."""
  axes = logical_axes(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return SplitModel(graphdef, nnx.to_pure_dict(params), rest, axes)
