"""Step memory of ZO-SPSA vs inference vs first-order AdamW on one GPU, from XLA's analysis and the allocator.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333) claims the memory of
inference. For each model size and per-device batch [B, T] this times and measures, each in a fresh process:

* ``forward``: ``lm_loss`` of the LM (``research.train.steps``), params as arguments (the inference baseline);
* ``zo``: the donated step of ``--regime zo_spsa`` on one worker (``optim.zo.regime``: perturbed leaves built where
  read, z regenerated from seeds, one log8 byte per direction; 1 direction = 2 forward passes);
* ``mezo_optax``: the functional optax path ``optim.zo.spsa.mezo_sgd`` (θ ± εz and ĝ materialised, ~2|Θ| extra);
* ``first_order``: the donated backprop + AdamW step (``--regime first_order``).

Reported per row: XLA's ``memory_analysis()`` (arguments, temporaries, peak = args + outputs − aliased + temps), the
allocator's ``peak_bytes_in_use`` after warm-up and timed steps, ms per step, and both peaks relative to
``forward``. Every row names the device. Usage (GPU, jax 0.11.2)::

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/zo_memory.py --json zo_memory.json
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/zo_memory.py --sizes 1b --batches 8 \
        --json zo_memory_1b.json

``--sizes`` picks among ``SIZES`` (default ``gpu``), ``--batches`` the per-device batch sizes (default 8,32). The
JSON file is rewritten after every row, so a run cut short keeps what it measured; a variant that fails or runs
past ``--child-timeout`` seconds is reported as an error row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

VARIANTS = ("forward", "zo", "mezo_optax", "first_order")
# name -> (d_model, layers, heads, compute dtype, sequence length)
SIZES = {
    "tiny": (128, 3, 4, "float32", 128),
    "gpu": (768, 12, 12, "bfloat16", 1024),  # the gpu preset's model (~85M parameters)
    "gpu_f32": (768, 12, 12, "float32", 1024),
    "1b": (2048, 18, 16, "bfloat16", 1024),
}


def _config(size: str, batch: int, variant: str):
  from optim.zo.regime import ZOSPSAConfig
  from optim.zo.registry import MeZOConfig
  from research.models import ModelConfig
  from research.train import TrainConfig

  d, layers, heads, dtype, seq = SIZES[size]
  model = ModelConfig(layers=("attn",) * layers, d_model=d, num_heads=heads, num_kv_heads=heads, dtype=dtype)
  cfg = TrainConfig(model=model, seq_len=seq, batch_size=batch, steps=1000, warmup_steps=0)
  if variant == "zo":
    cfg = dataclasses.replace(cfg, regime="zo_spsa", optimizer="mezo_sgd", grad_clip=0.0, learning_rate=1e-6,
                              plugins={"zo_spsa": ZOSPSAConfig(workers=1), "mezo_sgd": MeZOConfig()})
  return cfg


def _random_like(abstract, seed: int = 0):
  """Random arrays (small floats, byte-range ints) with the shapes, dtypes and shardings of ``abstract``."""
  import jax
  import numpy as np

  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, leaf in zip(keys, leaves, strict=True):
    if np.issubdtype(leaf.dtype, np.integer):
      x = jax.random.randint(k, leaf.shape, 0, 256, leaf.dtype)
    else:
      x = (0.02 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
    out.append(jax.device_put(x, getattr(leaf, "sharding", None)))
  return jax.tree.unflatten(tree, out)


def measure(variant: str, size: str, batch: int, repeats: int) -> dict:
  """One row, measured in this process (run it in a fresh one for a clean allocator peak)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import experiments.configs  # noqa: F401  (registers the plugins)
  from optim.zo.spsa import mezo_sgd
  from research.memory import compiled_memory
  from research.train import build_model, build_regime
  from research.train.steps import lm_loss

  device = jax.devices()[0]
  cfg = _config(size, batch, variant)
  model = build_model(cfg, abstract=True)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(batch, cfg.seq_len + 1)).astype(np.int32)
  host_batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  loss = lambda p, b: lm_loss(model.merge(p), b, cfg.model.aux_loss_weight)

  if variant in ("zo", "first_order"):
    regime = build_regime(cfg, model, [device])
    state = _random_like(regime.abstract_state())
    batch_arrays = regime.place_batch(host_batch)
    compiled = regime.step.lower(state, batch_arrays).compile()
    run = lambda s: compiled(s, batch_arrays)
  elif variant == "forward":
    state = _random_like(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params))
    batch_arrays = jax.device_put(host_batch)
    compiled = jax.jit(loss).lower(state, batch_arrays).compile()
    run = lambda s: (s, compiled(s, batch_arrays))
  else:  # mezo_optax
    tx = mezo_sgd(1e-6)
    params = _random_like(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params))
    state = (params, tx.init(params))
    batch_arrays = jax.device_put(host_batch)

    def step(s, b):
      p, opt = s
      updates, opt = tx.update(None, opt, p, obj_fn=lambda q: loss(q, b)[0])
      return (jax.tree.map(jnp.add, p, updates), opt), opt[0].projected_grads

    compiled = jax.jit(step, donate_argnums=0).lower(state, batch_arrays).compile()
    run = lambda s: compiled(s, batch_arrays)

  xla = compiled_memory(compiled)
  times = []
  for i in range(repeats + 2):
    start = time.perf_counter()
    state, out = run(state)
    jax.block_until_ready(out)
    if i >= 2:
      times.append(time.perf_counter() - start)
  stats = device.memory_stats() or {}
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(model.params))
  return {"variant": variant, "size": size, "batch": batch, "seq_len": cfg.seq_len, "params": params,
          "compute_dtype": cfg.model.dtype, "device": device.device_kind, "jax": jax.__version__,
          "xla_argument_mib": xla["argument_size_in_bytes"] / 2**20, "xla_temp_mib": xla["temp_size_in_bytes"] / 2**20,
          "xla_peak_mib": xla["peak_estimate_bytes"] / 2**20,
          "measured_peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
          "ms_per_step": 1e3 * float(np.median(times))}


