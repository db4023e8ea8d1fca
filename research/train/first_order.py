"""The first-order regime (``--regime first_order``, the default): backprop gradients and an optax update.

A step consumes ``grad_accum`` micro-batches through ``lax.scan`` and averages their gradients, then applies the
run's optimizer (``research.train.config.make_optimizer``); with ``--skip-nonfinite N`` an update whose loss or
gradient is not finite is skipped (``research.train.regime.skip_nonfinite_updates``). Data parallel over a 1-D
``data`` mesh of every device: the batch is split over it, params and optimizer state are replicated, and XLA
inserts the gradient all-reduce.
State ``{"params", "opt_state"}`` is donated, so a step updates it in place. Batches are pure functions of
(seed, step), so a run resumed from a checkpoint reproduces the uninterrupted run's loss curve exactly on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.mesh import batch_sharded, data_mesh, replicated
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
  """Backprop + optax, data parallel (module docstring)."""

  def __init__(self, config, run, model, devices=None):
    super().__init__(config, run, model, devices)
    self.tx = make_optimizer(run)
    self._mesh = data_mesh(self.devices)

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self._mesh

  def check_devices(self) -> None:
    micro = self.run.batch_size // self.run.grad_accum
    if micro % self.mesh.size:
      raise ValueError(f"the micro-batch (batch_size/grad_accum = {micro}) must be divisible by the number of "
                       f"devices ({self.mesh.size})")

  def init_state(self, params):
    repl = replicated(self.mesh)
    params = jax.device_put(params, repl)
    return {"params": params, "opt_state": jax.device_put(self.tx.init(params), repl)}

  def abstract_state(self):
    repl = replicated(self.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), super().abstract_state())

  @functools.cached_property
  def step(self) -> Callable:
    repl = replicated(self.mesh)
    step = make_train_step(self.model, self.tx, self.run.model.aux_loss_weight)
    if self.run.skip_nonfinite:
      step = skip_nonfinite_updates(step)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))

  def _micro_batched_shape(self) -> tuple[int, int, int]:
    run = self.run
    return run.grad_accum, run.batch_size // run.grad_accum, run.seq_len

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """[B, T] host arrays -> [grad_accum, B/grad_accum, T] global arrays split over the data axis."""
    sharding, shape = batch_sharded(self.mesh, 1), self._micro_batched_shape()

    def put(x):
      x = x.reshape(shape)
      return jax.make_array_from_callback(shape, sharding, lambda index: x[index])

    return {k: put(v) for k, v in batch.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    token = jax.ShapeDtypeStruct(self._micro_batched_shape(), jnp.int32, sharding=batch_sharded(self.mesh, 1))
    return {"inputs": token, "labels": token}
