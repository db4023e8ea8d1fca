"""Training loop: an NNX decoder LM, an optax update, data-parallel over every device, resumable to the bit.

The model is split once into ``(graphdef, params, rest)``; the jitted step takes the params as a plain nested
dict, merges inside, and donates params and optimizer state. A step consumes ``grad_accum`` micro-batches through
``lax.scan``. Batches are pure functions of ``(seed, step)``, and the checkpoint holds params, optimizer state,
step and seed, so a resumed run reproduces the uninterrupted run's loss curve exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import memory
from research.checkpoint import Checkpointer, abstract_like
from research.data import MQARConfig, MQARTask, Task, TextCorpus, TextTask
from research.mesh import batch_sharded, data_mesh, replicated
from research.metrics import MetricWriter, ProgressLine, plot_losses, read_metrics
from research.models import DecoderLM, ModelConfig, parse_layer_spec, token_cross_entropy
from research.optimizers import available_optimizers, make_optimizer

TASKS = ("text", "mqar")
# Config keys that may change when a run is resumed (they do not change what the run computes up to its last step):
# schedules of logging/saving, the step count, and how MoM runs its memories (every dispatch computes the same
# function).
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
                               "model.mom_dispatch"})


class TrainError(ValueError):
  """A training run cannot start as configured (bad value, incompatible workdir, unusable data)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. ``model`` is the LM; the rest is data, optimisation and bookkeeping.

  Attributes:
    task: ``"text"`` (byte-level LM over ``data`` or the Python stdlib) or ``"mqar"`` (associative recall).
    data: text files/folders; empty means the embedded default corpus (the Python standard library's sources).
    seq_len: tokens per example T.
    batch_size: examples per optimizer step (split over devices, then into ``grad_accum`` micro-batches).
    grad_accum: micro-batches per optimizer step.
    steps: optimizer steps to train for.
    optimizer: registered optimizer name (``research.optimizers``).
    learning_rate, warmup_steps, weight_decay, b1, b2, grad_clip: optimisation hyper-parameters
      (grad_clip ≤ 0 disables clipping).
    eval_every, eval_batches: evaluation period (steps) and number of held-out batches.
    checkpoint_every, keep_checkpoints: checkpoint period (steps) and how many to keep.
    log_every: steps between progress lines (metrics are pulled to the host only then).
    mqar_kv_pairs: key-value pairs per MQAR example (vocabulary = ``model.vocab_size``).
    galore_rank, galore_update_proj_gap, galore_scale, natural_galore_history: GaLore / Natural GaLore settings
      (rank None means d_model/4; see ``optim.registry``).
    seed: initialisation and data seed.
  """

  model: ModelConfig = ModelConfig()
  task: str = "text"
  data: tuple[str, ...] = ()
  seq_len: int = 128
  batch_size: int = 16
  grad_accum: int = 1
  steps: int = 300
  optimizer: str = "adamw"
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  mqar_kv_pairs: int = 4
  galore_rank: int | None = None
  galore_update_proj_gap: int = 200
  galore_scale: float = 0.25
  natural_galore_history: int = 20
  seed: int = 0

  def __post_init__(self):
    problems = []
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints", "log_every", "mqar_kv_pairs", "galore_update_proj_gap"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        problems.append(f"{name} must be a positive integer (got {value})")
    if self.galore_rank is not None and self.galore_rank < 1:
      problems.append(f"galore_rank must be a positive integer or None (got {self.galore_rank})")
    if self.natural_galore_history < 0:
      problems.append(f"natural_galore_history must be >= 0 (got {self.natural_galore_history})")
    for name in ("learning_rate", "weight_decay", "warmup_steps", "galore_scale"):
      if getattr(self, name) < 0:
        problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name} must be in [0, 1) (got {getattr(self, name)})")
    if self.task not in TASKS:
      problems.append(f"task must be one of {', '.join(TASKS)} (got {self.task!r})")
    try:
      parse_layer_spec(self.model.layers)
    except (KeyError, ValueError) as e:
      problems.append(str(e).strip("'\""))
    if self.optimizer not in available_optimizers():
      problems.append(f"optimizer must be one of {', '.join(available_optimizers())} (got {self.optimizer!r})")
    if self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size % self.grad_accum:
      problems.append(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
    if problems:
      raise TrainError("; ".join(problems))

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  def mqar_config(self) -> MQARConfig:
    return MQARConfig(vocab_size=self.model.vocab_size, seq_len=self.seq_len, num_kv_pairs=self.mqar_kv_pairs)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def make_task(cfg: TrainConfig) -> Task:
  """The task ``cfg`` asks for, with its data loaded and checked against the model and sequence length."""
  if cfg.task == "mqar":
    try:
      return MQARTask(cfg.mqar_config(), seed=cfg.seed)
    except ValueError as e:
      raise TrainError(f"MQAR: {e}") from None
  if cfg.model.vocab_size < 256:
    raise TrainError(f"the text task needs vocab_size >= 256 for bytes (got {cfg.model.vocab_size})")
  corpus = TextCorpus.load(cfg.data)
  corpus.check_fits(cfg.seq_len)
  return TextTask(corpus, cfg.seq_len, cfg.seed)


# ----------------------------------------------------------------------------------------------------------------
# The step functions.


def _loss_and_metrics(model: DecoderLM, batch: dict[str, jax.Array], aux_weight: float):
  logits, aux = model(batch["inputs"])
  nll_sum, count = token_cross_entropy(logits, batch["labels"])
  lm_loss = nll_sum / jnp.maximum(count, 1)
  total = lm_loss + aux_weight * sum(aux.values(), start=jnp.zeros((), jnp.float32))
  return total, {"loss": lm_loss, **{f"aux/{k}": v for k, v in aux.items()}}


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    aux_weight: float) -> Callable:
  """``step(params, opt_state, batch) -> (params, opt_state, metrics)``; ``batch`` leaves are
  [grad_accum, micro_batch, T] and gradients are averaged over the micro-batches."""

  def micro_grads(params, micro_batch):
    def loss_fn(p):
      return _loss_and_metrics(nnx.merge(graphdef, p, rest), micro_batch, aux_weight)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def step(params, opt_state, batch):
    def accumulate(grad_sum, micro_batch):
      grads, metrics = micro_grads(params, micro_batch)
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, metrics = jax.lax.scan(accumulate, zeros, batch)
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  """``eval_step(params, batch) -> (sum of NLL, scored tokens, correct argmax predictions)``."""

  def eval_step(params, batch):
    logits, _ = nnx.merge(graphdef, params, rest)(batch["inputs"])
    nll_sum, count = token_cross_entropy(logits, batch["labels"])
    scored = batch["labels"] != -100
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["labels"]) & scored)
    return nll_sum, count, correct

  return eval_step


# ----------------------------------------------------------------------------------------------------------------
# Assembly.


@dataclasses.dataclass
class TrainState:
  """Everything that changes during training; ``params`` and ``opt_state`` are device pytrees."""

  step: int
  params: Any
  opt_state: Any


def _split_model(cfg: TrainConfig, *, abstract: bool = False):
  """(graphdef, params as a nested dict, the model's other state); shapes only when ``abstract``."""
  build = lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(cfg.seed))
  try:
    model = nnx.eval_shape(build) if abstract else build()
  except ValueError as e:  # a layer rejected the model config (e.g. a sparse pattern's settings)
    raise TrainError(f"model: {e}") from None
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), rest


