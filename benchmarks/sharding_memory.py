"""Per-device memory of the compiled train step on each mesh shape, from XLA's own accounting.

    python benchmarks/sharding_memory.py --configs gpu,1b --json sharding_memory.json            # 8 fake CPU devices
    PYTHONPATH=. python benchmarks/sharding_memory.py --devices 0 --configs gpu,1b               # the host's GPUs

For each (config, mesh) the train step is lowered on abstract inputs (nothing is materialised) and compiled for the
mesh's devices; ``compiled.memory_analysis()`` gives the per-device argument and temporary bytes. Arguments are
split into parameters, optimizer state and batch by the shard shapes of their shardings (``research.sharding``);
the script checks that the three add up to XLA's argument bytes. Without a GPU host it runs on 8 fake CPU devices,
which gives XLA's buffer assignment for the CPU backend: parameter and optimizer bytes are the same on any backend,
temporaries are the CPU program's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def _configs():
  from experiments.configs import get_preset
  from research.models import ModelConfig
  gpu = get_preset("gpu")
  one_b = dataclasses.replace(  # ~1.3B parameters: 24 layers of width 2048, 32k vocabulary
      gpu, seq_len=2048, batch_size=16, model=ModelConfig(vocab_size=32000, layers=("attn",) * 24, d_model=2048,
                                                          num_heads=16, num_kv_heads=16, dtype="bfloat16",
                                                          tie_embeddings=False))
  return {"gpu": gpu, "1b": one_b}


def measure(cfg, mesh: str) -> dict:
  import jax

  from research.sharding import shard_bytes
  from research.train import build_model, build_regime

  cfg = dataclasses.replace(cfg, mesh=mesh)
  regime = build_regime(cfg, build_model(cfg, abstract=True))
  state, batch = regime.abstract_state(), regime.abstract_batch()
  start = time.perf_counter()
  analysis = regime.step.lower(state, batch).compile().memory_analysis()
  shardings = lambda tree: jax.tree.map(lambda s: s.sharding, tree)
  params = shard_bytes(state["params"], shardings(state["params"]))
  optimizer = shard_bytes(state["opt_state"], shardings(state["opt_state"]))
  batch_bytes = shard_bytes(batch, shardings(batch))
  n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
  row = {"mesh": mesh, "devices": len(regime.devices), "device_kind": regime.devices[0].device_kind,
         "params": n_params, "param_bytes": params, "optimizer_bytes": optimizer, "batch_bytes": batch_bytes,
         "argument_bytes": analysis.argument_size_in_bytes, "temp_bytes": analysis.temp_size_in_bytes,
         "compile_s": round(time.perf_counter() - start, 1)}
  row["split_matches_xla"] = params + optimizer + batch_bytes == analysis.argument_size_in_bytes
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="gpu,1b", help="comma list of gpu, 1b")
  parser.add_argument("--meshes", default="data=8|fsdp=8|data=2,fsdp=4|fsdp=4,tensor=2", help="|-separated meshes")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (0: use the real backend's devices)")
  parser.add_argument("--json", default="sharding_memory.json")
  args = parser.parse_args()
  if args.devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  configs = _configs()
  rows = []
  print(f"{'config':<7}{'mesh':<18}{'device':<22}{'params M':>9}{'param MiB':>11}{'optim MiB':>11}"
        f"{'temp MiB':>11}{'args = split':>14}")
  for name in args.configs.split(","):
    for mesh in args.meshes.split("|"):
      row = {"config": name, **measure(configs[name], mesh)}
      rows.append(row)
      mib = [f"{row[k] / 2**20:>11.1f}" for k in ("param_bytes", "optimizer_bytes", "temp_bytes")]
      print(f"{name:<7}{mesh:<18}{row['device_kind'][:21]:<22}{row['params'] / 1e6:>9.1f}{''.join(mib)}"
            f"{str(row['split_matches_xla']):>14}", flush=True)
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
