"""Miras layers (Moneta, Yaad, Memora, Titans) vs our Gated DeltaNet layer: fwd and fwd+bwd tokens/s, FLOPs, % of peak.

Papers: "It's All Connected" (Behrouz et al., arXiv 2504.13173; Moneta/Yaad/Memora), "Titans: Learning to Memorize
at Test Time" (arXiv 2501.00663), "Gated Delta Networks" (arXiv 2412.06464). Spec §11.1–3 and §11.7: the 340M layer
shape d_model = 1024, H = 16, d_h = 64, bf16 activations (float32 fast weights), T = 4096 by default; every
variant (model × memory × gates × chunk × remat × implementation) and the GDN layer are timed in the same run.

FLOPs are counted first (analytic, matmuls only; backward = 2× forward) and cross-checked with XLA's cost analysis
of the compiled fwd+bwd; the achieved fraction of the device's dense bf16 peak is reported (``--peak-tflops``
overrides the table below). Each variant's output is also compared with the token-loop reference on a short
sequence (f32) before it is timed, so a fast-but-wrong variant shows up in the same table.

``--memory-op`` times the memory op alone for every variant, next to ``xla_flat`` (same gates, precision and remat),
with compile time and the largest error against the flat path; ``pallas_triton*`` variants at each Triton launch
setting of ``--warps 4,8 --hidden-tile 64,32 --pipeline 1,2``.
``--stages B`` times one chunk of B × H heads through each stage of the chunk step alone (gradients, reads, close),
to show where a chunk's time goes. ``--decode BxT`` adds spec §11.7: one-token decode latency after a T-token
prefill, and the decode cache's bytes per head, for GDN, attention (KV cache) and every variant; ``--fla`` adds
fla's ``chunk_gla`` kernel and ``--lucid`` lucidrains' ``NeuralMemory`` (spec §11.2, ``benchmarks/lucid_memory.py``),
each in a child process.

Usage (GPU): XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/miras.py --json $OUT/miras.json --fla
  more: --shapes 8x2048,8x4096,2x16384 --chunks 16,32,64,128 --gates channel,head --remat 0,1 --decode 8x4096 \\
        --models moneta,yaad,memora,titans --memories mlp,linear --impls xla_chunked,xla_chunked_bf16
Prints a table and writes JSON; every number is tagged with the device name.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import time

D_MODEL, HEADS, HEAD_DIM = 1024, 16, 64
HLO_DIR = ""  # --hlo-dir: where the compiled fwd+bwd HLO of every timed op is written
PROFILE = False  # --profile: each timed op's fwd and fwd+bwd GPU kernels (benchmarks/kernel_profile.py)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0}


def memory_flops(t: int, h: int, d: int, c: int, expansion: int, memory: str) -> float:
  """Matmul FLOPs of the chunked memory forward, per sequence of t tokens and h heads (spec §5.6 steps 1–5):

  MLP memory (E = expansion·d), per chunk of c tokens: keys through W₀ (2·2cdE), errors e1·W1 (2cdE), query reads
  through W₀ (2·2cdE) plus the dual-form masked products (QKᵀ and its product with e2: 2c²d + 2c²E; HqHᵀ and its
  product with e1: 2c²E + 2c²d), the chunk-end state (2·2cdE): 14cdE + 4c²(d + E). Linear memory: 8cd² + 4c²d.
  """
  if memory == "mlp":
    e = expansion * d
    per_chunk = 14 * c * d * e + 4 * c * c * (d + e)
  else:
    per_chunk = 8 * c * d * d + 4 * c * c * d
  return float(per_chunk * h * -(-t // c))


def layer_flops(b: int, t: int, memory_fwd: float, projections: int, gate_flops_per_token: float = 0.0) -> dict:
  """Forward and fwd+bwd FLOPs of a whole layer: ``projections`` D×D matmuls per token, gates, the memory."""
  fwd = b * (t * (projections * 2 * D_MODEL * D_MODEL + gate_flops_per_token) + memory_fwd)
  return {"fwd": float(fwd), "fwd_bwd": 3.0 * fwd}


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops")) if cost and cost.get("flops") is not None else None
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


@dataclasses.dataclass(frozen=True)
class Variant:
  model: str
  memory: str
  gates: str
  chunk: int
  remat: bool
  impl: str

  @property
  def name(self) -> str:
    return f"{self.model}[{self.memory},{self.gates},c{self.chunk}{',remat' if self.remat else ''},{self.impl}]"


def _layer(variant: Variant | None, dtype: str):
  from flax import nnx

  from layers.gated_deltanet import GatedDeltaNet, GDNConfig
  from layers.miras.mixers import MirasLayer
  from research.models import MixerContext
  from research.models.registry import MIXERS

  ctx = MixerContext(d_model=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)
  if variant is None:
    return GatedDeltaNet(GDNConfig(chunk_size=64), ctx, rngs=nnx.Rngs(0))
  cfg = MIXERS.config_class(variant.model)(memory=variant.memory, gates=variant.gates, chunk_size=variant.chunk,
                                           remat=variant.remat, implementation=variant.impl)
  return MirasLayer(cfg, ctx, rngs=nnx.Rngs(0))


def _check(variant: Variant, device: str) -> dict:
  """The variant's layer output vs the same layer on the token-loop reference (f32, B = 1, T = 2·chunk + 3)."""
  import jax
  import jax.numpy as jnp

  row = {"kind": "check", "op": variant.name, "device": device}
  try:
    layer = _layer(variant, "float32")
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 2 * variant.chunk + 3, D_MODEL))
    fast = jax.jit(lambda x: layer(x)[0])(x)
    layer.cfg = dataclasses.replace(layer.cfg, implementation="reference")
    slow = jax.jit(lambda x: layer(x)[0])(x)
    row["max_rel"] = float(jnp.max(jnp.abs(fast - slow)) / jnp.max(jnp.abs(slow)))
  except Exception as e:  # noqa: BLE001 - report and continue with the other variants
    row["error"] = repr(e)[:400]
  print("check", json.dumps(row), flush=True)
  return row