def _check_divisible(cfg: TrainConfig, num_devices: int) -> None:
  micro = cfg.batch_size // cfg.grad_accum
  if micro % num_devices:
    raise TrainError(f"the micro-batch (batch_size/grad_accum = {micro}) must be divisible by the number of "
                     f"devices ({num_devices})")


def _to_global(batch: dict[str, np.ndarray], cfg: TrainConfig, sharding) -> dict[str, jax.Array]:
  """[B, T] host arrays -> [grad_accum, B/grad_accum, T] global arrays sharded over the batch dimension."""

  def put(x):
    x = x.reshape(cfg.grad_accum, -1, *x.shape[1:])
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {k: put(v) for k, v in batch.items()}


def abstract_train_inputs(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> tuple[Any, Any, dict[str, Any]]:
  """(params, optimizer state, batch) of ``cfg``'s train step as sharded ``ShapeDtypeStruct`` trees."""
  _check_divisible(cfg, mesh.size)
  _, abstract_params, _ = _split_model(cfg, abstract=True)
  abstract_opt = jax.eval_shape(make_optimizer(cfg).init, abstract_params)
  on_all = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)),
                                     tree)
  token = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.batch_size // cfg.grad_accum, cfg.seq_len), jnp.int32,
                               sharding=batch_sharded(mesh, 1))
  return on_all(abstract_params), on_all(abstract_opt), {"inputs": token, "labels": token}


