"""Data-parallel scaling of the train step on 1, 2, 4 (and 8) GPUs of one host: tokens/s, fraction of peak, and the
time per step spent in collectives, read from a profile.

    PYTHONPATH=. python benchmarks/dp_scaling.py --config gpu --json dp_scaling.json                   # a GPU host
    python benchmarks/dp_scaling.py --config tiny --fake-devices 4 --counts 1,2,4 --json /tmp/dp.json  # CPU check

Weak scaling: the per-device batch stays the config's batch / 8, so n devices train n times the tokens per step on a
``data=n`` mesh (``research.mesh``). Model FLOPs are 6·N·tokens plus causal attention (as ``train_step.py``); the
fraction of peak is against ``--peak-tflops`` per device. The collective time comes from a ``jax.profiler`` trace of
``--profile-steps`` steps: the summed duration of device events whose name is an all-reduce / all-gather /
reduce-scatter (XLA's op names; NCCL kernels on GPU), per device and step.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile

COLLECTIVES = ("all-reduce", "allreduce", "all-gather", "allgather", "reduce-scatter", "reducescatter")


def collective_ms_per_step(trace_dir: str, steps: int, devices: int) -> float | None:
  """Milliseconds per step and device in collective ops, from the Perfetto trace ``jax.profiler`` wrote."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return None
  with gzip.open(files[0], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  total_us = sum(e.get("dur", 0) for e in events if e.get("ph") == "X"
                 and any(c in str(e.get("name", "")).lower() for c in COLLECTIVES))
  return total_us / 1e3 / steps / devices


def measure(cfg, count: int, repeats: int, profile_steps: int, peak_tflops: float) -> dict:
  import jax

  from research.train import build_model, build_regime
  from train_step import materialise, timed_steps

  per_device = cfg.batch_size // 8
  cfg = dataclasses.replace(cfg, mesh=f"data={count}", batch_size=per_device * count)
  regime = build_regime(cfg, build_model(cfg, abstract=True), jax.devices()[:count])
  compiled = regime.step.lower(regime.abstract_state(), regime.abstract_batch()).compile()
  state, batch = materialise((regime.abstract_state(), regime.abstract_batch()), jax.random.key(0))
  seconds = timed_steps(compiled, state, batch, repeats)
  with tempfile.TemporaryDirectory() as trace_dir:
    state, batch = materialise((regime.abstract_state(), regime.abstract_batch()), jax.random.key(1))
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(profile_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    collective_ms = collective_ms_per_step(trace_dir, profile_steps, count)
  m = cfg.model
  n_params = sum(int(x.size) for x in jax.tree.leaves(regime.abstract_state()["params"]))
  tokens = cfg.tokens_per_step
  flops = tokens * (6 * (n_params - m.vocab_size * m.d_model) + 6 * len(m.layers) * cfg.seq_len * m.d_model)
  return {"devices": count, "device_kind": regime.devices[0].device_kind, "batch": cfg.batch_size,
          "seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
          "fraction_of_peak": flops / seconds / 1e12 / (peak_tflops * count), "collective_ms_per_step": collective_ms}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="gpu")
  parser.add_argument("--counts", default="1,2,4,8", help="device counts (those beyond the host's are skipped)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--profile-steps", type=int, default=3)
  parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 matmul rate of one device")
  parser.add_argument("--fake-devices", type=int, default=0, help="CPU devices to fake (a CPU dry run)")
  parser.add_argument("--json", default="dp_scaling.json")
  args = parser.parse_args()
  if args.fake_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fake_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax

  from experiments.configs import get_preset
  cfg, rows = get_preset(args.config), []
  print(f"{'device':<24}{'n':>3}{'batch':>7}{'ms/step':>9}{'tok/s':>12}{'of peak':>9}{'collective ms':>15}")
  for count in (int(c) for c in args.counts.split(",")):
    if count > jax.device_count():
      print(f"skipped {count} devices: the host has {jax.device_count()}")
      continue
    r = measure(cfg, count, args.repeats, args.profile_steps, args.peak_tflops)
    rows.append(r)
    coll = "n/a" if r["collective_ms_per_step"] is None else f"{r['collective_ms_per_step']:.2f}"
    print(f"{r['device_kind'][:23]:<24}{count:>3}{r['batch']:>7}{1e3 * r['seconds_per_step']:>9.1f}"
          f"{r['tokens_per_s']:>12.0f}{r['fraction_of_peak']:>9.1%}{coll:>15}", flush=True)
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