def _time_layer(op: str, layer, b: int, t: int, device: str, flops: dict, peak: float | None) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks.linear_attention import _median_ms

  row = {"kind": "time", "op": op, "B": b, "T": t, "device": device, "fwd_gflop": flops["fwd"] / 1e9,
         "fwd_bwd_gflop": flops["fwd_bwd"] / 1e9}
  try:
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.PRNGKey(3), (b, t, D_MODEL), jnp.bfloat16)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    loss = lambda p, x: jnp.sum(fwd(p, x).astype(jnp.float32) ** 2)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = fwd_bwd.lower(params, x).compile()
    row["xla_fwd_bwd_gflop"] = (_xla_flops(compiled) or float("nan")) / 1e9
    row["fwd_bwd_temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
    if HLO_DIR:
      name = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in f"{op}_B{b}_T{t}")
      with open(os.path.join(HLO_DIR, f"{name}.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    grads = jax.tree.leaves(compiled(params, x))
    row["grad_finite"] = bool(all(bool(jnp.all(jnp.isfinite(g))) for g in grads))
    row["grad_max_abs"] = float(max(float(jnp.max(jnp.abs(g))) for g in grads))
    row["fwd_ms"] = _median_ms(functools.partial(fwd, params, x))
    row["fwd_bwd_ms"] = _median_ms(functools.partial(compiled, params, x))
    if PROFILE:
      from benchmarks.kernel_profile import format_table, kernel_table
      for key, fn in (("fwd", fwd), ("fwd_bwd", compiled)):
        row[f"{key}_profile"] = kernel_table(functools.partial(fn, params, x), top=None)
        print(format_table(row[f"{key}_profile"], f"{op} {key} B{b} T{t} ({device})"), flush=True)
    for key in ("fwd", "fwd_bwd"):
      row[f"{key}_ktok_s"] = b * t / row[f"{key}_ms"]
      row[f"{key}_tflop_s"] = flops[key] / row[f"{key}_ms"] / 1e9
      if peak:
        row[f"{key}_peak_frac"] = row[f"{key}_tflop_s"] / peak
  except Exception as e:  # noqa: BLE001
    row["error"] = repr(e)[:400]
  print("time", json.dumps(row), flush=True)
  return row


def _attention_layer(dtype: str):
  from flax import nnx

  from research.models import MixerContext
  from research.models.registry import MIXERS

  ctx = MixerContext(d_model=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)
  return MIXERS.get("attn")(MIXERS.config_class("attn")(), ctx, rngs=nnx.Rngs(0))


def _time_decode(op: str, layer, b: int, context: int, device: str, steps: int = 16, warmup: int = 3) -> dict:
  """Spec §11.7: per-token decode latency after a prefill of ``context`` tokens, and the decode cache's bytes
  (a Miras layer keeps its memory plus a buffer of < chunk tokens; attention keeps every key and value)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from research.models.cache import DecodeCache

  row = {"kind": "decode", "op": op, "B": b, "T": context, "device": device}
  try:
    layer.init_cache(b, context + warmup + steps)
    graphdef, params, cache, rest = nnx.split(layer, nnx.Param, DecodeCache, ...)

    def forward(params, cache, rest, x):
      model = nnx.merge(graphdef, params, cache, rest)
      return model(x, use_cache=True)[0], nnx.state(model, DecodeCache)

    forward = jax.jit(forward, donate_argnums=1)
    x = jax.random.normal(jax.random.PRNGKey(4), (b, context + 1, D_MODEL), jnp.bfloat16)
    y, cache = forward(params, cache, rest, x[:, :context])
    row["cache_kib_per_head"] = sum(leaf.nbytes for leaf in jax.tree.leaves(cache)) / (b * HEADS) / 2**10
    samples = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      y, cache = forward(params, cache, rest, x[:, context:])
      jax.block_until_ready(y)
      samples.append((time.perf_counter() - t0) * 1e3)
    row["decode_ms_per_token"] = statistics.median(samples[warmup:])
  except Exception as e:  # noqa: BLE001
    row["error"] = repr(e)[:400]
  print("decode", json.dumps(row), flush=True)
  return row


def run_decode(shapes, variants: list[Variant], dtype: str) -> list[dict]:
  """Decode rows for our GDN layer, attention with its KV cache, and every variant, at each (B, context)."""
  import jax

  device = jax.devices()[0].device_kind
  rows = []
  for b, t in shapes:
    rows.append(_time_decode("gdn_layer", _layer(None, dtype), b, t, device))
    rows.append(_time_decode("attn_layer", _attention_layer(dtype), b, t, device))
    rows += [_time_decode(v.name, _layer(v, dtype), b, t, device) for v in variants]
  return rows


def _stage_inputs(spec, b: int, c: int, g: int):
  """Random per-(row, head) inputs of one chunk: state, momentum, q, k, v [b, H, c, d], gates [b, H, c, g], δ,
  complete flags, ln (γ, β) [H, d]."""
  import jax
  import jax.numpy as jnp

  ks = iter(jax.random.split(jax.random.PRNGKey(4), 8))
  normal = lambda *shape: jax.random.normal(next(ks), (b, HEADS, *shape))
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  state = {n: normal(*shape) / shape[1] ** 0.5 for n, shape in spec.memory.shapes(HEAD_DIM).items()}
  momentum = jax.tree.map(jnp.zeros_like, state) if spec.momentum else {}
  la = jax.nn.log_sigmoid(3.0 + normal(c, g))
  lp = jnp.cumsum(jax.nn.log_sigmoid(normal(c, g)), axis=-2) if spec.momentum else jnp.zeros_like(la)
  return dict(s=state, m=momentum, q=unit(normal(c, HEAD_DIM)), k=unit(normal(c, HEAD_DIM)),
              v=normal(c, HEAD_DIM), eta=0.1 * jax.nn.sigmoid(normal(c, g)), la=la, lb=jnp.cumsum(la, axis=-2),
              lp=lp, delta=jnp.ones((b, HEADS, c)), complete=jnp.ones((b, HEADS), bool),
              ln=(jnp.ones((HEADS, HEAD_DIM)), jnp.zeros((HEADS, HEAD_DIM))))


def run_stages(b: int, variants: list[Variant]) -> list[dict]:
  """One chunk of B × H heads through each stage of ``layers.kernels.miras.chunked`` alone (gradients, reads,
  close) and the whole chunk step, fwd and fwd+bwd: where a chunk's time goes, per stage."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from benchmarks.linear_attention import _median_ms
  from layers.kernels.miras import chunked
  from research.models.registry import MIXERS

  device = jax.devices()[0].device_kind
  rows = []
  for v in variants:
    spec = MIXERS.config_class(v.model)(memory=v.memory, gates=v.gates, chunk_size=v.chunk).memory_spec()
    mode = "bfloat16" if v.impl.endswith("_bf16") else "float32"
    spec = dataclasses.replace(spec, memory=dataclasses.replace(spec.memory, matmul=mode))
    x = _stage_inputs(spec, b, v.chunk, HEAD_DIM if v.gates == "channel" else 1)
    acts = jax.vmap(jax.vmap(functools.partial(chunked.stage_gradients, spec)), in_axes=(0,) * 4 + (None,))(
        x["s"], x["k"], x["v"], x["delta"], x["ln"])
    o = x["q"]
    xs = tuple(x[n] for n in ("q", "k", "v", "eta", "la", "lb", "lp", "delta", "complete"))
    stages = {  # name: (function of one head, its arguments; ln, the last, is per head only)
        "gradients": (chunked.stage_gradients, (x["s"], x["k"], x["v"], x["delta"], x["ln"])),
        "reads": (chunked.stage_reads, (x["s"], x["m"], acts, *(x[n] for n in ("q", "eta", "la", "lb", "lp")),
                                        x["ln"])),
        "close": (chunked.stage_close, (x["s"], x["m"], acts, o, *xs[:8], x["complete"], x["ln"])),
        "chunk step": (lambda spec, s, m, xs, ln: chunked.chunk_step(spec, (s, m), xs, ln),
                       (x["s"], x["m"], xs, x["ln"])),
    }
    for name, (fn, args) in stages.items():
      row = {"kind": "stage", "op": f"{v.name}:{name} (one chunk)", "B": b, "device": device}
      try:
        batched = jax.vmap(jax.vmap(functools.partial(fn, spec)), in_axes=(0,) * (len(args) - 1) + (None,))
        leaves, treedef = jax.tree.flatten(args)
        floats = [jnp.issubdtype(a.dtype, jnp.floating) for a in leaves]

        def total(float_leaves, batched=batched, leaves=leaves, treedef=treedef, floats=floats):
          """Sum of the stage's float outputs as a function of all its float inputs (flags held fixed)."""
          given = iter(float_leaves)
          outs = batched(*treedef.unflatten([next(given) if f else a for a, f in zip(leaves, floats)]))
          return sum(jnp.sum(y) for y in jax.tree.leaves(outs) if jnp.issubdtype(y.dtype, jnp.floating))

        fwd, fwd_bwd = jax.jit(batched), jax.jit(jax.grad(total))
        row["fwd_ms"] = _median_ms(functools.partial(fwd, *args))
        row["fwd_bwd_ms"] = _median_ms(functools.partial(fwd_bwd, [a for a, f in zip(leaves, floats) if f]))
      except Exception as e:  # noqa: BLE001
        row["error"] = repr(e)[:400]
      print("stage", json.dumps(row), flush=True)
      rows.append(row)
  return rows



CHECK_CHUNKS = 4  # the memory op's error against xla_flat is taken on the first 4 chunks: see run_memory_op


def run_memory_op(shapes, variants: list[Variant], tunings: list) -> list[dict]:
  """The memory op alone (``miras_memory`` on random q, k, v and the variant's gates at B × T × H × d_h, no layer
  around it), fwd and fwd+bwd (gradients of q, k, v): every variant's implementation (the Pallas kernels at each
  launch setting, ``pallas_triton.Tuning``, read as ``pallas_tiles.Tiling`` for those kernels) next to the XLA flat
  path with the same matmul precision and remat, with each one's largest error relative to that flat path, of the
  reads and of the gradients. The errors are taken on the first ``CHECK_CHUNKS`` chunks: Moneta's normalised memory
  is chaotic at these gates, so over 4096 tokens two correct paths drift apart (a 1e-6 relative change of v moves
  the float32 reads by 1.8 relative, max |o| ≈ 7)."""
  import jax
  import jax.numpy as jnp

  from benchmarks.linear_attention import _median_ms
  from layers.kernels.miras import api, pallas_tiles, pallas_triton
  from layers.miras.spec import Gates
  from research.models.registry import MIXERS

  device = jax.devices()[0].device_kind
  rows, baselines = [], {}  # the flat path's checked outputs per shape and variant group, timed once
  for (b, t), v in itertools.product(shapes, variants):
    spec = MIXERS.config_class(v.model)(memory=v.memory, gates=v.gates, chunk_size=v.chunk).memory_spec()
    g = HEAD_DIM if v.gates == "channel" else 1
    mode = "_bf16" if v.impl.endswith("_bf16") else ""
    ks = iter(jax.random.split(jax.random.PRNGKey(6), 8))
    normal = lambda *shape: jax.random.normal(next(ks), shape)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k, v_ = unit(normal(b, t, HEADS, HEAD_DIM)), unit(normal(b, t, HEADS, HEAD_DIM)), normal(b, t, HEADS, HEAD_DIM)
    gates = Gates(eta=0.1 * jax.nn.sigmoid(normal(b, t, HEADS, g)),
                  log_alpha=jax.nn.log_sigmoid(3.0 + normal(b, t, HEADS, g)), delta=None)
    state = {n: normal(b, HEADS, *shape) / shape[1] ** 0.5 for n, shape in spec.memory.shapes(HEAD_DIM).items()}
    kw = dict(spec=spec, initial_state=state, chunk_size=v.chunk)
    flat = f"xla_flat{mode}"
    runs = {flat: functools.partial(api.miras_memory, implementation=flat, remat=v.remat, **kw)}
    tuned = {"pallas_triton": lambda u: functools.partial(pallas_triton.miras_pallas, tuning=u),
             "pallas_tiles": lambda u: functools.partial(
                 pallas_tiles.miras_tiles, remat=v.remat,
                 tiling=pallas_tiles.Tiling(u.hidden_tile, u.num_warps, u.num_stages))}
    if (kernels := tuned.get(v.impl.removesuffix("_bf16"))) is not None:
      runs |= {f"{v.impl}[warps {u.num_warps}, E-tile {u.hidden_tile}, stages {u.num_stages}]":
               functools.partial(kernels(u), matmul="bfloat16" if mode else "float32", **kw) for u in tunings}
    else:
      runs[v.impl] = functools.partial(api.miras_memory, implementation=v.impl, remat=v.remat, **kw)
    check = slice(0, min(t, CHECK_CHUNKS * v.chunk))
    group = (b, t, v.model, v.memory, v.gates, v.chunk, v.remat, flat)
    checked = {}  # name -> (reads, gradients) on the first chunks
    if group in baselines:
      checked[flat] = baselines[group]
      del runs[flat]
    rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
    for name, fn in runs.items():
      row = {"kind": "memory_op", "op": f"{v.model}[{v.gates}{',remat' * v.remat}]:{name}", "B": b, "T": t,
             "device": device}
      base = checked.get(flat)
      try:  # the forward first, on its own: a backward that fails to compile or launch leaves its numbers
        fwd = jax.jit(lambda q, k, v_, gates, fn=fn: fn(q, k, v_, gates)[0])
        start = time.perf_counter()
        fwd(q, k, v_, gates).block_until_ready()
        row["fwd_compile_and_first_s"] = time.perf_counter() - start
        row["fwd_ms"] = _median_ms(functools.partial(fwd, q, k, v_, gates))
        loss = lambda q, k, v_, gates, fn=fn: jnp.sum(fn(q, k, v_, gates)[0] ** 2)
        fwd_bwd = jax.jit(jax.grad(loss, (0, 1, 2)))
        start = time.perf_counter()
        jax.block_until_ready(fwd_bwd(q, k, v_, gates))
        row["compile_and_first_s"] = time.perf_counter() - start
        row["fwd_bwd_ms"] = _median_ms(functools.partial(fwd_bwd, q, k, v_, gates))
        row["fwd_bwd_ktok_s"] = b * t / row["fwd_bwd_ms"]
        head = [x[:, check] for x in (q, k, v_)] + [jax.tree.map(lambda x: x[:, check], gates)]
        checked[name] = (fwd(*head), fwd_bwd(*head))
        baselines.setdefault(group, checked[flat])
        if base is not None:
          row["fwd_max_rel_vs_flat"] = rel(checked[name][0], base[0])
          row["max_rel_vs_flat"] = max(rel(x, y) for x, y in zip(jax.tree.leaves(checked[name]), jax.tree.leaves(base)))
      except Exception as e:  # noqa: BLE001 - report and continue with the other settings
        row["error"] = repr(e)[:400]
      print("memory_op", json.dumps(row), flush=True)
      rows.append(row)
  return rows

def run(shapes, variants: list[Variant], peak_override: float | None, dtype: str) -> list[dict]:
  import jax

  from benchmarks.linear_attention import chunked_gdn_flops

  device = jax.devices()[0].device_kind
  peak = peak_override or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
  rows = [{"kind": "meta", "device": device, "peak_bf16_tflops": peak}]
  rows += [_check(v, device) for v in variants if v.impl != "reference"]
  for b, t in shapes:
    gdn_fwd = chunked_gdn_flops(b, t, HEADS, HEAD_DIM, HEAD_DIM)["fwd"] / b
    gdn = _time_layer("gdn_layer", _layer(None, dtype), b, t, device, layer_flops(b, t, gdn_fwd, 5), peak)
    rows.append(gdn)
    for v in variants:
      gates = 2 * 2 * D_MODEL * 32 * 2 if v.gates == "channel" else 2 * 2 * D_MODEL * HEADS
      mem = memory_flops(t, HEADS, HEAD_DIM, v.chunk, 4, v.memory)
      row = _time_layer(v.name, _layer(v, dtype), b, t, device, layer_flops(b, t, mem, 5, gates), peak)
      if "error" not in row and "error" not in gdn:
        row["vs_gdn_fwd_bwd"] = row["fwd_bwd_ktok_s"] / gdn["fwd_bwd_ktok_s"]
      rows.append(row)
  return rows


COLUMNS = (  # (header, row key, format); a missing key prints "-"
    ("op", "op", "{}"), ("device", "device", "{}"), ("B", "B", "{}"), ("T", "T", "{}"),
    ("GFLOP fwd+bwd", "fwd_bwd_gflop", "{:.0f}"), ("XLA GFLOP", "xla_fwd_bwd_gflop", "{:.0f}"),
    ("compile s", "compile_and_first_s", "{:.1f}"),
    ("fwd ms", "fwd_ms", "{:.2f}"), ("fwd+bwd ms", "fwd_bwd_ms", "{:.2f}"),
    ("fwd+bwd ktok/s", "fwd_bwd_ktok_s", "{:.0f}"),
    ("TFLOP/s", "fwd_bwd_tflop_s", "{:.1f}"), ("peak fraction", "fwd_bwd_peak_frac", "{:.3f}"),
    ("× GDN", "vs_gdn_fwd_bwd", "{:.2f}"), ("temp GiB", "fwd_bwd_temp_gib", "{:.2f}"),
    ("torch peak GiB", "torch_peak_gib", "{:.2f}"), ("grads finite", "grad_finite", "{}"),
    ("max |grad|", "grad_max_abs", "{:.1e}"),
    ("check: max rel vs reference", "max_rel", "{:.1e}"), ("fwd max rel vs flat", "fwd_max_rel_vs_flat", "{:.1e}"),
    ("max rel vs flat", "max_rel_vs_flat", "{:.1e}"),
    ("decode ms/token", "decode_ms_per_token", "{:.3f}"),
    ("decode cache KiB/head", "cache_kib_per_head", "{:.1f}"), ("error", "error", "{:.80}"))


def _table(rows: list[dict]) -> str:
  cell = lambda r, key, fmt: fmt.format(r[key]) if key in r else "-"
  out = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "-|" * len(COLUMNS)]
  out += ["| " + " | ".join(cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |"
          for r in rows if r.get("kind") in ("time", "check", "decode", "stage", "memory_op", "error")]
  return "\n".join(out)


def main() -> None:
  global D_MODEL, HEADS, HEAD_DIM, HLO_DIR, PROFILE
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="miras.json", help="where to write all rows")
  parser.add_argument("--shapes", default="8x4096", help="BxT,BxT,...")
  parser.add_argument("--models", default="moneta", help="comma list of moneta, yaad, memora, titans")
  parser.add_argument("--memories", default="mlp", help="comma list of mlp, linear")
  parser.add_argument("--gates", default="channel,head", help="comma list of channel, head")
  parser.add_argument("--chunks", default="64", help="comma list of chunk sizes")
  parser.add_argument("--remat", default="1", help="comma list of 0/1: jax.checkpoint of the chunk body (default 1)")
  parser.add_argument("--impls", default="xla_flat_bf16,xla_split_bf16,pallas_triton_bf16",
                      help="comma list of layers.kernels.miras.IMPLEMENTATIONS")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak of this device (TFLOP/s)")
  parser.add_argument("--width", default=f"{D_MODEL}x{HEADS}x{HEAD_DIM}", help="d_model x heads x head_dim "
                      "(smaller for a CPU smoke run)")
  parser.add_argument("--decode", default="", help="BxT,...: also time one-token decode steps after a prefill of T "
                      "tokens, with the cache's bytes per head (spec §11.7); --shapes '' times only these")
  parser.add_argument("--fla", action="store_true", help="also time fla's chunk_gla kernel (GLA, channel gates) at "
                      "the same heads and head width, in a child process (needs fla-core, see docs/benchmarks.md)")
  parser.add_argument("--lucid", action="store_true", help="also time lucidrains' NeuralMemory (titans-pytorch, "
                      "depth 2, expansion 4, momentum off, the first --chunks) in a child process (spec §11.2; needs "
                      "its wheels, see benchmarks/lucid_memory.py)")
  parser.add_argument("--stages", type=int, default=0, help="B: also time one chunk of B × H heads through each "
                      "stage of the chunk step alone (gradients, reads, close), fwd and fwd+bwd")
  parser.add_argument("--memory-op", action="store_true", help="also time the memory op alone (no layer) for "
                      "every variant, next to xla_flat; pallas_triton* at each --warps × --hidden-tile × --pipeline")
  parser.add_argument("--memory-op-only", action="store_true", help="--memory-op and skip the layer timings (each "
                      "Pallas compile of the backward takes minutes, docs/benchmarks.md)")
  parser.add_argument("--warps", default="8", help="comma list of Triton num_warps for --memory-op "
                      "(layers.kernels.miras.pallas_triton.Tuning.num_warps, pallas_tiles.Tiling.num_warps)")
  parser.add_argument("--hidden-tile", default="64", help="comma list: columns of the memory's hidden axis E per "
                      "tile for --memory-op (layers.kernels.miras.pallas_triton.Tuning.hidden_tile)")
  parser.add_argument("--pipeline", default="1", help="comma list of Triton num_stages for --memory-op "
                      "(layers.kernels.miras.pallas_triton.Tuning.num_stages)")
  parser.add_argument("--timing-lock", default="", help="a file to hold an exclusive lock on while timing: several "
                      "runs on one GPU (say --gates head and --gates channel) then compile in parallel and time one "
                      "at a time")
  parser.add_argument("--hlo-dir", default="", help="write each timed op's compiled fwd+bwd HLO text here")
  parser.add_argument("--profile", action="store_true", help="also list each timed op's GPU kernels (count, time) "
                      "from JAX's profiler trace, fwd and fwd+bwd")
  args = parser.parse_args()
  HLO_DIR, PROFILE = args.hlo_dir, args.profile
  from benchmarks import linear_attention
  linear_attention.TIMING_LOCK = args.timing_lock
  if HLO_DIR:
    os.makedirs(HLO_DIR, exist_ok=True)
  D_MODEL, HEADS, HEAD_DIM = (int(n) for n in args.width.split("x"))
  split = lambda s: [x for x in s.split(",") if x]
  shapes = [tuple(int(n) for n in s.split("x")) for s in split(args.shapes)]
  variants = [Variant(m, mem, g, int(c), bool(int(r)), i) for m, mem, g, c, r, i in itertools.product(
      split(args.models), split(args.memories), split(args.gates), split(args.chunks), split(args.remat),
      split(args.impls)) if not (m == "titans" and g == "channel")]
  rows = run(shapes, variants, args.peak_tflops, args.dtype) if shapes and not args.memory_op_only else []
  if args.memory_op or args.memory_op_only:
    from layers.kernels.miras.pallas_triton import Tuning
    tunings = [Tuning(int(w), int(m), int(p)) for w in split(args.warps) for m in split(args.hidden_tile)
               for p in split(args.pipeline)]
    rows += run_memory_op(shapes, variants, tunings)
  rows += run_stages(args.stages, variants) if args.stages else []
  rows += run_decode([tuple(int(n) for n in s.split("x")) for s in split(args.decode)], variants, args.dtype)
  peers = []
  if args.fla and shapes:
    from benchmarks.linear_attention import fla_in_child
    for row in fla_in_child(args.shapes, HEADS, HEAD_DIM, args.json + ".fla"):
      if "fwd_bwd_mtok_s" in row:
        row["fwd_bwd_ktok_s"] = 1e3 * row["fwd_bwd_mtok_s"]
      peers.append(row)
  if args.lucid and shapes:
    from benchmarks.lucid_memory import in_child
    peers += in_child(args.shapes, HEADS, HEAD_DIM, int(split(args.chunks)[0]), args.json + ".lucid")
  for row in peers:
    gdn = next((r for r in rows if r.get("op") == "gdn_layer" and (r["B"], r["T"]) == (row.get("B"), row.get("T"))),
               {})
    if "fwd_bwd_ktok_s" in row and "fwd_bwd_ktok_s" in gdn:
      row["vs_gdn_fwd_bwd"] = row["fwd_bwd_ktok_s"] / gdn["fwd_bwd_ktok_s"]
    rows.append(row)
  import jax  # imported by run() already
  meta = {"argv": sys.argv, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "width": args.width}
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(_table(rows))


if __name__ == "__main__":
  main()