def _jit_train_step(cfg: TrainConfig, graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> Callable:
  """The jitted train step: params and optimizer state donated, every output replicated over ``mesh``."""
  repl = replicated(mesh)
  return jax.jit(make_train_step(graphdef, rest, tx, cfg.model.aux_loss_weight), donate_argnums=(0, 1),
                 out_shardings=(repl, repl, repl))


def lower_train_step(cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None) -> jax.stages.Lowered:
  """The train step of ``cfg`` lowered on abstract inputs (no data, no parameters materialised)."""
  mesh = mesh or data_mesh()
  graphdef, _, rest = _split_model(cfg, abstract=True)
  return _jit_train_step(cfg, graphdef, rest, make_optimizer(cfg), mesh).lower(*abstract_train_inputs(cfg, mesh))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"model": {"d_model": 128}} -> {"model.d_model": 128}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
  """(key, saved value, value in ``cfg``) for every flattened key of a saved ``config.json`` that ``cfg`` changes,
  ``RESUMABLE_CHANGES`` aside (a key missing on one side counts as None)."""
  saved = _flatten(saved)
  current = _flatten(json.loads(json.dumps(cfg.to_json())))  # tuples -> lists, as saved
  return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
          if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]


def _check_workdir_config(workdir: Path, cfg: TrainConfig) -> None:
  """Refuse to resume a run whose saved config differs in anything but ``RESUMABLE_CHANGES``."""
  path = workdir / "config.json"
  if path.exists():
    if changed := config_changes(json.loads(path.read_text()), cfg):
      shown = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, old, new in changed)
      raise TrainError(f"workdir {workdir} holds a run with a different config ({shown}); "
                       "use a fresh --workdir or the saved settings")
  path.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


