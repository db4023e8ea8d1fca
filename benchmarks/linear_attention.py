"""Chunked Gated DeltaNet (ours, JAX) vs flash-linear-attention's Triton ``chunk_gla`` on the same GPU.

Papers: "Gated Delta Networks" (arXiv 2412.06464); "Gated Linear Attention Transformers with Hardware-Efficient
Training" (arXiv 2312.06635, fla ``chunk_gla``). Shapes: H = 16 heads, K = V = 128, bf16 inputs, float32 state;
(B, T) ∈ {(8, 2048), (4, 8192), (1, 32768)}. For each: forward and forward+backward (grads of q, k, v and the
gates) in ms and tokens/s, plus FLOP counts of our chunked form and its achieved TFLOP/s.

The fla baseline runs afterwards in a child process (run with XLA_PYTHON_CLIENT_PREALLOCATE=false so that
JAX leaves it GPU memory); its Triton autotuning takes minutes on a fresh machine. fla's
``chunk_gated_delta_rule`` refuses Triton < 3.7.1 on Hopper (fla #640); with ``--fla-gdn-unguarded`` it is also
timed with that guard switched off (its backward values are then untrusted, its timing representative).

``--part mom`` times whole layers instead: MoM ("MoM: Linear Sequence Modeling with Mixture-of-Memories", arXiv
2502.13685; 4 memories, top-2, shared memory) under packed and sorted dispatch, and one Gated DeltaNet layer,
all with d_model = H·K = 2048, bf16, forward and forward+backward (grads of the parameters and x), with XLA's
temp-buffer size of the compiled forward+backward.

Usage (GPU): XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 benchmarks/linear_attention.py \\
  --json $OUT/linear_attention.json --breakdown
Prints a table and writes JSON; every number is tagged with the device name.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time

SHAPES = ((8, 2048), (4, 8192), (1, 32768))
HEADS, DIM, CHUNK = 16, 128, 64
# End-to-end A/B of the Triton launch settings (``gated_delta.Tuning`` fields), timed with --tunings.
TUNINGS = {
    "default": {},
    "prev": {"scan_forward_stages": 1, "wy_backward_kernel": False},  # the previous defaults
    "fwd1": {"scan_forward_stages": 1},
    "xla_wy_bwd": {"wy_backward_kernel": False},
    "wy_bwd_4warps": {"wy_backward_warps": 4},
    "bwd2": {"scan_backward_stages": 2},
}


def chunked_gdn_flops(b: int, t: int, h: int, dk: int, dv: int, c: int = CHUNK) -> dict[str, float]:
  """Matmul FLOPs of our chunked forward (per chunk: KKᵀ, QKᵀ, T via log2(C) doubling steps, W, U, W·S, K̃ᵀV_new,
  Q·S, attention·V_new); backward ≈ 2× forward."""
  per_chunk = (2 * c * c * dk * 2 + 2 * (c.bit_length() - 1) * 2 * c ** 3 + 2 * c * c * (dk + dv)
               + 2 * c * dk * dv * 3 + 2 * c * c * dv)
  fwd = per_chunk * b * h * (-(-t // c))
  return {"fwd": float(fwd), "fwd_bwd": 3.0 * fwd}


TIMING_LOCK = ""  # --timing-lock: a file every timing holds an exclusive lock on


@contextlib.contextmanager
def alone_on_the_gpu():
  """With :data:`TIMING_LOCK` set, holds an exclusive ``flock`` on it: benchmark processes that share one GPU then
  compile in parallel (compiling is CPU work; a Pallas backward takes minutes) and time one at a time. Held around
  every timing here and around a whole peer child process (:func:`benchmarks.child.rows_from_child`)."""
  if not TIMING_LOCK:
    yield
    return
  import fcntl
  with open(TIMING_LOCK, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _median_ms(fn, *, warmup: int = 3, iters: int = 10) -> float:
  import jax
  with alone_on_the_gpu():
    for _ in range(warmup):
      jax.block_until_ready(fn())
    samples = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      samples.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(samples)


def run_jax(shapes, impls, breakdown: bool = False, tunings=()) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from layers.kernels.gated_delta import api, reference

  device = jax.devices()[0].device_kind
  rows = []

  def inputs(b, t, seed, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (b, t, HEADS, DIM))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (b, t, HEADS, DIM))).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, HEADS, DIM)).astype(dtype)
    g = jax.nn.log_sigmoid(jax.random.uniform(ks[3], (b, t, HEADS))) / 16
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, HEADS)))
    return q, k, v, g, beta

  # correctness on this GPU: each implementation (bf16 and f32) vs the f32 token recurrence
  q, k, v, g, beta = inputs(2, 512, 0, jnp.float32)
  o_ref, s_ref = jax.jit(reference.gated_delta_rule_reference)(q, k, v, g, beta)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32) * jnp.cos(o_ref))
  g_ref = jax.jit(jax.grad(loss(reference.gated_delta_rule_reference), argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
  rel = lambda x, y: float(jnp.linalg.norm(x.astype(jnp.float32) - y) / jnp.linalg.norm(y))
  for impl in impls:
    for dtype in (jnp.float32, jnp.bfloat16):
      try:
        fn = lambda *a, impl=impl: api.gated_delta_rule(*a, implementation=impl)
        args = tuple(x.astype(dtype) for x in (q, k, v)) + (g, beta)
        o, s = jax.jit(fn)(*args)
        grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(*args)
        check = {"impl": impl, "dtype": jnp.dtype(dtype).name, "device": device, "o_rel": rel(o, o_ref),
                 "state_rel": rel(s, s_ref), "grad_rel": max(rel(a, b) for a, b in zip(grads, g_ref))}
      except Exception as e:  # noqa: BLE001 - report and continue with the other variants
        check = {"impl": impl, "dtype": jnp.dtype(dtype).name, "device": device, "error": repr(e)[:400]}
      print("check", json.dumps(check), flush=True)
      rows.append({"kind": "check", **check})

  for b, t in shapes:
    rows += _time_ours(b, t, impls, device, inputs(b, t, 1, jnp.bfloat16))
    rows += _time_tunings(b, t, tunings, device, inputs(b, t, 1, jnp.bfloat16))
    if breakdown:
      rows += _time_components(b, t, device)
  return rows


def _time_tunings(b: int, t: int, names, device: str, args) -> list[dict]:
  """``pallas_triton`` end to end under each named ``TUNINGS`` entry (the tuning is a static argument: kernels are
  retraced per setting)."""
  from layers.kernels.gated_delta import Tuning

  rows = []
  for name in names:
    row = _time_ours(b, t, ["pallas_triton"], device, args, tuning=Tuning(**TUNINGS[name]))[0]
    row["op"] = f"gdn_pallas_triton[{name}]"
    rows.append(row)
  return rows


def _row(op: str, b: int, t: int, device: str, fwd, fwd_bwd, timer, flops=None) -> dict:
  """Time ``fwd()`` and ``fwd_bwd()`` with ``timer`` into one result row (errors recorded, not raised)."""
  row = {"kind": "time", "op": op, "B": b, "T": t, "device": device}
  try:
    row["fwd_ms"], row["fwd_bwd_ms"] = timer(fwd), timer(fwd_bwd)
    for key in ("fwd", "fwd_bwd"):
      row[f"{key}_mtok_s"] = b * t / row[f"{key}_ms"] / 1e3
      if flops is not None:
        row[f"{key}_tflop_s"] = flops[key] / row[f"{key}_ms"] / 1e9
  except Exception as e:  # noqa: BLE001 - report and continue with the other variants
    row["error"] = repr(e)[:400]
  print("time", json.dumps(row), flush=True)
  return row


def _time_ours(b: int, t: int, impls, device: str, args, tuning=None) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from layers.kernels.gated_delta import api

  do = jax.random.normal(jax.random.PRNGKey(2), args[2].shape, jnp.bfloat16).astype(jnp.float32)
  rows = []
  for impl in impls:
    out = functools.partial(api.gated_delta_rule, implementation=impl, tuning=tuning)
    fwd = jax.jit(lambda *a, out=out: out(*a)[0])
    fwd_bwd = jax.jit(jax.grad(lambda *a, out=out: jnp.sum(out(*a)[0].astype(jnp.float32) * do),
                               argnums=(0, 1, 2, 3, 4)))
    rows.append(_row(f"gdn_{impl}", b, t, device, functools.partial(fwd, *args),
                     functools.partial(fwd_bwd, *args), _median_ms, chunked_gdn_flops(b, t, HEADS, DIM, DIM)))
  return rows


def _time_components(b: int, t: int, device: str) -> list[dict]:
  """Pieces of the pallas_triton path alone: the fused WY kernel (forward, and forward + analytic backward) and
  the state-scan kernels (forward / backward kernel alone, Triton num_stages 1 and 2)."""
  import jax
  import jax.numpy as jnp

  from layers.kernels.gated_delta import Tuning, pallas_triton, wy

  n = -(-t // CHUNK)
  ks = jax.random.split(jax.random.PRNGKey(3), 7)
  shape = (b, HEADS, n, CHUNK, DIM)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  k = unit(jax.random.normal(ks[0], shape)).astype(jnp.bfloat16)
  u = jax.random.normal(ks[1], shape).astype(jnp.bfloat16)
  w, kd = ((0.05 * jax.random.normal(kk, shape)).astype(jnp.bfloat16) for kk in ks[2:4])
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], shape[:4]))
  gamma = jnp.cumsum(jax.nn.log_sigmoid(jax.random.uniform(ks[5], shape[:4])) / 16, axis=-1)
  decay = jnp.exp(gamma[..., -1])
  s0 = jnp.zeros((b, HEADS, DIM, DIM), jnp.float32)
  d_states = jax.random.normal(ks[6], (b, HEADS, n, DIM, DIM)).astype(jnp.bfloat16)
  wy_loss = lambda *a: sum(jnp.sum(x.astype(jnp.float32) * u.astype(jnp.float32))
                           for x in wy.wy_representation(*a, impl="pallas_triton"))
  cases = {
      "wy_pallas_fwd": (jax.jit(lambda *a: wy.wy_representation(*a, impl="pallas_triton")), (k, u, beta, gamma)),
      "wy_pallas_fwd_bwd": (jax.jit(jax.grad(wy_loss, argnums=(0, 1, 2, 3))), (k, u, beta, gamma)),
  }
  for stages in (1, 2):
    cases[f"scan_fwd_kernel_stages{stages}"] = (
        jax.jit(lambda *a, st=stages: pallas_triton.forward(*a, tuning=Tuning(scan_forward_stages=st))),
        (w, u, kd, decay, s0))
    cases[f"scan_bwd_kernel_stages{stages}"] = (
        jax.jit(lambda *a, st=stages: pallas_triton.backward(*a, tuning=Tuning(scan_backward_stages=st))),
        (w, kd, decay, d_states, u, s0))
  rows = []
  for name, (fn, args) in cases.items():
    row = {"kind": "component", "op": name, "B": b, "T": t, "device": device}
    try:
      row["ms"] = _median_ms(functools.partial(fn, *args))
    except Exception as e:  # noqa: BLE001
      row["error"] = repr(e)[:400]
    print("time", json.dumps(row), flush=True)
    rows.append(row)
  return rows


def run_fla(shapes, unguarded_gdn: bool) -> list[dict]:
  import torch

  device = torch.cuda.get_device_name()
  rows = []
  for b, t in shapes:
    rows += _time_fla_at(b, t, unguarded_gdn, device)
    torch.cuda.empty_cache()
  return rows


def _time_fla_at(b: int, t: int, unguarded_gdn: bool, device: str) -> list[dict]:
  import torch
  import torch.nn.functional as F
  import triton
  from fla.ops.gla import chunk_gla

  torch.manual_seed(0)
  shape = (b, t, HEADS, DIM)
  q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
  gk = (F.logsigmoid(torch.randn(shape, device="cuda")) / 16).to(torch.bfloat16).requires_grad_()
  do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
  variants = [("fla_chunk_gla", lambda: chunk_gla(q, k, v, gk)[0])]
  if unguarded_gdn:
    from fla.ops.common import chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    chunk_o.IS_NVIDIA_HOPPER = False  # timing only: fla #640 makes its gated backward untrusted here
    qn, kn = (F.normalize(x.detach().float(), dim=-1).to(torch.bfloat16).requires_grad_() for x in (q, k))
    g = (F.logsigmoid(torch.rand(b, t, HEADS, device="cuda")) / 16).requires_grad_()
    beta = torch.rand(b, t, HEADS, device="cuda").sigmoid().requires_grad_()
    variants.append(("fla_chunk_gdn_unguarded", lambda: chunk_gated_delta_rule(qn, kn, v, g, beta)[0]))

  def timer(fn):
    with torch.no_grad() if fn in forwards else contextlib.nullcontext():
      return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

  forwards = [fwd for _, fwd in variants]
  return [_row(name, b, t, device, fwd, functools.partial(_backward, fwd, do), timer) for name, fwd in variants]


def fla_in_child(shapes: str, heads: int, dim: int, child_json: str, unguarded_gdn: bool = False) -> list[dict]:
  """fla's rows (``--part fla``) timed in a child process, so that fla's Triton and PyTorch's allocator run beside a
  JAX process that has left them GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=false); an error row if it fails."""
  cmd = [sys.executable, os.path.abspath(__file__), "--part", "fla", "--json", child_json, "--shapes", shapes,
         "--heads", str(heads), "--dim", str(dim)] + (["--fla-gdn-unguarded"] if unguarded_gdn else [])
  from benchmarks.child import rows_from_child

  return rows_from_child(cmd, child_json, "fla")


def run_mom(shapes) -> list[dict]:
  """MoM (packed, sorted) and GDN layers, fwd and fwd+bwd, at each (B, T)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from layers.gated_deltanet import GatedDeltaNet, GDNConfig
  from layers.mom import MixtureOfMemories, MoMConfig
  from research.models import MixerContext

  device = jax.devices()[0].device_kind
  gdn = GDNConfig(chunk_size=CHUNK)
  ctx = MixerContext(d_model=HEADS * DIM, num_heads=HEADS, head_dim=DIM, dtype="bfloat16")
  mom = lambda dispatch: MixtureOfMemories(MoMConfig(memory=gdn, dispatch=dispatch), ctx, rngs=nnx.Rngs(0))
  layers = {"mom_packed": lambda: mom("packed"), "mom_sorted": lambda: mom("sorted"),
            "gdn_layer": lambda: GatedDeltaNet(gdn, ctx, rngs=nnx.Rngs(0))}
  rows = []
  for b, t in shapes:
    x = jax.random.normal(jax.random.PRNGKey(3), (b, t, ctx.d_model), jnp.bfloat16)
    outputs = {}
    for name, make in layers.items():
      graphdef, params = nnx.split(make())
      fwd = jax.jit(lambda p, x, graphdef=graphdef: nnx.merge(graphdef, p)(x)[0])
      loss = lambda p, x, fwd=fwd: jnp.sum(fwd(p, x).astype(jnp.float32) ** 2)
      fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
      row = _row(name, b, t, device, functools.partial(fwd, params, x), functools.partial(fwd_bwd, params, x),
                 _median_ms)
      if "error" not in row:
        row["fwd_bwd_temp_bytes"] = fwd_bwd.lower(params, x).compile().memory_analysis().temp_size_in_bytes
        outputs[name] = fwd(params, x).astype(jnp.float32)
      rows.append(row)
      del params
    if {"mom_packed", "mom_sorted"} <= set(outputs):  # same weights (same seed): the dispatches must agree
      a, b_ = outputs["mom_packed"], outputs["mom_sorted"]
      check = {"kind": "check", "op": "mom packed vs sorted", "B": b, "T": t, "device": device,
               "rel": float(jnp.linalg.norm(a - b_) / jnp.linalg.norm(b_))}
      print("check", json.dumps(check), flush=True)
      rows.append(check)
  return rows


