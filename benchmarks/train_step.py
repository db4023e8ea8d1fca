"""Throughput and memory of the LM train step (``research.train``) with cuDNN vs XLA attention, same run.

The attention kernel is the ``attn`` mixer's own setting (``AttentionConfig.implementation``).

    PYTHONPATH=. python3 benchmarks/train_step.py --config gpu --out train_step.json

Counts model FLOPs as 6·N·tokens (N = non-embedding parameters) plus causal attention 6·L·T·d per token
(forward 2·2·T·d/2 per layer and token, backward twice that), and reports the fraction of the card's measured
bf16 matmul rate (``--peak-tflops``, default 790 from an 8192³ bf16 product on the lent H100/H200).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from experiments.configs import get_preset
from layers.attention import AttentionConfig
from research import memory
from research.train import build_model, build_regime


def timed_steps(compiled, state, batch, repeats: int) -> float:
  """Median seconds per step over ``repeats`` steps after two warm-up steps."""
  times = []
  for i in range(repeats + 2):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def materialise(abstract, key):
  """Random arrays (never zeros) with the shapes, dtypes and shardings of ``abstract``."""
  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(key, len(leaves))
  arrays = []
  for k, leaf in zip(keys, leaves):
    if np.issubdtype(leaf.dtype, np.integer):
      x = jax.random.randint(k, leaf.shape, 0, 256, leaf.dtype)
    else:
      x = (0.02 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
    arrays.append(jax.device_put(x, leaf.sharding))
  return jax.tree.unflatten(tree, arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="gpu")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--peak-tflops", type=float, default=790.0)
  parser.add_argument("--out", default="train_step.json")
  args = parser.parse_args()
  base = get_preset(args.config)
  device = jax.devices()[0].device_kind
  results = []
  for implementation in ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",):
    model = dataclasses.replace(base.model, mixers={**base.model.mixers, "attn": AttentionConfig(implementation)})
    cfg = dataclasses.replace(base, model=model)
    m = cfg.model
    try:
      regime = build_regime(cfg, build_model(cfg, abstract=True))
      compiled = regime.step.lower(regime.abstract_state(), regime.abstract_batch()).compile()
      state, batch = materialise((regime.abstract_state(), regime.abstract_batch()), jax.random.key(0))
      n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
      seconds = timed_steps(compiled, state, batch, args.repeats)
    except Exception as e:  # e.g. XLA's dense attention running out of device memory
      results.append({"device": device, "attention": implementation, "config": args.config,
                      "error": str(e).splitlines()[0][:200]})
      continue
    non_embedding = n_params - m.vocab_size * m.d_model
    tokens = cfg.tokens_per_step
    flops = tokens * (6 * non_embedding + 6 * len(m.layers) * cfg.seq_len * m.num_heads * m.resolved_head_dim)
    report = memory.compiled_memory(compiled)
    results.append({"device": device, "attention": implementation, "config": args.config, "seconds_per_step":
                    seconds, "tokens_per_s": tokens / seconds, "model_tflops": flops / seconds / 1e12,
                    "fraction_of_peak": flops / seconds / 1e12 / args.peak_tflops,
                    "temp_bytes": report["temp_size_in_bytes"], "peak_estimate_bytes": report["peak_estimate_bytes"]})
  print(f"{'device':<23}{'attention':<10}{'ms/step':>9}{'tok/s':>11}{'TFLOP/s':>9}{'of peak':>9}{'XLA temp GiB':>14}")
  for r in results:
    if "error" in r:
      print(f"{r['device']:<23}{r['attention']:<10} failed: {r['error']}")
      continue
    print(f"{r['device']:<23}{r['attention']:<10}{1e3 * r['seconds_per_step']:>9.1f}{r['tokens_per_s']:>11.0f}"
          f"{r['model_tflops']:>9.1f}{r['fraction_of_peak']:>9.1%}{r['temp_bytes'] / 2**30:>14.2f}")
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
