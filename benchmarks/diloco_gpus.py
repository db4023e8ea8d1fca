"""DP vs DiLoCo vs Streaming DiLoCo with one replica per GPU: eval loss vs steps, bytes, communication time.

Papers: "DiLoCo: Distributed Low-Communication Training of Language Models" (arXiv:2311.08105); "Streaming DiLoCo
with overlapping communication: Towards a Distributed Free Lunch" (arXiv:2501.18512, Table 1: M = 2 replicas).

Model (larger than ``tiny``; flags change it): 8 attention layers, d_model 512, 8 heads, float32 params and bf16
compute (~25M params), T = 512, 16 sequences per GPU per step, byte-level text of the Python standard library on
the machine.
Every variant trains the same steps on the same batches (equal tokens) from the same init; M = number of GPUs
replicas with one GPU each (``--processes``: 1 process holding every GPU, or one process per GPU joined by
``jax.distributed.initialize`` on localhost, which this script starts itself). A variant is ``dp`` (the
``first_order`` regime) or ``h<H>-p<P>-t<τ>-a<α>-<wire>`` (the ``diloco`` regime; ``experiments.diloco_study``).

Per variant it reports:

* eval loss (held-out, global params) every ``--eval-every`` steps and at the end;
* bytes each replica sent (total and at the peak sync; DP: a ring all-reduce of float32 gradients every step);
* per-step wall time (device-synchronised) split by what the step did: plain inner steps, steps that reduce a
  fragment (beside their inner step when τ >= 1), steps that merge, and the share of the total spent above the
  plain step time (the communication share); DP's share is measured against the same step on one GPU without
  collectives;
* ``replicas_bit_identical``: the sha256 of every GPU's copy of the final global params, compared across all GPUs
  (every process's); ``final_params_sha256`` lets a 1-process and a 2-process run be compared.

Usage (one host, 2 GPUs; each command prints a table and writes JSON; run ``--processes 2`` second):
  PYTHONPATH=. python benchmarks/diloco_gpus.py --processes 1 --gpus 2 --json $OUT/diloco_1proc.json
  PYTHONPATH=. python benchmarks/diloco_gpus.py --processes 2 --json $OUT/diloco_2proc.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time

DEFAULT_VARIANTS = "dp,h30-p1-t0-a0-fp32,h30-p3-t1-a0.5-fp32,h30-p3-t1-a0.5-e3m0,h100-p4-t1-a0.5-e3m0"


def bench_config(args, replicas: int):
  """The benchmark's run config for ``replicas`` GPUs (the ``diloco`` plugin config holds M)."""
  from optim.diloco import DiLoCoConfig
  from research.models import ModelConfig
  from research.train import TrainConfig
  heads = max(1, args.d_model // 64)
  return TrainConfig(
      model=ModelConfig(layers=("attn",) * args.layers, d_model=args.d_model, num_heads=heads, num_kv_heads=heads,
                        dtype=args.dtype),
      seq_len=args.seq_len, batch_size=args.batch_per_gpu * replicas, steps=args.steps, learning_rate=1e-3,
      warmup_steps=args.steps // 10,
      eval_every=args.eval_every, eval_batches=8, seed=0,
      plugins={"diloco": DiLoCoConfig(replicas=replicas, sync_every=100)})


def _device_digests(tree) -> list[str]:
  """sha256 of each addressable device's copy of ``tree`` (fully replicated arrays), in device order."""
  import jax
  import numpy as np
  digests = {}
  for leaf in jax.tree.leaves(tree):
    for shard in sorted(leaf.addressable_shards, key=lambda s: s.device.id):
      digests.setdefault(shard.device.id, hashlib.sha256()).update(np.asarray(shard.data).tobytes())
  return [d.hexdigest() for _, d in sorted(digests.items())]


def _all_digests(tree) -> list[str]:
  """The digests of every device of every process."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  local = _device_digests(tree)
  if jax.process_count() == 1:
    return local
  raw = np.stack([np.frombuffer(bytes.fromhex(d), np.uint8) for d in local])
  gathered = np.asarray(multihost_utils.process_allgather(raw)).reshape(-1, 32)
  return [row.tobytes().hex() for row in gathered]


def run_variant(spec: str, args) -> dict:
  """Train ``spec`` for ``args.steps`` steps, evaluating and timing every step; the result row."""
  import jax

  from experiments.diloco_study import parse_variant
  from research.mesh import batch_sharded, put_global
  from research.train import build_model, build_regime
  from research.train.loop import evaluate, make_task
  from research.train.steps import make_eval_step

  replicas = jax.device_count()
  cfg = parse_variant(spec, bench_config(args, replicas))
  task, model = make_task(cfg), build_model(cfg)
  regime = build_regime(cfg, model)
  state = regime.init_state(model.params)
  step = regime.step.lower(state, regime.place_batch(task.train_batch(0, cfg.batch_size))).compile()
  eval_step = jax.jit(make_eval_step(model))
  eval_set = [{k: put_global(v, batch_sharded(regime.mesh, 0)) for k, v in b.items()}
              for b in task.eval_batches(cfg.eval_batches, cfg.batch_size)]
  curve, seconds, losses = [], [], []
  for s in range(cfg.steps):
    batch = regime.place_batch(task.train_batch(s, cfg.batch_size))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
    if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
      curve.append({"step": s + 1, "eval_loss": evaluate(eval_step, regime.eval_params(state), eval_set)["loss"]})
      if jax.process_index() == 0:
        print(f"  {spec} step {s + 1}: eval loss {curve[-1]['eval_loss']:.4f}", flush=True)
  digests = _all_digests(regime.eval_params(state))
  row = {"variant": spec, "replicas": replicas, "processes": jax.process_count(), "steps": cfg.steps,
         "tokens_per_step": cfg.tokens_per_step, "final_eval_loss": curve[-1]["eval_loss"], "eval_curve": curve,
         "final_train_loss": statistics.fmean(losses[-20:]), "replicas_bit_identical": len(set(digests)) == 1,
         "final_params_sha256": digests[0], "device": jax.devices()[0].device_kind,
         "jax": jax.__version__}
  row.update(_times(spec, regime, cfg, seconds, model, task))
  return row


def _times(spec, regime, cfg, seconds, model, task) -> dict:
  """Bytes, step-time split and communication share (module docstring); the first 5 steps (warm-up) are left out."""
  kept = range(5, len(seconds))
  if spec == "dp":  # a ring all-reduce of float32 gradients over the M GPUs every step
    local, t = _local_step_seconds(cfg, model, task), statistics.median(seconds[i] for i in kept)
    params, m = sum(x.size for x in jax_leaves(model.params)), regime.mesh.size
    per_step = 2 * (m - 1) * params * 4 // m
    return {"bytes_per_replica": cfg.steps * per_step, "peak_bytes_per_sync": per_step,
            "step_ms_median": {"dp": 1e3 * t, "one_gpu_no_collectives": 1e3 * local},
            "comm_share": max(0.0, 1 - local / t)}
  schedule = regime.config.schedule

  def kind(step):
    if schedule.merged(step) >= 0:
      return "merge"
    return "reduce" if schedule.reduced(step) >= 0 else "capture" if schedule.captured(step) >= 0 else "plain"

  kinds = {i: kind(i + 1) for i in kept}
  by_kind = {k: [seconds[i] for i in kept if kinds[i] == k] for k in ("plain", "capture", "reduce", "merge")}
  # the inner step alone: the median plain step (or, with no step free of sync work, the fastest step)
  plain = statistics.median(by_kind["plain"]) if by_kind["plain"] else min(seconds[i] for i in kept)
  extra = sum(max(0.0, seconds[i] - plain) for i in kept if kinds[i] != "plain")
  return {"bytes_per_replica": regime.total_bytes(cfg.steps), "peak_bytes_per_sync": regime.peak_sync_bytes,
          "step_ms_median": {k: 1e3 * statistics.median(v) for k, v in by_kind.items() if v},
          "comm_share": extra / sum(seconds[i] for i in kept)}


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _local_step_seconds(cfg, model, task) -> float:
  """Median time of the DP step on one GPU with one GPU's share of the batch (no collectives)."""
  import dataclasses

  import jax

  from research.train import build_regime
  local_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // jax.device_count())
  regime = build_regime(local_cfg, model, devices=jax.local_devices()[:1])
  state = regime.init_state(model.params)
  step = regime.step.lower(state, regime.place_batch(task.train_batch(0, local_cfg.batch_size))).compile()
  seconds = []
  for s in range(25):
    batch = regime.place_batch(task.train_batch(s, local_cfg.batch_size))
    start = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds[5:])


