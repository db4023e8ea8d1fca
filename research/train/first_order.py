"""The first-order regime (``--regime first_order``, the default): backprop gradients and an optax update.

A step consumes ``grad_accum`` micro-batches through ``lax.scan`` and averages their gradients, then applies the
run's optimizer (``research.train.config.make_optimizer``); with ``--skip-nonfinite N`` an update whose loss or
gradient is not finite is skipped (``research.train.regime.skip_nonfinite_updates``). It runs over the run's named
mesh (``--mesh``, ``research.mesh``): the batch is split over ``data`` x ``fsdp``; parameters are laid out by their
logical axes (``research.sharding``: replicated over ``data``, sharded over ``fsdp`` and ``tensor``) and the optimizer
state follows them; XLA's SPMD partitioner inserts the all-gathers, reduce-scatters and all-reduces.
State ``{"params", "opt_state"}`` is donated, so a step updates it in place. Batches are pure functions of
(seed, step), so a run resumed from a checkpoint reproduces the uninterrupted run's loss curve exactly on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.mesh import batch_axes, batch_sharded, named_mesh, put_global, replicated
from research.sharding import follow_params, named, param_specs
from research.train.config import make_optimizer
from research.train.regime import Regime, SplitModel, register_regime, skip_nonfinite_updates
from research.train.steps import lm_loss


def make_train_step(model: SplitModel, tx: optax.GradientTransformation, aux_weight: float) -> Callable:
  """``step(state, batch) -> (state, metrics)`` with state {"params", "opt_state"}; ``batch`` leaves are
  [grad_accum, micro_batch, T] and gradients are averaged over the micro-batches."""

  def micro_grads(params, micro_batch):
    loss = lambda p: lm_loss(model.merge(p), micro_batch, aux_weight)
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, metrics

  def step(state, batch):
    params = state["params"]

    def accumulate(grad_sum, micro_batch):
      grads, metrics = micro_grads(params, micro_batch)
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, metrics = jax.lax.scan(accumulate, zeros, batch)
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}, metrics

  return step


@register_regime("first_order")
class FirstOrder(Regime):
  """Backprop + optax over a (data, fsdp, tensor) mesh (module docstring)."""

  def __init__(self, config, run, model, devices=None):
    super().__init__(config, run, model, devices)
    self.tx = make_optimizer(run)
    self._mesh = named_mesh(run.mesh, self.devices)
    specs = param_specs(model.axes, model.params, self._mesh)
    self._opt_shapes = jax.eval_shape(self.tx.init, model.params)
    opt_specs = follow_params(self._opt_shapes, model.params, specs)
    self.shardings = {"params": named(specs, self._mesh), "opt_state": named(opt_specs, self._mesh)}

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self._mesh

  def check_devices(self) -> None:
    micro, splits = self.run.batch_size // self.run.grad_accum, math.prod(self.mesh.shape[a] for a in
                                                                           batch_axes(self.mesh))
    if micro % splits:
      raise ValueError(f"the micro-batch (batch_size/grad_accum = {micro}) must be divisible by the devices it is "
                       f"split over ({' x '.join(batch_axes(self.mesh))} = {splits})")

  def init_state(self, params):
    params = jax.tree.map(put_global, params, self.shardings["params"])
    return {"params": params, "opt_state": jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params)}

  def abstract_state(self):
    shapes = {"params": self.model.params, "opt_state": self._opt_shapes}
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes,
                        self.shardings)

  @functools.cached_property
  def step(self) -> Callable:
    step = make_train_step(self.model, self.tx, self.run.model.aux_loss_weight)
    if self.run.skip_nonfinite:
      step = skip_nonfinite_updates(step)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(self.shardings, replicated(self.mesh)))

  def _micro_batched_shape(self) -> tuple[int, int, int]:
    run = self.run
    return run.grad_accum, run.batch_size // run.grad_accum, run.seq_len

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """[B, T] host arrays -> [grad_accum, B/grad_accum, T] global arrays split over the batch axes."""
    sharding, shape = batch_sharded(self.mesh, 1), self._micro_batched_shape()
    return {k: put_global(v.reshape(shape), sharding) for k, v in batch.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    token = jax.ShapeDtypeStruct(self._micro_batched_shape(), jnp.int32, sharding=batch_sharded(self.mesh, 1))
    return {"inputs": token, "labels": token}
