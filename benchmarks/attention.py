"""Attention benchmark on one GPU: cuDNN, XLA, our Pallas block-sparse kernel and the blockwise XLA path.

Run on the device (H100/H200) from the repo root:  PYTHONPATH=. python3 benchmarks/attention.py --out $OUT
Sections (``--sections``, comma-separated): check (GPU correctness vs the fp32 reference), calib (bf16 8192³
matmul, HBM copy), tune (Pallas tiles on dense causal 16K; the best is used by the later sections), dense (B=4,
H=16, D=128, causal, N ∈ {4K, 16K}: cuDNN vs api vs our kernel vs XLA vs blockwise XLA), sparse (LongGen sink(64)
+ window(4096) and block-sparse (64, 16, 8) at 32K and 128K vs cuDNN dense causal and cuDNN window-only).
FLOPs: forward 4·B·Hq·D·(visible pairs), forward+backward 3.5× that (attention spec §5); fwd+bwd = ``jax.grad`` of
sum(out) w.r.t. q, k, v. Each time is the median of ``--reps`` runs after 2 warm-ups; the card name is stored next
to every number in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from layers.kernels.attention import api, masks
from layers.kernels.attention.pallas_gpu import BlockSizes, pallas_attention
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow
from layers.kernels.attention.reference import attention_reference

B, H, D = 4, 16, 128
SINK, WINDOW = 64, 4096


def timed(fn, *args, reps: int):
  """Median wall time (s) of ``fn(*args)`` after 2 warm-ups, synchronising on every output."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def inputs(n, key=0, b=B, h=H, hkv=H, d=D, dtype=jnp.bfloat16):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(key), 3)
  return (jax.random.normal(kq, (b, n, h, d), dtype), jax.random.normal(kk, (b, n, hkv, d), dtype),
          jax.random.normal(kv, (b, n, hkv, d), dtype))


def fwd_and_grad(attend):
  fwd = jax.jit(attend)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
  return fwd, grad


class Recorder:
  def __init__(self, out: pathlib.Path, device: str):
    self.out, self.device, self.rows = out, device, []

  def add(self, **row):
    row = {"device": self.device, **row}
    self.rows.append(row)
    print(json.dumps(row), flush=True)
    self.out.write_text(json.dumps({"device": self.device, "jax": jax.__version__, "rows": self.rows}, indent=1))


def measure(rec: Recorder, section, name, pattern, n, attend, reps, modes=("fwd", "fwd+bwd"), **extra):
  """Time forward and forward+backward of ``attend(q, k, v) -> o`` and record TFLOP/s on visible pairs."""
  pairs = masks.visible_pairs(api.bind_heads(pattern, H, H), n, H) * B
  fwd, grad = fwd_and_grad(attend)
  q, k, v = inputs(n)
  for mode, fn in (("fwd", fwd), ("fwd+bwd", grad)):
    if mode not in modes:
      continue
    flops = 4 * D * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
    try:
      t = timed(fn, q, k, v, reps=reps)
      rec.add(section=section, impl=name, pattern=repr(pattern), n=n, mode=mode, ms=t * 1e3,
              tflops=flops / t / 1e12, pairs=pairs, **extra)
    except Exception as e:  # noqa: BLE001  (OOM and unsupported shapes are results here)
      rec.add(section=section, impl=name, pattern=repr(pattern), n=n, mode=mode, error=f"{type(e).__name__}: "
              f"{str(e).splitlines()[0][:300]}", **extra)


