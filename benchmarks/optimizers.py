"""Optimizer benchmarks: optimizer-state bytes (abstract shapes, any host) and train-step time (GPU).

``python benchmarks/optimizers.py memory --out optim_memory.json``   (CPU is enough)
``python benchmarks/optimizers.py time --out optim_time.json``       (one GPU; baselines in the same run)

memory: the GaLore paper's LLaMA configs (60M/130M/350M/1B: d_model 512/768/1024/2048, SwiGLU 1376/2048/2736/5461,
8/12/24/24 layers, vocab 32000, untied head; ranks 128/256/256/512; Zhao et al., arXiv:2403.03507, Table 2,
configs/llama_*.json) built from abstract shapes, state of AdamW, optax.contrib.galore and ours counted per
parameter group with :mod:`optim.memory`. Table 6 of the paper (BF16 state) is printed next to ours in bf16.

time: the 130M config (bf16 compute, float32 params), one train step (forward, backward, update) per variant,
every step of a full refresh period T = 200 timed (device-synchronised), so the refresh (SVD) step and the
amortised cost are measured, not estimated; plus the thin SVD of each matrix shape per JAX SVD algorithm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optim.galore import galore
from optim.galore_projection import SVD_ALGORITHMS
from optim.memory import state_bytes_by_group
from optim.natural_galore import natural_galore
from research.memory import compiled_memory
from research.models import DecoderLM, ModelConfig
from research.train.first_order import make_train_step
from research.train.regime import split_model

# name: (d_model, mlp_hidden, layers, heads, paper rank, paper Table 6 state GB Adam / GaLore)
PAPER_MODELS = {
    "60M": (512, 1376, 8, 8, 128, (0.23, 0.13)),
    "130M": (768, 2048, 12, 12, 256, (0.51, 0.28)),
    "350M": (1024, 2736, 24, 16, 256, (1.37, 0.54)),
    "1B": (2048, 5461, 24, 32, 512, (5.20, 1.78)),
}
UPDATE_PROJ_GAP = 200


def model_config(name: str, dtype: str = "float32") -> ModelConfig:
  d, hidden, layers, heads, _, _ = PAPER_MODELS[name]
  return ModelConfig(vocab_size=32000, layers=("attn",) * layers, d_model=d, num_heads=heads, num_kv_heads=heads,
                     mlp_hidden=hidden, tie_embeddings=False, dtype=dtype)


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)


def optimizers(rank: int) -> dict[str, Callable[[], optax.GradientTransformation]]:
  return {
      "adamw": lambda: optax.adamw(1e-3),
      "optax.contrib.galore": lambda: optax.contrib.galore(1e-3, rank=rank, update_proj_gap=UPDATE_PROJ_GAP),
      "galore std": lambda: galore(1e-3, rank=rank, update_proj_gap=UPDATE_PROJ_GAP),
      "galore reverse_std": lambda: galore(1e-3, rank=rank, update_proj_gap=UPDATE_PROJ_GAP, side="reverse_std"),
      "natural_galore s=20": lambda: natural_galore(1e-3, rank=rank, update_proj_gap=UPDATE_PROJ_GAP, history=20),
  }


def memory_table(models: list[str], rank_ratios: dict[str, int]) -> list[dict[str, Any]]:
  rows = []
  for name in models:
    cfg = model_config(name)
    paper_rank = PAPER_MODELS[name][4]
    for rank in sorted({paper_rank, *(cfg.d_model // k for k in rank_ratios.values())}, reverse=True):
      for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        params = abstract_params(cfg, dtype)
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        groups = {opt: state_bytes_by_group(jax.eval_shape(make().init, params), params)
                  for opt, make in optimizers(rank).items()}
        adam_proj = groups["adamw"]["attn/mlp"]["total"]
        for opt, g in groups.items():
          rows.append({"model": name, "params": n_params, "rank": rank, "paper_rank": rank == paper_rank,
                       "dtype": dtype_name, "optimizer": opt, "attn_mlp_bytes": g["attn/mlp"]["total"],
                       "other_bytes": g.get("other", {}).get("total", 0),
                       "total_bytes": sum(v["total"] for v in g.values()),
                       "attn_mlp_vs_adamw": g["attn/mlp"]["total"] / adam_proj,
                       "components_attn_mlp": {k: v for k, v in g["attn/mlp"].items() if k != "total"}})
  return rows


def print_memory(rows: list[dict[str, Any]]) -> None:
  print("optimizer-state bytes from abstract shapes (CPU); attn/mlp = the matrices GaLore projects")
  print(f"{'model':>5} {'rank':>5} {'dtype':>8} {'optimizer':<22} {'attn/mlp MiB':>13} {'vs AdamW':>9} "
        f"{'total GB':>9} {'paper GB':>9}")
  for r in rows:
    paper = ""
    if r["dtype"] == "bfloat16" and r["paper_rank"]:
      adam_gb, galore_gb = PAPER_MODELS[r["model"]][5]
      paper = {"adamw": f"{adam_gb:.2f}", "galore std": f"{galore_gb:.2f}"}.get(r["optimizer"], "")
    print(f"{r['model']:>5} {r['rank']:>5} {r['dtype']:>8} {r['optimizer']:<22} {r['attn_mlp_bytes'] / 2**20:13.1f} "
          f"{100 * r['attn_mlp_vs_adamw']:8.1f}% {r['total_bytes'] / 1e9:9.3f} {paper:>9}")


def svd_table(shapes: list[tuple[int, int]], repeats: int = 5) -> list[dict[str, Any]]:
  rows = []
  for shape in shapes:
    g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    for name, algorithm in ((k, v) for k, v in SVD_ALGORITHMS.items() if k != "auto"):
      fn = jax.jit(lambda x, a=algorithm: jax.lax.linalg.svd(x, full_matrices=False, algorithm=a))
      try:
        u, s, vh = jax.block_until_ready(fn(g))
        recon = jnp.matmul(u * s, vh, precision=jax.lax.Precision.HIGHEST)
        err = float(jnp.linalg.norm(recon - g) / jnp.linalg.norm(g))
        times = []
        for _ in range(repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(g))
          times.append(time.perf_counter() - t0)
        rows.append({"shape": shape, "algorithm": name or "default", "ms": 1e3 * statistics.median(times),
                     "reconstruction_rel_err": err})
      except Exception as e:  # an algorithm the backend lacks: report, keep going
        rows.append({"shape": shape, "algorithm": name or "default", "error": f"{type(e).__name__}: {e}"[:200]})
  return rows


def time_variant(name: str, tx: optax.GradientTransformation, cfg: ModelConfig, batch: dict[str, jax.Array],
                 steps: int, gap: int) -> dict[str, Any]:
  model = split_model(DecoderLM(cfg, rngs=nnx.Rngs(0)))
  state = {"params": model.params, "opt_state": tx.init(model.params)}
  step = jax.jit(make_train_step(model, tx, cfg.aux_loss_weight), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  times, losses = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  steady = [t for i, t in enumerate(times) if i >= 2 and i % gap]
  median = statistics.median(steady)
  row = {"variant": name, "compile_s": compile_s, "median_step_ms": 1e3 * median, "first_loss": losses[0],
         "last_loss": losses[-1], "memory": compiled_memory(compiled),
         "state_bytes": sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))}
  refreshes = [times[i] for i in range(gap, steps, gap)]  # warm refresh steps (t = 0 also pays first-run costs)
  if refreshes:
    refresh = statistics.fmean(refreshes)
    row.update(refresh_step_ms=1e3 * refresh, refresh_steps_ms=[1e3 * t for t in refreshes],
               first_step_ms=1e3 * times[0], amortised_step_ms=1e3 * statistics.fmean(times[1:]),
               amortised_svd_overhead=(refresh - median) / gap / median)
  return row


def timing(model: str, batch_size: int, seq_len: int, gap: int, out: dict[str, Any],
           save: Callable[[], None]) -> None:
  cfg = model_config(model, dtype="bfloat16")
  rank = PAPER_MODELS[model][4]
  d, hidden = cfg.d_model, cfg.resolved_mlp_hidden
  out["svd"] = svd_table([(d, d), (d, hidden), (hidden, d)])
  save()
  ok = [r for r in out["svd"] if "ms" in r and r["reconstruction_rel_err"] < 1e-4]
  print("  svd: " + ", ".join(f"{r['shape']} {r['algorithm']} {r.get('ms', float('nan')):.1f} ms" for r in out["svd"]),
        flush=True)
  by_algo = {a: sum(r["ms"] for r in ok if r["algorithm"] == a) for a in {r["algorithm"] for r in ok}}
  fastest = min((a for a in by_algo if sum(r["algorithm"] == a for r in ok) == 3), key=by_algo.get)
  tokens = jax.random.randint(jax.random.key(1), (1, batch_size, seq_len), 0, cfg.vocab_size)
  batch = {"inputs": tokens, "labels": jnp.roll(tokens, -1, axis=-1)}
  period = gap + 1  # steps 0..T: the refresh at T is warm (t = 0 also pays first-run costs)
  variants = [
      ("adamw", lambda: optax.adamw(1e-3), 40),
      ("optax.contrib.galore", lambda: optax.contrib.galore(1e-3, rank=rank, update_proj_gap=gap),
       period),
      ("galore std (svd default)", lambda: galore(1e-3, rank=rank, update_proj_gap=gap, svd_algorithm=None),
       period),
      (f"galore std (svd {fastest})", lambda: galore(1e-3, rank=rank, update_proj_gap=gap,
                                                     svd_algorithm=None if fastest == "default" else fastest),
       period),
      (f"natural_galore s=20 (svd {fastest})",
       lambda: natural_galore(1e-3, rank=rank, update_proj_gap=gap, history=20,
                              svd_algorithm=None if fastest == "default" else fastest), period),
  ]
  out["steps"] = []
  for name, make, steps in variants:
    if any(r["variant"] == name for r in out["steps"]):  # the fastest SVD is the default one
      continue
    out["steps"].append(time_variant(name, make(), cfg, batch, steps, gap))
    save()
    print(f"  {name}: {out['steps'][-1]['median_step_ms']:.2f} ms/step", flush=True)


def print_timing(out: dict[str, Any]) -> None:
  card = out["device"]
  print(f"\nthin SVD (float32) on {card}, median ms:")
  for r in out["svd"]:
    shown = f"{r['ms']:8.2f} ms  rel.err {r['reconstruction_rel_err']:.1e}" if "ms" in r else r["error"]
    print(f"  {str(r['shape']):>12} {r['algorithm']:<20} {shown}")
  print(f"\ntrain step, LLaMA-{out['model']} config bf16, {out['tokens_per_step']} tokens/step, "
        f"T={out['update_proj_gap']}, on {card}:")
  adamw = next(r["median_step_ms"] for r in out["steps"] if r["variant"] == "adamw")
  print(f"  {'variant':<28} {'median ms':>9} {'vs adamw':>9} {'refresh ms':>10} {'amortised':>10} "
        f"{'SVD ovh':>8} {'state MiB':>9} {'temp MiB':>9}")
  for r in out["steps"]:
    refresh = f"{r['refresh_step_ms']:10.1f}" if "refresh_step_ms" in r else f"{'':>10}"
    amort = f"{r['amortised_step_ms']:10.2f}" if "amortised_step_ms" in r else f"{'':>10}"
    ovh = f"{100 * r['amortised_svd_overhead']:7.1f}%" if "amortised_svd_overhead" in r else f"{'':>8}"
    print(f"  {r['variant']:<28} {r['median_step_ms']:9.2f} {r['median_step_ms'] / adamw:8.2f}x {refresh} {amort} "
          f"{ovh} {r['state_bytes'] / 2**20:9.1f} {r['memory']['temp_size_in_bytes'] / 2**20:9.1f}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("part", choices=("memory", "time"))
  parser.add_argument("--out", default=None, help="JSON output path")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--model", choices=tuple(PAPER_MODELS), default="130M", help="config timed by 'time'")
  parser.add_argument("--update-proj-gap", type=int, default=UPDATE_PROJ_GAP, help="T of the timed variants")
  args = parser.parse_args(argv)
  out: dict[str, Any] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                         "optax": optax.__version__, "has_optax_contrib_galore": hasattr(optax.contrib, "galore")}
  def save() -> None:
    if args.out:
      Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")

  if args.part == "memory":
    out["memory"] = memory_table(list(PAPER_MODELS), {"d/4": 4})
    save()
    print_memory(out["memory"])
  else:
    out.update(tokens_per_step=args.batch_size * args.seq_len, model=args.model,
               update_proj_gap=args.update_proj_gap)
    print(f"device {out['device']}, jax {out['jax']}, optax {out['optax']}, optax.contrib.galore present: "
          f"{out['has_optax_contrib_galore']}", flush=True)
    timing(args.model, args.batch_size, args.seq_len, args.update_proj_gap, out, save)
    print_timing(out)


if __name__ == "__main__":
  main(sys.argv[1:])
