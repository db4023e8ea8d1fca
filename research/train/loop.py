"""The training loop, written once for every regime: data, progress, evaluation, checkpoints, metrics, resume.

The model is split once into (graphdef, params, rest); the run's regime (``research.train.regime``) owns the state
and the jitted step. Batches are pure functions of ``(seed, step)``, and the checkpoint holds the regime's whole
state, the step and the seed, so a resumed run reproduces the uninterrupted run's loss curve exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from research import memory
from research.checkpoint import CheckpointError, Checkpointer, abstract_like
from research.config import from_json, to_json
from research.data import TASKS, CorpusError, Task
from research.mesh import put_global
from research.metrics import MetricWriter, ProgressLine, plot_losses, read_metrics
from research.models import DecoderLM
from research.run_lock import RunLock, WorkdirBusy
from research.train.config import REGIMES, TrainConfig, TrainError
from research.train.records import NonFiniteError, StepRecords
from research.train.regime import Regime, SplitModel, split_model
from research.train.resume import (check_accepted, check_workdir_config, describe_accepted, refused_changes,
                                   write_config)
from research.train.steps import make_eval_step


def make_task(cfg: TrainConfig) -> Task:
  """The task ``cfg`` asks for, with its data loaded and checked against the model and sequence length."""
  try:
    return TASKS.get(cfg.task)(cfg.task_config, seq_len=cfg.seq_len, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
  except CorpusError:
    raise
  except ValueError as e:
    raise TrainError(f"task {cfg.task}: {e}") from None


def build_model(cfg: TrainConfig, *, abstract: bool = False) -> SplitModel:
  """The run's LM split for jitted steps; shapes only (nothing allocated) when ``abstract``."""
  build = lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(cfg.seed))
  try:
    return split_model(nnx.eval_shape(build) if abstract else build())
  except ValueError as e:  # a layer rejected its settings within this model (e.g. a sparse pattern's)
    raise TrainError(f"model: {e}") from None


def build_regime(cfg: TrainConfig, model: SplitModel, devices: list[jax.Device] | None = None) -> Regime:
  """The run's regime over ``devices`` (default: all), its device layout checked."""
  try:
    regime = REGIMES.get(cfg.regime)(cfg.regime_config, cfg, model, devices)
    regime.check_devices()
  except ValueError as e:  # e.g. a mesh that does not fit the devices, a batch that does not split over them
    raise TrainError(str(e)) from None
  return regime