def evaluate(eval_step: Callable, params: Any, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Mean held-out loss (nats/token) and accuracy over the scored tokens of ``batches``."""
  totals = np.zeros(3)
  for batch in batches:
    totals += np.asarray(jax.device_get(eval_step(params, batch)), dtype=np.float64)
  nll, count, correct = totals
  return {"loss": nll / max(count, 1), "accuracy": correct / max(count, 1)}


def _count_params(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path, *, mesh: jax.sharding.Mesh | None = None,
                       log: Callable[[str], None] = print) -> dict:
  """Train ``cfg`` in ``workdir`` (resuming from its latest checkpoint), evaluate, and write the run's records.

  ``mesh`` (default: all devices) is the 1-D data-parallel mesh. Writes ``config.json``, ``metrics.jsonl``
  (+ TensorBoard events if tensorboardX is installed), ``checkpoints/``, ``memory.json``, ``loss.png`` and
  ``summary.json``; returns the summary dict.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  task = make_task(cfg)
  mesh = mesh or data_mesh()
  _check_divisible(cfg, mesh.size)
  _check_workdir_config(workdir, cfg)
  repl, data_sharding = replicated(mesh), batch_sharded(mesh, 1)

  graphdef, params, rest = _split_model(cfg)
  tx = make_optimizer(cfg)
  params = jax.device_put(params, repl)
  opt_state = jax.device_put(tx.init(params), repl)
  state = TrainState(step=0, params=params, opt_state=opt_state)

  checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    restored, meta = checkpointer.restore(latest, abstract_like({"params": params, "opt_state": opt_state}))
    if meta.get("seed") != cfg.seed or meta.get("data_position") != latest:
      raise TrainError(f"checkpoint {latest} in {workdir} does not match this run (seed {meta.get('seed')})")
    state = TrainState(step=latest, params=restored["params"], opt_state=restored["opt_state"])
    log(f"resumed from checkpoint at step {latest} in {workdir / 'checkpoints'}")
  else:
    log(f"starting a new run in {workdir}")
  log(f"model: {cfg.model.layers} d_model={cfg.model.d_model} ({_count_params(params) / 1e6:.2f}M params, "
      f"{cfg.model.dtype}) | data: {task.description} | {mesh.size} device(s): {jax.devices()[0].platform}")

  train_step = _jit_train_step(cfg, graphdef, rest, tx, mesh)
  eval_step = jax.jit(make_eval_step(graphdef, rest))
  put = lambda batch: _to_global(batch, cfg, data_sharding)
  compiled = train_step.lower(state.params, state.opt_state, put(task.train_batch(0, cfg.batch_size))).compile()
  mem = memory.memory_report(compiled, "train step")
  (workdir / "memory.json").write_text(json.dumps(mem, indent=2) + "\n")
  log(memory.format_memory_report(mem))

  eval_set = [{k: jax.device_put(v, batch_sharded(mesh, 0)) for k, v in b.items()}
              for b in task.eval_batches(cfg.eval_batches * cfg.grad_accum, cfg.batch_size // cfg.grad_accum)]
  writer = MetricWriter(workdir, resume_step=state.step)
  progress = ProgressLine(cfg.steps, cfg.tokens_per_step)
  pending: list[dict[str, jax.Array]] = []
  eval_metrics: dict[str, float] = {}
  start_time, start_step = time.perf_counter(), state.step
  progress.start(state.step)
  try:
    while state.step < cfg.steps:
      batch = put(task.train_batch(state.step, cfg.batch_size))
      state.params, state.opt_state, metrics = compiled(state.params, state.opt_state, batch)
      state.step += 1
      pending.append(metrics)
      if state.step % cfg.log_every == 0 or state.step == cfg.steps:
        host = jax.device_get(pending)
        for offset, values in enumerate(host):
          writer.write(state.step - len(host) + 1 + offset, "train", values)
        pending = []
        mean = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
        if not all(math.isfinite(v) for v in mean.values()):
          raise FloatingPointError(f"non-finite training metrics at step {state.step}: {mean}")
        shown = {"loss": mean["loss"], **{k: v for k, v in mean.items() if k != "loss"}}
        tokens_per_s = progress.update(state.step, shown)
        writer.write(state.step, "speed", {"tokens_per_s": tokens_per_s})
      if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
        eval_metrics = evaluate(eval_step, state.params, eval_set)
        writer.write(state.step, "eval", eval_metrics)
        log(f"eval at step {state.step}: loss {eval_metrics['loss']:.4f} | accuracy {eval_metrics['accuracy']:.4f}")
      if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
        checkpointer.save(state.step, {"params": state.params, "opt_state": state.opt_state},
                          {"step": state.step, "data_position": state.step, "seed": cfg.seed})
  finally:
    checkpointer.close()
    writer.close()
  if not eval_metrics:  # the run was already complete: report the restored model
    eval_metrics = evaluate(eval_step, state.params, eval_set)
  return _finish(cfg, workdir, eval_metrics, train_seconds=time.perf_counter() - start_time,
                 trained_steps=state.step - start_step, log=log)


def _finish(cfg: TrainConfig, workdir: Path, eval_metrics: dict[str, float], *, train_seconds: float,
            trained_steps: int, log: Callable[[str], None]) -> dict:
  records = read_metrics(workdir / "metrics.jsonl")
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  uniform = math.log(cfg.model.vocab_size)
  summary = {
      "final_step": cfg.steps,
      "final_eval_loss": eval_metrics["loss"],
      "final_eval_accuracy": eval_metrics["accuracy"],
      "final_train_loss": float(np.mean(train_losses[-cfg.log_every:])) if train_losses else None,
      "uniform_loss": uniform,
      "steps_this_session": trained_steps,
      "seconds_this_session": train_seconds,
      "tokens_per_step": cfg.tokens_per_step,
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "device_memory": memory.device_memory(),  # allocator stats incl. peak bytes (GPU/TPU only)
  }
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_losses(records, workdir / "loss.png", title=f"{cfg.task}: {','.join(cfg.model.layers)}",
                reference_loss=uniform)
  log(f"done: step {cfg.steps} | eval loss {eval_metrics['loss']:.4f} (uniform model: {uniform:.4f}) | "
      f"eval accuracy {eval_metrics['accuracy']:.4f} | wrote {workdir / 'summary.json'} and {workdir / 'loss.png'}")
  return summary
