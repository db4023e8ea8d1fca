"""``--regime zo_spsa``: zeroth-order training on W workers that exchange one byte per direction.

MeZO-SPSA (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333) on every
worker, with the exchange of Just One Byte (Zelikman et al., "Just One Byte (per gradient): A Note on Low-Bandwidth
Decentralized Language Model Finetuning Using Shared Randomness", arXiv 2306.10015). The workers are the axis
``worker`` of the mesh (one device each; the loop's evaluation, which splits batches over ``data``/``fsdp`` axes,
finds none and runs replicated).
Each holds a full copy of θ and its own examples ([W, B/W, T]); one step (:func:`optim.zo.rounds.zo_round`):

  perturb (θ ± εz, temporaries) → evaluate ``lm_loss`` (forward only) → θ untouched → encode g in one byte per
  direction → ``all_gather`` the bytes over ``worker`` → every worker applies the decoded values in canonical order

so the workers' copies stay bit-identical without ever sending a parameter. The bytes reach the host in the step's
metrics; :meth:`ZOSPSA.record` appends them to the ledger ``<workdir>/zo/ledger.bin`` (:mod:`optim.zo.ledger`)
beside the checkpoints, and the first call also saves the initial parameters (``<workdir>/zo/initial``), so that
``python -m experiments.zo_replay --workdir DIR`` rebuilds the trained parameters bit for bit. Every
``check_every`` rounds (and at the last step) each worker hashes its copy (:func:`optim.zo.digest.tree_digest`)
and the host compares the W hashes: a difference stops the run with one line naming the round and the workers.

The run's estimator settings are those of ``--optimizer mezo_sgd`` (:class:`optim.zo.registry.MeZOConfig`); the
learning rate follows the run's schedule. Workers leave with ``--zo-spsa.departures 3@100`` (worker 3 is absent
from round 100 on): the active mask is a function of the round, recorded per round in the ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from optim.zo.codec import CODECS, get_codec
from optim.zo.digest import digest_hex, tree_digest, tree_digest_reference
from optim.zo.ledger import Ledger, LedgerError, RoundRecord
from optim.zo.rounds import NORMALIZATIONS, STEP_COMPILER_OPTIONS, RoundSpec, check_precision, zo_round
from optim.zo.replay import initial_exists, ledger_header, save_initial
from research.config import Config, Problem, option
from research.optimizers import decay_mask
from research.train.config import TrainError, learning_rate_schedule
from research.train.regime import Regime, register_regime
from research.train.steps import lm_loss

WORKER_AXIS = "worker"
_DEPARTURE = re.compile(r"^(\d+)@(\d+)$")


@dataclasses.dataclass(frozen=True)
class ZOSPSAConfig(Config):
  """Zeroth-order training with one-byte gradients (``zo_spsa``, arXiv 2305.17333 + arXiv 2306.10015).

  Attributes:
    workers: W, workers on the mesh axis ``worker`` (one per device, the first W devices); None: every device.
    codec: wire format of a projected gradient: log8 (1 byte), job9 (2 bytes) or f32 (4 bytes).
    normalize: scale of the summed update: mean (1/N) or sqrt (1/√N), N = active workers × directions.
    check_every: rounds between comparisons of the workers' param_sha256 (0: only at the last step).
    departures: workers that leave, as W@T (worker W is absent from round T on), e.g. 3@100.
  """

  workers: int | None = option(None, minimum=1)
  codec: str = option("log8", choices=tuple(CODECS))
  normalize: str = option("mean", choices=NORMALIZATIONS)
  check_every: int = option(64, minimum=0, resumable=True)
  departures: tuple[str, ...] = ()

  def check(self) -> Iterable[Problem]:
    for item in self.departures:
      if not _DEPARTURE.match(item):
        yield Problem("departures", f"must be entries WORKER@ROUND such as 3@100 (got {item!r})")
      elif self.workers is not None and int(item.split("@")[0]) >= self.workers:
        yield Problem("departures", f"names worker {item.split('@')[0]} of {self.workers} (ids 0..{self.workers - 1})")

  def departure_rounds(self, num_workers: int) -> np.ndarray:
    """int32 [W]: the first round each worker is absent from (2³¹ − 1 for workers that never leave)."""
    rounds = np.full(num_workers, np.iinfo(np.int32).max, np.int32)
    for item in self.departures:
      worker, start = map(int, item.split("@"))
      rounds[worker] = min(rounds[worker], start)
    return rounds


@register_regime("zo_spsa", config=ZOSPSAConfig)
class ZOSPSA(Regime):
  """MeZO-SPSA on a ``worker`` mesh axis with the one-byte exchange and a ledger (module docstring)."""

  def __init__(self, config, run, model, devices=None):
    super().__init__(config, run, model, devices)
    self.num_workers = config.workers or len(self.devices)
    self.optimizer = run.plugins.get("mezo_sgd")
    self._initial: Any = None
    self._ledger: Ledger | None = None

  @property
  def spec(self) -> RoundSpec:
    opt = self.optimizer
    return RoundSpec(eps=opt.eps, num_samples=opt.num_samples, distribution=opt.distribution,
                     codec=self.config.codec, normalize=self.config.normalize, weight_decay=opt.weight_decay)

  @property
  def bytes_per_worker_per_step(self) -> int:
    return self.optimizer.num_samples * get_codec(self.config.codec).num_bytes

  def check_devices(self) -> None:
    run = self.run
    if run.optimizer != "mezo_sgd":
      raise ValueError(f"the zo_spsa regime trains with --optimizer mezo_sgd (got {run.optimizer})")
    if run.grad_clip > 0:
      raise ValueError("the zo_spsa regime has no gradient to clip: pass --grad-clip 0")
    if run.mesh != "data=-1":
      raise ValueError(f"the zo_spsa regime lays its workers out itself (--zo-spsa.workers): drop --mesh {run.mesh}")
    if run.grad_accum != 1:
      raise ValueError(f"the zo_spsa regime takes whole batches: pass --grad-accum 1 (got {run.grad_accum})")
    if self.num_workers > len(self.devices):
      raise ValueError(f"--zo-spsa.workers {self.num_workers} needs as many devices (got {len(self.devices)})")
    if run.batch_size % self.num_workers:
      raise ValueError(f"the batch ({run.batch_size}) must be divisible by the number of workers "
                       f"({self.num_workers})")
    if bad := [d for d in self.config.departures if int(d.split("@")[0]) >= self.num_workers]:
      raise ValueError(f"--zo-spsa.departures names workers beyond the {self.num_workers} workers: {bad}")
    check_precision(self.model.params, self.optimizer.allow_low_precision)

  @functools.cached_property
  def mesh(self) -> Mesh:
    return Mesh(np.asarray(self.devices[:self.num_workers]), (WORKER_AXIS,))

  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def init_state(self, params):
    self._initial = jax.device_get(params)  # saved beside the ledger by the first record() of a new run
    state = {"params": params, "round": np.int32(0), "nonfinite": np.int32(0)}
    return jax.device_put(state, self._replicated())

  def abstract_state(self):
    repl = self._replicated()
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=repl)
    return {"params": jax.tree.map(lambda p: spec(p.shape, p.dtype), self.model.params),
            "round": spec((), jnp.int32), "nonfinite": spec((), jnp.int32)}

  @functools.cached_property
  def step(self) -> Callable:
    repl = self._replicated()
    return jax.jit(self._step_fn(), donate_argnums=(0,), out_shardings=(repl, repl),
                   compiler_options=STEP_COMPILER_OPTIONS)

  def _step_fn(self) -> Callable:
    spec, model, run = self.spec, self.model, self.run
    root = jax.random.key(self.optimizer.seed)
    schedule = learning_rate_schedule(run)
    departures = self.config.departure_rounds(self.num_workers)
    check_every, last_round = self.config.check_every, run.steps - 1
    wd_mask = decay_mask(model.params)

    def worker_round(params, t, lr, active, check, batch):
      local = jax.tree.map(lambda x: x[0], batch)  # this worker's [B/W, T]
      loss_fn = lambda p: lm_loss(model.merge(p), local, run.model.aux_loss_weight)
      gather = lambda codes: jax.lax.all_gather(codes, WORKER_AXIS)
      params, out = zo_round(params, loss_fn, root, t, jax.lax.axis_index(WORKER_AXIS), lr, active, spec, gather,
                             wd_mask)
      digest = jax.lax.cond(check, tree_digest, lambda p: jnp.zeros(8, jnp.uint32), params)
      aux = jax.lax.pmean(out.aux, WORKER_AXIS)
      return params, out.codes, out.nonfinite, jax.lax.all_gather(digest, WORKER_AXIS), aux

    # check_vma=False: the all-gathered codes are the same on every worker, but JAX types an all_gather's output
    # as varying (its invariant form is private); the sha256 comparison checks the replication at run time.
    sharded = jax.shard_map(worker_round, mesh=self.mesh, in_specs=(P(), P(), P(), P(), P(), P(WORKER_AXIS)),
                            out_specs=P(), check_vma=False)

    def step(state, batch):
      t = state["round"]
      lr = jnp.asarray(schedule(t), jnp.float32)
      active = jnp.asarray(departures) > t
      check = (t == last_round) | ((t + 1) % check_every == 0 if check_every else False)
      params, codes, nonfinite, digests, aux = sharded(state["params"], t, lr, active, check, batch)
      metrics = {**aux, "lr": lr, "round": t, "codes": codes, "active": active, "nonfinite": nonfinite,
                 "checked": check, "digests": digests}
      return {"params": params, "round": t + 1, "nonfinite": state["nonfinite"] + nonfinite}, metrics

    return step

  def _batch_shape(self) -> tuple[int, int, int]:
    return self.num_workers, self.run.batch_size // self.num_workers, self.run.seq_len

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """[B, T] host arrays -> [W, B/W, T] global arrays, worker w holding examples w·B/W ... (w + 1)·B/W − 1."""
    shape, sharding = self._batch_shape(), NamedSharding(self.mesh, P(WORKER_AXIS))
    return {k: jax.make_array_from_callback(shape, sharding, lambda index, v=v: v.reshape(shape)[index])
            for k, v in batch.items()}

  def eval_sharding(self) -> jax.sharding.Sharding:
    """Held-out batches split over the workers (each evaluates its share, not the whole set)."""
    return NamedSharding(self.mesh, P(WORKER_AXIS))

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    token = jax.ShapeDtypeStruct(self._batch_shape(), jnp.int32, sharding=NamedSharding(self.mesh, P(WORKER_AXIS)))
    return {"inputs": token, "labels": token}

  def header(self) -> dict[str, Any]:
    """The ledger's header: everything a replay needs besides the initial parameters and the rounds."""
    return ledger_header(self.spec, self.num_workers, self.optimizer.seed)

  def record(self, first_step: int, metrics: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Append the rounds to the ledger (process 0), compare the workers' hashes at check rounds, and return the
    scalar metrics: loss, lr, bytes sent per worker, codes marking non-finite values, active workers."""
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    if self._initial is not None:  # the first call of this session
      has_initial = initial_exists(workdir)
      if jax.process_count() > 1:  # every process must take the same branch: orbax saves collectively
        has_initial = bool(multihost_utils.broadcast_one_to_all(np.int32(has_initial)))
      if not has_initial:
        if first_step > 1:
          raise LedgerError(f"{workdir / 'zo'} holds no initial parameters: this run cannot be replayed")
        save_initial(workdir, self._initial, self.header())
      self._initial = None
    if lead and self._ledger is None:
      self._ledger = Ledger.open(workdir / "zo" / "ledger.bin", self.header())
      print(f"zo_spsa: {self.num_workers} workers x {self.optimizer.num_samples} directions, codec "
            f"{self.config.codec}: {self.bytes_per_worker_per_step} bytes sent per worker per step; ledger "
            f"{self._ledger.path}")
    rows, records = [], []
    for m in metrics:
      active = np.flatnonzero(m["active"])
      records.append(RoundRecord(int(m["round"]), np.float32(m["lr"]), self.config.codec,
                                 tuple(int(w) for w in active), np.asarray(m["codes"])[active]))
      if m["checked"]:
        self._compare_workers(int(m["round"]), np.asarray(m["digests"]), lead)
      scalars = {k: float(v) for k, v in m.items() if k == "loss" or k.startswith("aux/")}
      rows.append({**scalars, "lr": float(m["lr"]), "bytes_sent_per_worker": float(self.bytes_per_worker_per_step),
                   "nonfinite_codes": float(m["nonfinite"]), "active_workers": float(len(active))})
    if lead:
      self._ledger.append(records)
    return rows

  def _compare_workers(self, round_: int, digests: np.ndarray, lead: bool) -> None:
    hexes = [digest_hex(d) for d in digests]
    groups: dict[str, list[int]] = {}
    for worker, h in enumerate(hexes):
      groups.setdefault(h, []).append(worker)
    if len(groups) > 1:
      shown = "; ".join(f"workers {','.join(map(str, ws))} hold {h[:16]}" for h, ws in groups.items())
      raise WorkerDivergence(f"param_sha256 differs across workers after step {round_ + 1} (round {round_}): "
                             f"{shown}")
    if lead:
      print(f"zo check at step {round_ + 1}: param_sha256 {hexes[0]} on all {len(hexes)} workers")

  def summary(self, state) -> dict[str, Any]:
    """``bytes_per_worker_per_step``, ``param_sha256`` (hashlib over each local worker's copy; all must agree),
    the worker count and the codes that marked non-finite values."""
    by_device: dict[Any, list[np.ndarray]] = {}
    for leaf in jax.tree.leaves(state["params"]):
      for shard in leaf.addressable_shards:
        by_device.setdefault(shard.device, []).append(np.asarray(shard.data))
    copies = {str(device): tree_digest_reference(leaves) for device, leaves in by_device.items()}
    if len(set(copies.values())) > 1:
      raise WorkerDivergence(f"the final parameters differ across this process's workers: {copies}")
    return {"bytes_per_worker_per_step": self.bytes_per_worker_per_step,
            "param_sha256": next(iter(copies.values())), "zo_workers": self.num_workers,
            "zo_nonfinite_codes": int(np.asarray(state["nonfinite"].addressable_shards[0].data))}


class WorkerDivergence(TrainError):
  """The workers' copies of the parameters differ: the run cannot continue."""