def _backward(fwd, do) -> None:
  fwd().backward(do)


def _table(rows: list[dict]) -> str:
  lines = ["| op | device | B | T | fwd ms | fwd+bwd ms | fwd Mtok/s | fwd+bwd Mtok/s | fwd+bwd TFLOP/s |",
           "|-|-|-|-|-|-|-|-|-|"]
  for r in rows:
    if r.get("kind") == "component":
      lines.append(f"| {r['op']} | {r['device']} | {r['B']} | {r['T']} | {r.get('ms', float('nan')):.3f} |||||")
    if r.get("kind") != "time":
      continue
    if "error" in r:
      lines.append(f"| {r['op']} | {r['device']} | {r['B']} | {r['T']} | error: {r['error'][:80]} |||||")
      continue
    tf = f"{r['fwd_bwd_tflop_s']:.1f}" if "fwd_bwd_tflop_s" in r else "-"
    if "fwd_bwd_temp_bytes" in r:
      tf += f" (XLA temp {r['fwd_bwd_temp_bytes'] / 2**30:.2f} GiB)"
    lines.append(f"| {r['op']} | {r['device']} | {r['B']} | {r['T']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                 f"{r['fwd_mtok_s']:.2f} | {r['fwd_bwd_mtok_s']:.2f} | {tf} |")
  return "\n".join(lines)


def main() -> None:
  global HEADS, DIM
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="linear_attention.json", help="where to write all rows")
  parser.add_argument("--part", choices=("all", "jax", "fla", "mom"), default="all")
  parser.add_argument("--impls", default="pallas_triton,xla_chunked", help="our implementations to time")
  parser.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="BxT,BxT,...")
  parser.add_argument("--breakdown", action="store_true", help="also time the WY and state-scan kernels alone")
  parser.add_argument("--tunings", default="", help=f"comma list of {', '.join(TUNINGS)}: A/B of Triton settings")
  parser.add_argument("--fla-gdn-unguarded", action="store_true", help="also time fla GDN with its guard off")
  parser.add_argument("--heads", type=int, default=HEADS, help="heads H (the Miras comparison uses 16)")
  parser.add_argument("--dim", type=int, default=DIM, help="head width K = V (the Miras comparison uses 64)")
  args = parser.parse_args()
  HEADS, DIM = args.heads, args.dim
  shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
  rows: list[dict] = []
  if args.part in ("all", "jax"):  # ours first: fla's Triton autotuning takes minutes on a fresh machine
    rows += run_jax(shapes, args.impls.split(","), args.breakdown, [n for n in args.tunings.split(",") if n])
  if args.part == "mom":
    rows = run_mom(shapes)
  if args.part == "fla":
    rows = run_fla(shapes, args.fla_gdn_unguarded)
  elif args.part == "all":
    rows += fla_in_child(args.shapes, HEADS, DIM, args.json + ".fla", args.fla_gdn_unguarded)
  meta = {"argv": sys.argv}
  try:
    import jax
    meta.update(jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
  except ImportError:
    pass
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(_table(rows))


if __name__ == "__main__":
  main()
