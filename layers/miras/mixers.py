"""Miras deep-memory mixers ``moneta``, ``yaad``, ``memora`` and ``titans``, each with its own config.

Papers: "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization" (Behrouz et al., arXiv 2504.13173, §5.3–5.4): Moneta (ℓp bias, ℓq retention, p = 3, q = 4), Yaad
(Huber mixture, decay), Memora (ℓ2 bias, KL retention on the simplex); "Titans: Learning to Memorize at Test Time"
(arXiv 2501.00663): ℓ2 bias, decay, gradient descent with momentum. All four use the 2-layer residual MLP memory
x + LN(W1 gelu(W2 x)) per head (``--<name>.memory linear`` for the W x ablation).

Block (spec §5.5), for x [b, t, D] with H heads of width d: q/k/v projections → depthwise causal conv (+SiLU,
``layers.gated_deltanet.causal_conv``) → L2-normalised q, k per head → gates from x (η = max_lr·sigmoid, bias −2;
α = sigmoid, bias +4.6; δ = softplus, bias 0.54; Titans' momentum μ = sigmoid, bias +2.2), low rank (D → rank → H·d)
for channel gates, one scalar per head otherwise → the memory (``layers.kernels.miras``), read with q → per-head
RMSNorm gated by SiLU(W_g x) → output projection (``layers.gated_deltanet.GatedOutput``). The initial memory W₀ is a
learned parameter per head (Moneta: its accumulator A₀, initialised so that W₀ = A₀/‖A₀‖_q^{q−2} has N(0, 1/fan-in)
entries; Memora: row logits, W₀ = softmax); the LayerNorm affine of the MLP memory is a slow parameter per head.

Decoding is chunk-consistent (spec §9, TNT Fig. 2): the cache holds the state at the last chunk boundary plus a
buffer of the ≤ c − 1 tokens since (their keys, values and gates), so a prompt followed by single tokens gives the
outputs of one pass over the whole sequence; each step re-runs the buffered chunk (O(c) work per token).
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.gated_deltanet import GatedOutput, GDNConfig, MemoryCache, MemoryShape, causal_conv, init_conv_weight
from layers.gated_deltanet import l2_normalize
from layers.kernels.miras import IMPLEMENTATIONS, miras_memory
from layers.miras.bias import L2, Lp, YaadHuber
from layers.miras.memory import LinearMemory, MLPMemory
from layers.miras.retention import Decay, LqNorm, SoftmaxKL
from layers.miras.spec import READS, Gates, MemorySpec
from research.config import Config, Problem, option
from research.models.blocks import dense
from research.models.registry import MixerContext, register_mixer

MEMORIES = ("mlp", "linear")
GATE_KINDS = ("channel", "head")


@dataclasses.dataclass(frozen=True)
class MirasConfig(Config, abc.ABC):
  """Settings shared by the Miras layers.

  Attributes:
    memory: fast-weight architecture: ``mlp`` (x + LN(W1 gelu(W2 x)), the paper's) or ``linear`` (W x).
    expansion: hidden width of the MLP memory, in multiples of the head width.
    chunk_size: tokens whose inner gradients share the chunk-start weights (semantic; decoding uses the same).
    gates: ``channel`` (η, α per channel of each head, on each weight's head-width axis) or ``head`` (one each).
    gate_rank: rank of the low-rank projections that produce channel gates.
    max_lr: largest inner learning rate; η = max_lr · sigmoid(·).
    read: ``post`` (token t reads the memory after its own write) or ``pre`` (before it).
    conv_size: short causal conv window of q, k, v.
    inner_clip: None (the paper's update) or τ > 0: each token's inner gradient is rescaled to norm ≤ τ
      (``layers.miras.spec.MemorySpec.inner_clip``; docs/results.md says where it keeps T = 4096 training finite).
    remat: recompute each chunk in the backward pass instead of storing its intermediates: on an H200 at the 340M
      layer shape it is both faster (54 vs 79 ms fwd+bwd, per-head gates) and 7× smaller in temporaries
      (docs/benchmarks.md), so it is the default.
    implementation: memory kernel (``layers.kernels.miras.IMPLEMENTATIONS``), None for the first that applies
      (float32 matmuls). On a GPU the fastest measured Moneta layer at 8 × 4096 on an H100 is, with channel gates,
      ``pallas_tiles_bf16``: 73 ms fwd+bwd (``xla_flat_bf16`` 79 ms); with per-head gates
      ``pallas_mosaic_chain_bf16``: 14.4 ms, GDN 7.3 (21.8 ms against ``pallas_mosaic_bf16``'s 25.5 in one run,
      ``pallas_tiles_bf16`` 30.3 ms and ``xla_split_bf16`` 47.3 ms earlier; docs/benchmarks.md).
  """

  memory: str = option("mlp", choices=MEMORIES)
  expansion: int = option(4, minimum=1)
  chunk_size: int = option(64, minimum=1)
  gates: str = option("channel", choices=GATE_KINDS)
  gate_rank: int = option(32, minimum=1)
  max_lr: float = option(1.0, minimum=0.0)
  read: str = option("post", choices=READS)
  conv_size: int = option(4, minimum=1)
  inner_clip: float | None = option(None)
  remat: bool = option(True, resumable=True)
  implementation: str | None = option(None, choices=IMPLEMENTATIONS, resumable=True)

  def architecture(self) -> LinearMemory | MLPMemory:
    return MLPMemory(self.expansion) if self.memory == "mlp" else LinearMemory()

  def check(self):
    if self.inner_clip is not None and self.inner_clip <= 0:
      yield Problem("inner_clip", f"must be > 0 or none (got {self.inner_clip})")

  def _spec(self, bias, retention, momentum: bool = False) -> MemorySpec:
    """This layer's memory from its bias and retention, with the shared architecture, read and clip settings."""
    return MemorySpec(self.architecture(), bias, retention, momentum=momentum, read=self.read,
                      inner_clip=self.inner_clip)

  @abc.abstractmethod
  def memory_spec(self) -> MemorySpec:
    """The memory this layer trains: architecture, attentional bias, retention (each registered subclass)."""


@dataclasses.dataclass(frozen=True)
class MonetaConfig(MirasConfig):
  """Moneta (``moneta``): ℓp attentional bias, ℓq-normalised accumulator A, W = A / ‖A‖_q^{q−2}.

  Attributes:
    p: exponent of the ℓp bias Σ (r² + eps)^{p/2}.
    q: exponent of the ℓq retention.
    eps: smoothing of |r| ≈ sqrt(r² + eps).
  """

  p: float = option(3.0, minimum=1.0)
  q: float = option(4.0, minimum=1.0)
  eps: float = option(1e-6, minimum=0.0)

  def check(self):
    yield from super().check()
    if self.p < 2 and self.eps == 0:
      yield Problem("eps", f"must be > 0 when p < 2 (got p={self.p}, eps=0)")

  def memory_spec(self) -> MemorySpec:
    return self._spec(Lp(self.p, self.eps), LqNorm(self.q))


@dataclasses.dataclass(frozen=True)
class YaadConfig(MirasConfig):
  """Yaad (``yaad``): ‖r‖² where ‖r‖ ≤ δ_t, else δ_t·ℓ1 (Huber mixture), multiplicative decay.

  Attributes:
    eps: smoothing of the ℓ1 branch, |r| ≈ sqrt(r² + eps). At 1e-6 (spec §9) the branch writes a sign pattern
      whose derivative in the values is ~eps/|r|³, so the memory passes the value projection almost no gradient:
      Yaad stays at chance on MQAR; eps = 1 with ``inner_clip`` none (or 0.3) learns it, at the price of the
      T = 4096 stability that the default clip buys (docs/results.md, "Gates and Yaad's smoothing").
    inner_clip: 0.1 by default: unclipped, outer gradients overflow at T = 4096 (docs/results.md); ``none`` for the
      paper's update.
  """

  eps: float = option(1e-6, minimum=0.0)
  inner_clip: float | None = option(0.1)

  def memory_spec(self) -> MemorySpec:
    return self._spec(YaadHuber(self.eps), Decay())


@dataclasses.dataclass(frozen=True)
class MemoraConfig(MirasConfig):
  """Memora (``memora``): ℓ2 bias, KL retention: W_t = Softmax(α_t log W_{t−1} − η_t ∇ℓ), rows on the simplex.

  Attributes:
    clamp: W is clamped to at least this before the log.
    inner_clip: 0.1 by default: unclipped, outer gradients overflow at T = 4096 (docs/results.md); ``none`` for the
      paper's update.
  """

  clamp: float = option(1e-6, minimum=0.0)
  inner_clip: float | None = option(0.1)

  def memory_spec(self) -> MemorySpec:
    return self._spec(L2(), SoftmaxKL(self.clamp))


@dataclasses.dataclass(frozen=True)
class TitansConfig(MirasConfig):
  """Titans-style memory (``titans``): ℓ2 bias, decay (forget gate), gradient descent with momentum.

  Attributes:
    gates: one gate per head (Titans, lucidrains' titans-pytorch); the momentum recurrence needs it.
  """

  gates: str = option("head", choices=GATE_KINDS)

  def check(self):
    yield from super().check()
    if self.gates != "head":
      yield Problem("gates", f"must be head for the momentum recurrence (got {self.gates!r})")

  def memory_spec(self) -> MemorySpec:
    return self._spec(L2(), Decay(), momentum=True)


class GateProjection(nnx.Module):
  """x [b, t, D] -> pre-activation [b, t, H, g] + bias: one projection (g = 1) or D → rank → H·g (channel)."""

  def __init__(self, d_model: int, heads: int, width: int, rank: int, bias: float, *, dtype, rngs: nnx.Rngs):
    self.heads, self.width = heads, width
    self.down = dense(d_model, rank, dtype=dtype, rngs=rngs, axes=("embed", None)) if width > 1 else None
    self.up = dense(rank if width > 1 else d_model, heads * width, dtype=dtype, rngs=rngs,
                    axes=(None if width > 1 else "embed", None))
    self.bias = nnx.Param(jnp.full((heads, width), bias, jnp.float32), logical_axes=(None, None))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.down(x) if self.down is not None else x
    z = self.up(h).astype(jnp.float32).reshape(*x.shape[:2], self.heads, self.width)
    return z + self.bias[...]


def _initial_memory(spec: MemorySpec, heads: int, d: int, rngs: nnx.Rngs) -> dict[str, jax.Array]:
  """Per-head initial state {layer: [H, out, in]}: W₀ ~ N(0, 1/in), as Moneta's A₀ or Memora's row logits."""
  out = {}
  for name, (rows, cols) in spec.memory.shapes(d).items():
    w = jax.random.normal(rngs.params(), (heads, rows, cols)) / math.sqrt(cols)
    ret = spec.retention
    if isinstance(ret, SoftmaxKL):
      w = math.sqrt(cols) * w  # logits ~ N(0, 1): random rows on the simplex, not all uniform
    elif isinstance(ret, LqNorm) and ret.q != 3:  # A₀ = c·W₀ with c^{3−q} = ‖W₀‖_q^{q−2}, so view(A₀) = W₀
      norm = jnp.sum(jnp.abs(w) ** ret.q, axis=(1, 2), keepdims=True) ** (1 / ret.q)
      w = w * norm ** ((ret.q - 2) / (3 - ret.q))
    out[name] = w
  return out


class MirasLayer(nnx.Module):
  """A Miras memory layer: x [b, t, D] -> (y [b, t, D], {}); the memory is set by the config's ``memory_spec``.

  ``__call__(x, use_cache=True)`` continues from (and updates) the decode cache made by :meth:`init_cache`.
  """

  def __init__(self, cfg: MirasConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
    self.cfg, self.spec = cfg, cfg.memory_spec()
    self.shape = s = MemoryShape(ctx.d_model, ctx.num_heads, ctx.resolved_head_dim, GDNConfig(conv_size=cfg.conv_size),
                                 ctx.dtype, ctx.norm_eps, ctx.out_init_std)
    h, d = s.num_heads, s.head_dim
    proj = lambda: dense(s.d_model, s.key_dim, dtype=s.compute_dtype, rngs=rngs, axes=("embed", "heads"))
    self.q_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
    self.q_conv, self.k_conv, self.v_conv = (init_conv_weight(cfg.conv_size, s.key_dim, rngs) for _ in range(3))
    width = d if cfg.gates == "channel" else 1
    gate = lambda w, bias: GateProjection(s.d_model, h, w, cfg.gate_rank, bias, dtype=s.compute_dtype, rngs=rngs)
    self.eta_gate, self.alpha_gate = gate(width, -2.0), gate(width, 4.6)
    self.delta_gate = gate(1, 0.54) if self.spec.bias.needs_delta else None
    self.momentum_gate = gate(width, 2.2) if self.spec.momentum else None
    self.initial = nnx.Dict({n: nnx.Param(w, logical_axes=(None, None, None))
                             for n, w in _initial_memory(self.spec, h, d, rngs).items()})
    mlp = isinstance(self.spec.memory, MLPMemory)
    self.ln_scale = nnx.Param(jnp.ones((h, d), jnp.float32), logical_axes=(None, None)) if mlp else None
    self.ln_bias = nnx.Param(jnp.zeros((h, d), jnp.float32), logical_axes=(None, None)) if mlp else None
    self.out = GatedOutput(s, rngs=rngs)
    self.cache: nnx.Dict | None = nnx.data(None)  # made by init_cache

  def initial_state(self, batch: int) -> tuple[dict, dict | None]:
    """(state {layer: [b, H, out, in]} float32, momentum or None) at a sequence start."""
    state = {n: w[...] for n, w in self.initial.items()}
    if isinstance(self.spec.retention, SoftmaxKL):
      state = {n: jax.nn.softmax(w, axis=-1) for n, w in state.items()}
    state = {n: jnp.broadcast_to(w, (batch, *w.shape)) for n, w in state.items()}
    return state, ({n: jnp.zeros_like(w) for n, w in state.items()} if self.spec.momentum else None)

  def init_cache(self, batch_size: int, max_length: int | None = None) -> None:
    """Reset the decode cache for ``batch_size`` sequences; ``max_length`` is accepted for the common interface (the
    state and the ≤ chunk_size − 1 token buffer do not grow with it)."""
    s, c = self.shape, self.cfg.chunk_size
    h, d, g = s.num_heads, s.head_dim, (s.head_dim if self.cfg.gates == "channel" else 1)
    state, momentum = self.initial_state(batch_size)
    zeros = lambda *shape: MemoryCache(jnp.zeros((batch_size, *shape), jnp.float32))
    self.cache = nnx.Dict(
        state=nnx.Dict({n: MemoryCache(w) for n, w in state.items()}),
        momentum=nnx.Dict({n: MemoryCache(w) for n, w in (momentum or {}).items()}),
        q=zeros(self.cfg.conv_size - 1, s.key_dim), k=zeros(self.cfg.conv_size - 1, s.key_dim),
        v=zeros(self.cfg.conv_size - 1, s.key_dim), count=MemoryCache(jnp.zeros((batch_size,), jnp.int32)),
        buf_k=zeros(c - 1, h, d), buf_v=zeros(c - 1, h, d), buf_eta=zeros(c - 1, h, g), buf_la=zeros(c - 1, h, g),
        buf_delta=zeros(c - 1, h), buf_lmu=zeros(c - 1, h, g))

  def _ln(self):
    return None if self.ln_scale is None else (self.ln_scale[...], self.ln_bias[...])

  def __call__(self, x: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    s, cfg = self.shape, self.cfg
    b, t, _ = x.shape
    if use_cache and self.cache is None:
      raise ValueError("use_cache=True needs init_cache(batch_size) first")
    feats = {}
    for name, proj, weight in (("q", self.q_proj, self.q_conv), ("k", self.k_proj, self.k_conv),
                               ("v", self.v_proj, self.v_conv)):
      prefix = self.cache[name][...] if use_cache else jnp.zeros((b, cfg.conv_size - 1, s.key_dim), x.dtype)
      feats[name], ext = causal_conv(proj(x), weight[...], prefix)
      if use_cache:
        self.cache[name][...] = ext[:, t:].astype(jnp.float32)
    heads = lambda z: z.reshape(b, t, s.num_heads, s.head_dim)
    q, k, v = l2_normalize(heads(feats["q"])), l2_normalize(heads(feats["k"])), heads(feats["v"])
    gates = Gates(eta=cfg.max_lr * jax.nn.sigmoid(self.eta_gate(x)), log_alpha=jax.nn.log_sigmoid(self.alpha_gate(x)),
                  delta=None if self.delta_gate is None else jax.nn.softplus(self.delta_gate(x))[..., 0],
                  log_momentum=None if self.momentum_gate is None else jax.nn.log_sigmoid(self.momentum_gate(x)))
    if use_cache:
      o = self._cached_memory(q, k, v, gates)
    else:
      state, momentum = self.initial_state(b)
      o, _, _ = miras_memory(q, k, v, gates, spec=self.spec, initial_state=state, initial_momentum=momentum,
                             ln=self._ln(), chunk_size=cfg.chunk_size, remat=cfg.remat,
                             implementation=cfg.implementation)
    return self.out(o.astype(x.dtype), x), {}

  def _cached_memory(self, q, k, v, gates: Gates) -> jax.Array:
    """Run [buffered tokens ‖ new tokens] from the cached boundary state; keep the new trailing partial chunk."""
    cache, c, spec = self.cache, self.cfg.chunk_size, self.spec
    b, t = q.shape[:2]
    n = cache["count"][...]
    length = c - 1 + t
    delta = gates.delta if gates.delta is not None else jnp.ones(q.shape[:3], jnp.float32)
    lmu = gates.log_momentum if gates.log_momentum is not None else jnp.zeros_like(gates.log_alpha)
    new = {"q": q, "k": k, "v": v, "eta": gates.eta, "la": gates.log_alpha, "delta": delta, "lmu": lmu}
    buf = {"q": jnp.zeros((b, c - 1, *q.shape[2:]), q.dtype), **{key: cache[f"buf_{key}"][...] for key in new
                                                                   if key != "q"}}
    seq = {key: jnp.concatenate([buf[key].astype(jnp.float32), new[key].astype(jnp.float32)], axis=1) for key in new}

    def gather(x, index, valid, fill):  # x [b, L, ...] at index [b, m] (valid where index < length)
      picked = jnp.take_along_axis(x, jnp.clip(index, 0, length - 1).reshape(*index.shape, *(1,) * (x.ndim - 2)),
                                   axis=1)
      return jnp.where(valid.reshape(*valid.shape, *(1,) * (x.ndim - 2)), picked, fill)

    fills = {"delta": 1.0}
    index = jnp.arange(length)[None] + (c - 1 - n)[:, None]  # row-wise shift: the first buffered token to 0
    valid = index < length
    seq = {key: gather(x, index, valid, fills.get(key, 0.0)) for key, x in seq.items()}
    state = {name: w[...] for name, w in cache["state"].items()}
    momentum = {name: w[...] for name, w in cache["momentum"].items()} if spec.momentum else None
    o, state, momentum = miras_memory(
        seq["q"], seq["k"], seq["v"], Gates(seq["eta"], seq["la"], seq["delta"] if spec.bias.needs_delta else None,
                                            seq["lmu"] if spec.momentum else None),
        spec=spec, initial_state=state, initial_momentum=momentum, ln=self._ln(), chunk_size=c, lengths=n + t,
        implementation=self.cfg.implementation)
    out = jnp.take_along_axis(o, (n[:, None] + jnp.arange(t)[None])[..., None, None], axis=1)
    total = n + t
    kept = total % c
    slot = jnp.arange(c - 1)[None]
    source = (total - (c - 1))[:, None] + slot  # buffer slot j holds token total − (c − 1) + j of the shifted row
    slot_valid = slot >= (c - 1 - kept)[:, None]
    for key in new:
      if key != "q":
        cache[f"buf_{key}"][...] = gather(seq[key], source, slot_valid, fills.get(key, 0.0))
    cache["count"][...] = kept.astype(jnp.int32)
    for name, w in state.items():
      cache["state"][name][...] = w
    for name, w in (momentum or {}).items():
      cache["momentum"][name][...] = w
    return out


for _name, _config in (("moneta", MonetaConfig), ("yaad", YaadConfig), ("memora", MemoraConfig),
                       ("titans", TitansConfig)):
  register_mixer(_name, config=_config)(MirasLayer)