def section_check(rec: Recorder, reps):
  """bf16 on GPU vs the fp32 reference: outputs and q/k/v gradients, GQA, a ragged length."""
  del reps
  cases = [(Dense(True), 1024), (Dense(True), 1000), (SinkWindow(64, 256), 1024), (SinkWindow(3, 100), 777),
           (BlockSparse(64, 4, 4), 1024), (BlockSparse(64, 2, 3, num_dense_heads=1), 960)]
  for pattern, n in cases:
    q, k, v = inputs(n, key=n, b=2, h=4, hkv=2, d=128)
    loss = lambda o: jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[1]))[None, :, None, None])
    ref_fn = lambda q, k, v, p=pattern: attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), api.bind_heads(p, 4, 2))[0]
    for impl in ("pallas_gpu", "cudnn", "blockwise"):
      fn = lambda q, k, v, p=pattern, i=impl: api.attention(q, k, v, pattern=p, implementation=i)
      try:
        o, o_ref = jax.jit(fn)(q, k, v), jax.jit(ref_fn)(q, k, v)
        g = jax.jit(jax.grad(lambda *a: loss(fn(*a)), argnums=(0, 1, 2)))(q, k, v)
        g_ref = jax.jit(jax.grad(lambda *a: loss(ref_fn(*a)), argnums=(0, 1, 2)))(q, k, v)
        err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-9))
        rec.add(section="check", impl=impl, pattern=repr(pattern), n=n, out_rel=err(o, o_ref),
                dq_rel=err(g[0], g_ref[0]), dk_rel=err(g[1], g_ref[1]), dv_rel=err(g[2], g_ref[2]),
                finite=bool(jnp.isfinite(o).all()))
      except Exception as e:  # noqa: BLE001
        rec.add(section="check", impl=impl, pattern=repr(pattern), n=n, error=f"{type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}")


def section_calib(rec: Recorder, reps):
  a = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
  t = timed(jax.jit(lambda x: x @ x), a, reps=reps)
  rec.add(section="calib", impl="matmul bf16 8192^3", ms=t * 1e3, tflops=2 * 8192**3 / t / 1e12)
  x = jax.random.normal(jax.random.PRNGKey(2), (1024, 1024, 256), jnp.float32)
  t = timed(jax.jit(lambda y: y + 1.0), x, reps=reps)
  rec.add(section="calib", impl="hbm copy f32 1 GiB", ms=t * 1e3, tb_s=2 * x.nbytes / t / 1e12)


def _dense_impls(blocks=None):
  p = Dense(True)
  return {
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
      "api(None)": lambda q, k, v: api.attention(q, k, v, pattern=p),
      "pallas_gpu": lambda q, k, v: pallas_attention(q, k, v, p, blocks=blocks)[0],
  }


