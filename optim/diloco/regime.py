"""The ``diloco`` training regime: M replicas on a ``diloco`` mesh axis, each data parallel over its own ``data`` axis.

``--regime diloco`` runs (Streaming) DiLoCo (:mod:`optim.diloco.streaming`; "DiLoCo", arXiv:2311.08105;
"Streaming DiLoCo with overlapping communication", arXiv:2501.18512) in the shared training loop. The regime lays
its devices out as a mesh [M, D] with axes (``diloco``, ``data``) and runs the step in ``shard_map`` manual over
both: the batch [grad_accum, B/grad_accum, T] is split over M·D devices (replica m trains on its B/M examples),
gradients are averaged over ``data`` only, and the run's ``--optimizer`` (clipping in front) is each replica's
inner optimizer. The only traffic between replicas is each fragment's Δ (and the scalar metrics the loop logs).

State (one pytree, checkpointed and restored by the loop: a dict of ``DiLoCoState``'s fields): ``count``,
``global_params``, ``outer_states`` and ``inflight_fragment`` replicated (every device holds, and checks, its own
copy); ``local``, ``inner_state`` and ``inflight`` stacked [M, ...] over ``diloco``. Replicas start identical
(checked in :meth:`DiLoCoRegime.init_state`: a process that initialised other params stops the run) and after every
merge the merged fragment's global params and outer state are compared across all devices by fingerprint
(:meth:`record` stops the run on a mismatch). Evaluation reads the global (outer) params, as the paper does
(arXiv:2501.18512 Table 3).

Bytes: per sync of fragment p each replica sends 2(M−1)/M of the encoded Δ_p (``optim.diloco.wire``); data
parallelism over the same M groups would send 2(M−1)/M·4|Θ| bytes of float32 gradients every step. ``record`` prints
each sync's bytes, ``summary`` writes both totals.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from optim.diloco.fragments import PATTERNS, FragmentPlan, SyncSchedule
from optim.diloco.streaming import DiLoCo, DiLoCoState, outer_sgd, replicas_agree
from optim.diloco.wire import FORMATS, get_format, wire_bytes
from research.config import Config, Problem, option
from research.mesh import DATA_AXIS, put_global
from research.train.config import TrainError, make_optimizer
from research.train.first_order import make_train_step
from research.train.regime import Regime, register_regime

REPLICA_AXIS = "diloco"
_PER_REPLICA = ("local", "inner_state", "inflight")  # DiLoCoState fields stacked over the replicas


@dataclasses.dataclass(frozen=True)
class DiLoCoConfig(Config):
  """(Streaming) DiLoCo (arXiv:2311.08105, arXiv:2501.18512): M replicas, outer step on the mean Δ every H steps.

  Attributes:
    replicas: M, model replicas (the device count must be a multiple; each replica is data parallel over the rest).
    sync_every: H, inner steps between two syncs of the same fragment.
    fragments: P, parameter fragments synced in turn, one every H/P steps (1: vanilla DiLoCo).
    pattern: how layers map to fragments: strided (layer mod P) or sequential (contiguous blocks).
    overlap_steps: τ, inner steps a fragment's Δ is in flight before its merge (0: sync at once).
    alpha: α, the local share kept at a merge, local ← α·local + (1−α)·global (0: replace).
    wire: the format Δ is sent in: fp32, bf16, int8, fp8_e4m3, e2m1 or e3m0 (4-bit), with row-wise fp32 scales.
    row_size: elements per row of Δ on the wire (one fp32 scale per row for the scaled formats).
    outer_learning_rate: the outer SGD learning rate.
    outer_momentum: the outer SGD momentum (0 for none).
    nesterov: use Nesterov momentum in the outer step.
  """

  replicas: int = option(2, minimum=1)
  sync_every: int = option(100, minimum=1)
  fragments: int = option(1, minimum=1)
  pattern: str = option("strided", choices=PATTERNS)
  overlap_steps: int = option(0, minimum=0)
  alpha: float = option(0.0, minimum=0.0, maximum=1.0)
  wire: str = option("fp32", choices=tuple(FORMATS))
  row_size: int = option(128, minimum=2)
  outer_learning_rate: float = option(0.7, minimum=0.0)
  outer_momentum: float = option(0.9, minimum=0.0, below=1.0)
  nesterov: bool = True

  def check(self) -> Iterable[Problem]:
    if self.sync_every % self.fragments:
      yield Problem("sync_every", f"must be divisible by fragments ({self.fragments}) (got {self.sync_every})")
    elif self.overlap_steps >= self.sync_every // self.fragments:
      yield Problem("overlap_steps", f"must be < sync_every/fragments = {self.sync_every // self.fragments} "
                    f"(got {self.overlap_steps})")
    if self.row_size % 2:
      yield Problem("row_size", f"must be even (two 4-bit codes per byte) (got {self.row_size})")

  @property
  def schedule(self) -> SyncSchedule:
    return SyncSchedule(self.sync_every, self.fragments, self.overlap_steps)


def _mean_over(axis_name: str) -> optax.GradientTransformation:
  """Average the gradients over ``axis_name`` (inside shard_map): the data-parallel reduction within a replica."""
  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda updates, state, params=None: (jax.lax.pmean(updates, axis_name), state))


@register_regime("diloco", config=DiLoCoConfig)
class DiLoCoRegime(Regime):
  """(Streaming) DiLoCo over a (diloco, data) mesh (module docstring)."""

  config: DiLoCoConfig

  @property
  def replicas(self) -> int:
    return self.config.replicas

  @property
  def data_size(self) -> int:
    return len(self.devices) // self.replicas

  def check_devices(self) -> None:
    if self.run.mesh != "data=-1":
      raise ValueError(f"regime diloco lays out its own (diloco, data) mesh from --diloco.replicas; leave --mesh at "
                       f"data=-1 (got {self.run.mesh})")
    if self.run.skip_nonfinite:  # a skipped step would hold back the step count the sync schedule runs on
      raise ValueError(f"regime diloco does not skip updates; --skip-nonfinite must be 0 (got "
                       f"{self.run.skip_nonfinite})")
    if len(self.devices) % self.replicas:
      raise ValueError(f"regime diloco: {self.replicas} replicas need a device count divisible by "
                       f"{self.replicas} (got {len(self.devices)}); on CPU run with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={self.replicas * 2}")
    micro = self.run.batch_size // self.run.grad_accum
    if micro % len(self.devices):
      raise ValueError(f"the micro-batch (batch_size/grad_accum = {micro}) must be divisible by the number of "
                       f"devices ({len(self.devices)} = {self.replicas} replicas x {self.data_size})")
    self.plan  # noqa: B018  (raises for more fragments than layers)

  @functools.cached_property
  def mesh(self) -> Mesh:
    return Mesh(np.asarray(self.devices).reshape(self.replicas, self.data_size), (REPLICA_AXIS, DATA_AXIS))

  @functools.cached_property
  def plan(self) -> FragmentPlan:
    return FragmentPlan.build(self.model.params, self.config.fragments, pattern=self.config.pattern,
                              row_size=self.config.row_size, replicas=self.replicas)

  @functools.cached_property
  def algorithm(self) -> DiLoCo:
    cfg = self.config
    return DiLoCo(outer=outer_sgd(cfg.outer_learning_rate, cfg.outer_momentum, cfg.nesterov), plan=self.plan,
                  schedule=cfg.schedule, alpha=cfg.alpha, wire=get_format(cfg.wire), axis_name=REPLICA_AXIS,
                  replicas=self.replicas, check_axes=(REPLICA_AXIS, DATA_AXIS))

  @functools.cached_property
  def inner(self) -> optax.GradientTransformation:
    """Each replica's inner optimizer: the gradient mean over ``data``, then the run's optimizer."""
    return optax.chain(_mean_over(DATA_AXIS), make_optimizer(self.run))

  # -- layout ---------------------------------------------------------------------------------------------------

  # The state crosses the jit boundary as a dict of DiLoCoState's fields: orbax stores a NamedTuple as a dict with
  # sorted keys, so a dict keeps the saved and the restored leaf order the same.

  def _specs(self, state: dict[str, Any]) -> dict[str, Any]:
    """PartitionSpecs of every leaf: per-replica fields over ``diloco``, the rest replicated."""
    return {name: jax.tree.map(lambda _: P(REPLICA_AXIS) if name in _PER_REPLICA else P(), value)
            for name, value in state.items()}

  def _sharded(self, fn: Callable, in_specs: Any, out_specs: Any, *, takes_state: bool = True) -> Callable:
    """``fn(state or params, *args) -> (DiLoCoState, extra)`` per device over the whole mesh; the state travels as
    a dict whose per-replica fields carry their [1] slice of the replica axis."""
    def per_device(first, *args):
      if takes_state:
        first = DiLoCoState(**_map_fields(first, lambda x: x[0]))
      state, extra = fn(first, *args)
      return _map_fields(state._asdict(), lambda x: x[None]), extra

    return jax.shard_map(per_device, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

  @functools.cached_property
  def _abstract(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shapes of one device's state, the specs of the global state)."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.model.params)
    local = jax.eval_shape(lambda p: self.algorithm.init(p, self.inner.init(p)), params)._asdict()
    return local, self._specs(local)

  def abstract_state(self) -> dict[str, Any]:
    local, specs = self._abstract

    def global_shape(name):
      def leaf(x, spec):
        shape = (self.replicas, *x.shape) if name in _PER_REPLICA else x.shape
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(self.mesh, spec))
      return leaf

    return {name: jax.tree.map(global_shape(name), local[name], specs[name]) for name in local}

  # -- state ----------------------------------------------------------------------------------------------------

  @functools.cached_property
  def _init(self) -> Callable:
    _, specs = self._abstract

    def init(params):
      state = self.algorithm.init(params, self.inner.init(params))
      everything = (state.global_params, state.outer_states, state.local, state.inner_state)
      return state, replicas_agree(everything, (REPLICA_AXIS, DATA_AXIS))

    return jax.jit(self._sharded(init, P(), (specs, P()), takes_state=False))

  def init_state(self, params: Any) -> dict[str, Any]:
    """Every device's copy of ``params`` (each process supplies its own) becomes its replica's start; raises
    ``TrainError`` if the copies differ (e.g. processes initialised with different seeds)."""
    repl = NamedSharding(self.mesh, P())
    # a leaf already replicated on this mesh is taken as is (each device's own buffer), a host value is placed by
    # each process from its own copy
    placed = jax.tree.map(lambda x: x if isinstance(x, jax.Array) and x.sharding == repl else put_global(x, repl),
                          params)
    state, agree = self._init(placed)
    if not bool(agree):
      raise TrainError("regime diloco: the replicas were initialised with different parameters (every process "
                       "must build the same initial params: same seed, same code)")
    return state

  @functools.cached_property
  def step(self) -> Callable:
    _, specs = self._abstract
    train_step = make_train_step(self.model, self.inner, self.run.model.aux_loss_weight)

    def step(state: DiLoCoState, batch):
      def inner_step(local, inner_state):
        new, metrics = train_step({"params": local, "opt_state": inner_state}, batch)
        return new["params"], new["opt_state"], metrics

      state, metrics = self.algorithm.step(state, inner_step)
      floats = {k: jax.lax.pmean(v, (REPLICA_AXIS, DATA_AXIS)) for k, v in metrics.items()
                if jnp.issubdtype(v.dtype, jnp.floating)}
      return state, {**metrics, **floats}

    return jax.jit(self._sharded(step, (specs, self._batch_spec), (specs, P())), donate_argnums=(0,))

  # -- batches --------------------------------------------------------------------------------------------------

  _batch_spec = P(None, (REPLICA_AXIS, DATA_AXIS))

  def _micro_batched_shape(self) -> tuple[int, int, int]:
    run = self.run
    return run.grad_accum, run.batch_size // run.grad_accum, run.seq_len

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """[B, T] host arrays -> [grad_accum, B/grad_accum, T], replica m taking rows m·B/M ... of each micro-batch."""
    sharding, shape = NamedSharding(self.mesh, self._batch_spec), self._micro_batched_shape()
    return {k: jax.make_array_from_callback(shape, sharding, lambda index, x=v.reshape(shape): x[index])
            for k, v in batch.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    token = jax.ShapeDtypeStruct(self._micro_batched_shape(), jnp.int32,
                                 sharding=NamedSharding(self.mesh, self._batch_spec))
    return {"inputs": token, "labels": token}

  # -- evaluation and reports -----------------------------------------------------------------------------------

  def eval_params(self, state: dict[str, Any]) -> Any:
    return state["global_params"]

  def sync_bytes(self, step: int) -> int:
    """Bytes each replica sends during ``step`` (the reduction of a fragment's Δ, or nothing)."""
    fragment = self.config.schedule.reduced(step)
    if fragment < 0:
      return 0
    return wire_bytes(self.plan.rows[fragment], self.plan.row_size, self.algorithm.wire, self.replicas)

  def total_bytes(self, steps: int) -> int:
    """Bytes each replica sends in steps 1..``steps``."""
    period = self.config.schedule.period
    lag = max(self.config.overlap_steps - 1, 0)  # a reduction happens ``lag`` steps before its merge
    return sum(self.sync_bytes(merge - lag) for merge in range(period, steps + lag + 1, period))

  def data_parallel_bytes(self, steps: int, bits: int = 32) -> int:
    """Bytes each of the M groups would send in ``steps`` data-parallel steps: a ring all-reduce of the gradient."""
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.model.params))
    return steps * 2 * (self.replicas - 1) * params * bits // 8 // self.replicas

  @property
  def peak_sync_bytes(self) -> int:
    """Bytes each replica sends for the largest fragment (one sync)."""
    return max(wire_bytes(r, self.plan.row_size, self.algorithm.wire, self.replicas) for r in self.plan.rows)

  def record(self, first_step: int, metrics: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Checks each step's sync against the schedule and the replicas' agreement, prints each sync's bytes, and
    logs ``sent_bytes`` (bytes each replica sent in that step)."""
    del workdir
    rows, schedule = [], self.config.schedule
    for step, values in enumerate(metrics, start=first_step):
      values = dict(values)
      fragment, agree = int(values.pop("synced_fragment")), bool(values.pop("replicas_agree"))
      if fragment != schedule.merged(step):
        raise TrainError(f"regime diloco: step {step} merged fragment {fragment}, the schedule says "
                         f"{schedule.merged(step)}")
      if not agree:
        raise TrainError(f"regime diloco: after the sync of fragment {fragment} at step {step} the replicas' global "
                         "params or outer state differ")
      values["sent_bytes"] = float(self.sync_bytes(step))
      if fragment >= 0 and jax.process_index() == 0:
        lag = max(self.config.overlap_steps - 1, 0)
        print(f"diloco sync after step {step}: fragment {fragment}/{self.plan.fragments}, "
              f"{_size(self.sync_bytes(step - lag))} per replica ({self.config.wire}); "
              f"{_size(self.total_bytes(step))} in total (data parallel: {_size(self.data_parallel_bytes(step))})")
      rows.append(values)
    return rows

  def summary(self, state: dict[str, Any]) -> dict[str, Any]:
    steps = int(jax.device_get(state["count"]))
    ours, dp = self.total_bytes(steps), self.data_parallel_bytes(steps)
    cfg = self.config
    return {
        "bytes_per_replica_total": ours,
        "data_parallel_bytes_per_replica_total": dp,
        "data_parallel_bf16_bytes_per_replica_total": self.data_parallel_bytes(steps, bits=16),
        "bytes_reduction_vs_data_parallel": dp / ours if ours else None,
        "diloco": {"replicas": self.replicas, "data_parallel": self.data_size, "sync_every": cfg.sync_every,
                   "fragments": cfg.fragments, "overlap_steps": cfg.overlap_steps, "alpha": cfg.alpha,
                   "wire": cfg.wire, "fragment_params": list(self.plan.sizes()),
                   "fragment_rows": list(self.plan.rows), "peak_bytes_per_sync": self.peak_sync_bytes},
    }


def _map_fields(state: dict[str, Any], fn: Callable) -> dict[str, Any]:
  """``fn`` on every leaf of the per-replica fields."""
  return {name: jax.tree.map(fn, value) if name in _PER_REPLICA else value for name, value in state.items()}


def _size(num_bytes: int) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes} B"