def evaluate(eval_step: Callable, params: Any, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Mean held-out loss (nats/token) and accuracy over the scored tokens of ``batches``."""
  totals = np.zeros(3)
  for batch in batches:
    totals += np.asarray(jax.device_get(eval_step(params, batch)), dtype=np.float64)
  nll, count, correct = totals
  return {"loss": nll / max(count, 1), "accuracy": correct / max(count, 1)}


def _count_params(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _initial_params(cfg: TrainConfig, model: SplitModel, log: Callable[[str], None]) -> Any:
  """``model.params``, or with ``cfg.init_from`` the evaluated params of that run's newest intact checkpoint."""
  if cfg.init_from is None:
    return model.params
  source = Path(cfg.init_from)
  try:
    source_cfg = from_json(TrainConfig, json.loads((source / "config.json").read_text()))
  except (OSError, ValueError) as e:
    raise TrainError(f"--init-from {source}: not a run folder with a readable config.json ({e})") from None
  source_model = build_model(source_cfg, abstract=True)
  shapes = lambda params: jax.tree.map(lambda p: (p.shape, p.dtype), params)
  if shapes(model.params) != shapes(source_model.params):
    raise TrainError(f"--init-from {source}: that run trained another model ({source_cfg.model.layers}, "
                     f"d_model {source_cfg.model.d_model}); fine-tuning needs the same one")
  source_regime = build_regime(source_cfg, source_model)
  restored = Checkpointer(source / "checkpoints", keep=source_cfg.keep_checkpoints).restore_latest(
      abstract_like(source_regime.abstract_state()), log=log)
  if restored is None:
    raise TrainError(f"--init-from {source}: it holds no intact checkpoint")
  step, state, _ = restored
  log(f"initialised from {source} at step {step}")
  return jax.device_get(source_regime.eval_params(state))


def _check_checkpoint_meta(cfg: TrainConfig, accept, step: int, meta: dict[str, Any], where: str) -> list:
  """Refuse a checkpoint of another run (its stored config, seed and data position); returns accepted changes."""
  if meta.get("seed") != cfg.seed or meta.get("data_position") != step:
    raise TrainError(f"checkpoint {step} in {where} does not match this run (seed {meta.get('seed')})")
  return refused_changes(meta["config"], cfg, accept, f"checkpoint {step} in {where}") if "config" in meta else []


def train_and_evaluate(cfg: TrainConfig, workdir: str | Path, *, devices: list[jax.Device] | None = None,
                       accept_changes: Collection[str] = (), log: Callable[[str], None] = print) -> dict:
  """Train ``cfg`` in ``workdir`` (resuming from its newest intact checkpoint), evaluate, and write the run's records.

  ``devices`` (default: all) are handed to the regime, which lays out its mesh over them. ``accept_changes`` names
  run settings (e.g. ``steps``) that may differ from the saved run's (:mod:`research.train.resume`). Nothing is
  created before the config, data and device layout have been checked; one process holds the folder's lock. Writes
  ``config.json`` (after the restore succeeded), ``metrics.jsonl`` (+ TensorBoard events if tensorboardX is
  installed), ``checkpoints/``, ``memory.json``, ``loss.png`` and ``summary.json``; returns the summary dict.
  """
  workdir = Path(workdir)
  check_accepted(accept_changes)
  task = make_task(cfg)
  model = build_model(cfg)
  regime = build_regime(cfg, model, devices)
  lead = jax.process_index() == 0  # only process 0 locks the folder and writes run files
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with RunLock(workdir, log=log) if lead else contextlib.nullcontext():
      return _resume_and_train(cfg, workdir, task, model, regime, accept_changes, log)
  except WorkdirBusy as e:  # only the lock raises it
    raise TrainError(str(e)) from None


def _resume_and_train(cfg: TrainConfig, workdir: Path, task: Task, model: SplitModel, regime: Regime,
                      accept_changes: Collection[str], log: Callable[[str], None]) -> dict:
  """Restore the newest intact checkpoint of ``workdir`` into the regime's layout (or initialise), then train."""
  accepted = check_workdir_config(workdir, cfg, accept_changes)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
  try:
    restored = checkpointer.restore_latest(
        abstract_like(regime.abstract_state()), log=log,
        check_meta=lambda s, meta: accepted.extend(_check_checkpoint_meta(cfg, accept_changes, s, meta, workdir)))
  except CheckpointError as e:
    raise TrainError(str(e)) from None
  if restored is not None:
    step, state, _ = restored
    log(f"resumed from checkpoint at step {step} in {workdir / 'checkpoints'}")
    if accepted:
      log(describe_accepted(list(dict.fromkeys(accepted)), step))
  else:  # initialised only when nothing is restored: a resume never holds two copies of the state
    step, state = 0, regime.init_state(_initial_params(cfg, model, log))
    log(f"starting a new run in {workdir}")
  write_config(workdir, cfg)
  try:
    return _train(cfg, workdir, task, model, regime, state, step, checkpointer, log)
  finally:
    checkpointer.close()


def _train(cfg: TrainConfig, workdir: Path, task: Task, model: SplitModel, regime: Regime, state: Any, step: int,
           checkpointer: Checkpointer, log: Callable[[str], None]) -> dict:
  mesh = regime.mesh
  log(f"model: {cfg.model.layers} d_model={cfg.model.d_model} ({_count_params(model.params) / 1e6:.2f}M params, "
      f"{cfg.model.dtype}) | regime: {cfg.regime} | data: {task.description} | {mesh.size} device(s): "
      f"{jax.devices()[0].platform}")
  compiled = regime.step.lower(state, regime.place_batch(task.train_batch(0, cfg.batch_size))).compile()
  mem = memory.memory_report(compiled, f"train step, per device on mesh {dict(mesh.shape)}")
  if jax.process_index() == 0:
    (workdir / "memory.json").write_text(json.dumps(mem, indent=2) + "\n")
  log(memory.format_memory_report(mem))

  eval_step = jax.jit(make_eval_step(model))
  eval_set = [{k: put_global(v, regime.eval_sharding()) for k, v in b.items()}
              for b in task.eval_batches(cfg.eval_batches * cfg.grad_accum, cfg.batch_size // cfg.grad_accum)]
  writer = MetricWriter(workdir, resume_step=step)
  progress = ProgressLine(cfg.steps, cfg.tokens_per_step)
  records = StepRecords(regime, writer, progress, workdir, cfg.skip_nonfinite)
  eval_metrics: dict[str, float] = {}
  start_time, start_step = time.perf_counter(), step
  progress.start(step)
  try:
    while step < cfg.steps:
      state, metrics = compiled(state, regime.place_batch(task.train_batch(step, cfg.batch_size)))
      step += 1
      records.add(metrics)
      save = step % cfg.checkpoint_every == 0 or step == cfg.steps
      if save or step % cfg.log_every == 0:
        records.flush(step)  # before any checkpoint: a saved state's metrics have been seen and checked
      if step % cfg.log_every == 0 or step == cfg.steps:
        records.log_line(step)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        eval_metrics = evaluate(eval_step, regime.eval_params(state), eval_set)
        writer.write(step, "eval", eval_metrics)
        log(f"eval at step {step}: loss {eval_metrics['loss']:.4f} | accuracy {eval_metrics['accuracy']:.4f}")
      if save:
        checkpointer.save(step, state, {"step": step, "data_position": step, "seed": cfg.seed,
                                        "config": to_json(cfg)})
  except NonFiniteError as e:
    checkpointer.wait()
    last = checkpointer.latest_step()
    raise NonFiniteError(f"{e}; the run stopped, its newest checkpoint is "
                         f"{'step ' + str(last) if last is not None else 'none'} (resume from it with a lower "
                         "--learning-rate, or allow skipped updates with --skip-nonfinite N)") from None
  finally:
    writer.close()
  if not eval_metrics:  # the run was already complete: report the restored model
    eval_metrics = evaluate(eval_step, regime.eval_params(state), eval_set)
  return _finish(cfg, workdir, eval_metrics, regime.summary(state), train_seconds=time.perf_counter() - start_time,
                 trained_steps=step - start_step, log=log)


def _finish(cfg: TrainConfig, workdir: Path, eval_metrics: dict[str, float], regime_summary: dict[str, Any], *,
            train_seconds: float, trained_steps: int, log: Callable[[str], None]) -> dict:
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
      "regime": cfg.regime,
      **regime_summary,
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