def section_dense(rec: Recorder, reps):
  p = Dense(True)
  for n in (4096, 16384):
    for name, fn in _dense_impls(TUNED["blocks"]).items():
      measure(rec, "dense", name, p, n, fn, reps)
  measure(rec, "dense", "blockwise_xla", p, 16384,
          lambda q, k, v: api.attention(q, k, v, pattern=p, implementation="blockwise"), max(reps // 3, 2))
  measure(rec, "dense", "xla", p, 16384,
          lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"), 2)


FWD_CONFIGS = [dict(fwd_q=128, fwd_k=128, fwd_warps=8, fwd_stages=3),
               dict(fwd_q=128, fwd_k=128, fwd_warps=8, fwd_stages=3, heavy_first=False),
               dict(fwd_q=128, fwd_k=64, fwd_warps=8, fwd_stages=3)]
BWD_CONFIGS = [dict(dkv_q=64, dkv_k=64, dq_q=64, dq_k=64, bwd_warps=4, bwd_stages=2),
               dict(dkv_q=64, dkv_k=64, dq_q=64, dq_k=64, bwd_warps=4, bwd_stages=2, heavy_first=False),
               dict(dkv_q=64, dkv_k=64, dq_q=64, dq_k=64, bwd_warps=4, bwd_stages=1)]
TUNED = {"blocks": None}  # best BlockSizes found by section_tune, used by the later sections


def section_tune(rec: Recorder, reps):
  """Dense causal 16K: forward tiles by forward time, backward tiles by forward+backward time; keep the best."""
  p, n = Dense(True), 16384
  q, k, v = inputs(n)
  best = {}
  for kind, configs in (("fwd", FWD_CONFIGS), ("fwd+bwd", BWD_CONFIGS)):
    for i, cfg in enumerate(configs):
      # Backward candidates run behind the best forward found so far.
      blocks = BlockSizes(**{**best.get("fwd", ({}, 0.0))[0], **cfg})
      fwd, grad = fwd_and_grad(lambda q, k, v, b=blocks: pallas_attention(q, k, v, p, blocks=b)[0])
      try:
        t = timed(fwd if kind == "fwd" else grad, q, k, v, reps=reps)
      except Exception as e:  # noqa: BLE001
        rec.add(section="tune", impl=f"pallas_gpu {kind} cfg{i}", n=n, mode=kind, config=cfg, error=str(e)[:300])
        continue
      flops = 4 * D * B * masks.visible_pairs(p, n, H) * (3.5 if kind == "fwd+bwd" else 1.0)
      rec.add(section="tune", impl=f"pallas_gpu {kind} cfg{i}", pattern=repr(p), n=n, mode=kind, ms=t * 1e3,
              tflops=flops / t / 1e12, config=dataclasses.asdict(blocks))
      if kind not in best or t < best[kind][1]:
        best[kind] = (cfg, t)
  TUNED["blocks"] = BlockSizes(**{**best["fwd"][0], **best["fwd+bwd"][0]})
  rec.add(section="tune", impl="selected", config=dataclasses.asdict(TUNED["blocks"]))


def section_sparse(rec: Recorder, reps):
  sw, bs = SinkWindow(SINK, WINDOW), BlockSparse(64, 16, 8)
  blocks = TUNED["blocks"]
  for n in (32768, 131072):
    r = reps if n <= 32768 else max(reps // 3, 3)
    measure(rec, "sparse", "cudnn dense causal", Dense(True), n, _dense_impls()["cudnn"], r)
    measure(rec, "sparse", "cudnn window-only (no sink; lower bound)", SinkWindow(0, WINDOW), n,
            lambda q, k, v: api.attention(q, k, v, pattern=SinkWindow(0, WINDOW), implementation="cudnn"), r)
    measure(rec, "sparse", "pallas_gpu sink+window", sw, n,
            lambda q, k, v: pallas_attention(q, k, v, sw, blocks=blocks)[0], r)
    measure(rec, "sparse", "api(None) sink+window", sw, n,
            lambda q, k, v: api.attention(q, k, v, pattern=sw, blocks=blocks), r)
    measure(rec, "sparse", "pallas_gpu block_sparse(64,16,8)", bs, n,
            lambda q, k, v: api.attention(q, k, v, pattern=bs, implementation="pallas_gpu"), r)


SECTIONS = {"check": section_check, "calib": section_calib, "dense": section_dense, "tune": section_tune,
            "sparse": section_sparse}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=".", help="folder for attention.json")
  parser.add_argument("--sections", default="check,calib,tune,dense,sparse")
  parser.add_argument("--reps", type=int, default=10)
  args = parser.parse_args()
  device = jax.devices()[0].device_kind
  rec = Recorder(pathlib.Path(args.out) / "attention.json", device)
  print(f"device: {device}, jax {jax.__version__}", flush=True)
  for name in args.sections.split(","):
    t0 = time.time()
    try:
      SECTIONS[name](rec, args.reps)
    except Exception:  # noqa: BLE001  (keep the other sections' numbers)
      traceback.print_exc()
    print(f"-- section {name}: {time.time() - t0:.1f} s", flush=True)
  print_table(rec.rows)


def print_table(rows):
  print(f"{'section':8} {'impl':44} {'n':>7} {'mode':8} {'ms':>9} {'TFLOP/s':>8}  device")
  for r in rows:
    if "ms" in r:
      print(f"{r['section']:8} {r['impl'][:44]:44} {r.get('n', ''):>7} {r.get('mode', ''):8} {r['ms']:9.2f} "
            f"{r.get('tflops', r.get('tb_s', np.nan)):8.1f}  {r['device']}")
    elif "error" in r:
      print(f"{r['section']:8} {r['impl'][:44]:44} {r.get('n', ''):>7} {r.get('mode', ''):8} ERROR {r['error'][:80]}")


if __name__ == "__main__":
  main()