def table(rows: list[dict]) -> str:
  dp = next((r for r in rows if r["variant"] == "dp"), None)
  lines = [f"{'variant':<24} {'eval loss':>9} {'vs DP':>7} {'MiB/replica':>12} {'peak MiB':>9} {'x fewer':>8} "
           f"{'comm %':>7} {'bit-identical':>13}"]
  for r in rows:
    gap = "" if dp is None else f"{100 * (r['final_eval_loss'] / dp['final_eval_loss'] - 1):+.2f}%"
    fewer = "" if dp is None else f"{dp['bytes_per_replica'] / max(r['bytes_per_replica'], 1):.0f}"
    lines.append(f"{r['variant']:<24} {r['final_eval_loss']:>9.4f} {gap:>7} {r['bytes_per_replica'] / 2**20:>12.1f} "
                 f"{r['peak_bytes_per_sync'] / 2**20:>9.2f} {fewer:>8} {100 * r['comm_share']:>6.1f}% "
                 f"{str(r['replicas_bit_identical']):>13}")
  return "\n".join(lines)


def worker(args) -> None:
  """One process: every variant, then (process 0) the table and JSON."""
  import jax
  if args.process_id is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                               process_id=args.process_id)
  import optim  # noqa: F401  (registers the diloco regime)
  rows = []
  for spec in [v.strip() for v in args.variants.split(",") if v.strip()]:
    try:
      rows.append(run_variant(spec, args))
    except Exception as e:  # noqa: BLE001 - report and continue with the other variants
      rows.append({"variant": spec, "error": repr(e)[:600]})
      print(f"  {spec}: {rows[-1]['error']}", flush=True)
  if jax.process_index() == 0:
    ok = [r for r in rows if "error" not in r]
    print(table(ok))
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"processes": jax.process_count(), "devices": [str(d) for d in jax.devices()], "rows": rows}, f,
                  indent=2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=1, help="1: one process, all GPUs; N: one process per GPU")
  parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: --processes, or all for 1)")
  parser.add_argument("--variants", default=DEFAULT_VARIANTS)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--batch-per-gpu", type=int, default=16)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params are float32)")
  parser.add_argument("--json", default=None)
  parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.processes == 1 or args.process_id is not None:
    if args.processes == 1 and args.gpus is not None:
      os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(args.gpus))))
    worker(args)
    return
  with socket.socket() as s:  # a free port on localhost for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  gpus = args.gpus or args.processes
  if gpus != args.processes:
    sys.exit(f"--processes {args.processes} runs one process per GPU; --gpus must match (got {gpus})")
  children = []
  for i in range(args.processes):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}
    argv = [sys.executable, __file__, "--processes", str(args.processes), "--process-id", str(i), "--coordinator",
            f"localhost:{port}", "--variants", args.variants, "--steps", str(args.steps), "--eval-every",
            str(args.eval_every), "--layers", str(args.layers), "--d-model", str(args.d_model), "--seq-len",
            str(args.seq_len), "--batch-per-gpu", str(args.batch_per_gpu), "--dtype", args.dtype]
    argv += ["--json", args.json] if args.json else []
    children.append(subprocess.Popen(argv, env=env))
  codes = [c.wait() for c in children]
  if any(codes):
    sys.exit(f"worker exit codes: {codes}")


if __name__ == "__main__":
  main()