def _child(variant: str, size: str, batch: int, repeats: int, timeout: float) -> dict:
  command = [sys.executable, __file__, "--one", variant, "--sizes", size, "--batches", str(batch),
             "--repeats", str(repeats)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=False, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"variant": variant, "size": size, "batch": batch, "error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode or not lines:
    return {"variant": variant, "size": size, "batch": batch, "error": (done.stderr or done.stdout)[-600:]}
  return json.loads(lines[-1])


def _table(rows: list[dict]) -> str:
  head = (f"{'size':8} {'B':>3} {'variant':12} {'params':>8} {'XLA peak MiB':>13} {'vs fwd':>7} "
          f"{'measured MiB':>13} {'vs fwd':>7} {'ms/step':>9}  device")
  lines = [head, "-" * len(head)]
  forward = {(r["size"], r["batch"]): r for r in rows if r.get("variant") == "forward" and "error" not in r}
  for r in rows:
    if "error" in r:
      lines.append(f"{r['size']:8} {r['batch']:>3} {r['variant']:12} error: {' '.join(r['error'].split())[:150]}")
      continue
    base = forward.get((r["size"], r["batch"]))
    xla_ratio = f"{r['xla_peak_mib'] / base['xla_peak_mib']:.2f}x" if base else "-"
    measured = r["measured_peak_mib"]
    measured_ratio = (f"{measured / base['measured_peak_mib']:.2f}x" if base and measured and
                      base["measured_peak_mib"] else "-")
    lines.append(f"{r['size']:8} {r['batch']:>3} {r['variant']:12} {r['params'] / 1e6:7.1f}M {r['xla_peak_mib']:13.1f} "
                 f"{xla_ratio:>7} {measured or float('nan'):13.1f} {measured_ratio:>7} {r['ms_per_step']:9.2f}  "
                 f"{r['device']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="gpu", help=f"comma-separated among {', '.join(SIZES)}")
  parser.add_argument("--batches", default="8,32", help="per-device batch sizes (sequences)")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--child-timeout", type=float, default=420.0, help="seconds per variant")
  parser.add_argument("--json", default=None, help="write the rows here")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: one variant, print one row
  args = parser.parse_args(argv)
  sizes, batches = args.sizes.split(","), [int(b) for b in args.batches.split(",")]
  if args.one:
    print(json.dumps(measure(args.one, sizes[0], batches[0], args.repeats)), flush=True)
    return []
  rows = []
  for size in sizes:
    for batch in batches:
      for variant in args.variants.split(","):
        rows.append(_child(variant, size, batch, args.repeats, args.child_timeout))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
          with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
  print(_table(rows))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
