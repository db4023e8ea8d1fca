"""Gated DeltaNet sequence mixer (registered as ``"gdn"``) and the pieces MoM shares with it.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464); layer layout as in
flash-linear-attention's ``GatedDeltaNet`` and MoM's memories ("MoM: Linear Sequence Modeling with
Mixture-of-Memories", arXiv 2502.13685, §3): q/k/v projections → depthwise causal short conv (+SiLU) → per-head L2
norm of q, k; β = sigmoid(W_b x); log-decay g = −exp(A_log)·softplus(W_a x + dt_bias) (float32); the gated delta
rule (``layers.kernels.gated_delta``); per-head RMSNorm of the output gated by SiLU(W_g x); output projection.

Shapes: x [b, t, D] -> y [b, t, D]; H heads, K = head_dim, V = K·expand_v. Decoding keeps an O(1) cache per
sequence: the memory state [b, H, K, V] and the last ``conv_size − 1`` conv inputs of q, k, v, stored as
:class:`MemoryCache` variables (so ``nnx.split(model, nnx.Param, MemoryCache, ...)`` separates them).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.kernels.gated_delta import IMPLEMENTATIONS, SUPPORTED_CHUNK_SIZES, gated_delta_rule
from research.config import Config, option
from research.models.blocks import INIT_STD, dense
from research.models.cache import DecodeCache
from research.models.registry import DTYPES, MixerContext, register_mixer


class MemoryCache(DecodeCache):
  """Decode-time state of a recurrent memory layer (memory states and short-conv windows)."""


@dataclasses.dataclass(frozen=True)
class GDNConfig(Config):
  """A Gated DeltaNet memory (``gdn``; MoM's memories use the same settings).

  Attributes:
    expand_v: value width per head V = K · expand_v (K = the model's head_dim).
    conv_size: short-convolution window (1 means a per-channel scale).
    chunk_size: chunk length C of the chunked kernels.
    implementation: gated-delta-rule kernel (``layers.kernels.gated_delta.IMPLEMENTATIONS``), None for the first
      that applies.
  """

  expand_v: int = option(1, minimum=1)
  conv_size: int = option(4, minimum=1)
  chunk_size: int = option(64, choices=SUPPORTED_CHUNK_SIZES)
  implementation: str | None = option(None, choices=IMPLEMENTATIONS, resumable=True)


@dataclasses.dataclass(frozen=True)
class MemoryShape:
  """A gated-delta memory's sizes: its :class:`GDNConfig` inside the model around it (:meth:`of`)."""

  d_model: int
  num_heads: int
  head_dim: int
  config: GDNConfig
  dtype: str = "float32"
  norm_eps: float = 1e-6
  out_std: float = INIT_STD

  @classmethod
  def of(cls, cfg: GDNConfig, ctx: MixerContext) -> MemoryShape:
    return cls(ctx.d_model, ctx.num_heads, ctx.resolved_head_dim, cfg, ctx.dtype, ctx.norm_eps, ctx.out_init_std)

  @property
  def conv_size(self) -> int:
    return self.config.conv_size

  @property
  def chunk_size(self) -> int:
    return self.config.chunk_size

  @property
  def implementation(self) -> str | None:
    return self.config.implementation

  @property
  def key_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def value_head_dim(self) -> int:
    return self.head_dim * self.config.expand_v

  @property
  def value_dim(self) -> int:
    return self.num_heads * self.value_head_dim

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def causal_conv(x: jax.Array, weight: jax.Array, prefix: jax.Array,
                segment_position: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal conv + SiLU along the second-to-last axis.

  Args:
    x: [..., t, ch]; weight: [w, ch] (weight[w−1] multiplies the current token); prefix: [..., w−1, ch], the
      inputs that precede x (zeros at a sequence start).
    segment_position: [..., t] or None. For packed segments, each token's index within its own segment; the
      input j tokens back is then used only where segment_position ≥ j, so no window crosses a segment start.

  Returns:
    (silu(conv) [..., t, ch], the extended input [..., w−1+t, ch] from which a caller takes the next prefix).
  """
  width, t = weight.shape[0], x.shape[-2]
  ext = jnp.concatenate([prefix.astype(x.dtype), x], axis=-2)

  def tap(j):  # the input width−1−j tokens back, times its weight
    src = ext[..., j:j + t, :]
    if segment_position is not None:
      src = jnp.where((segment_position >= width - 1 - j)[..., None], src, 0)
    return src * weight[j].astype(x.dtype)

  return jax.nn.silu(sum(tap(j) for j in range(width))), ext


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(Σx² + eps) over the last axis, in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def decay_and_beta(a: jax.Array, b: jax.Array, a_log: jax.Array, dt_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """g = −exp(A_log)·softplus(a + dt_bias) (log-decay ≤ 0) and β = sigmoid(b), both float32, shape of a."""
  g = -jnp.exp(a_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)
  return g, jax.nn.sigmoid(b.astype(jnp.float32))


def init_decay_params(num_heads: int, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
  """A_log = log U(0, 16); dt_bias = softplus⁻¹(dt), dt = exp(U(log 1e-3, log 1e-1)) clamped ≥ 1e-4."""
  a = jax.random.uniform(rngs.params(), (num_heads,), minval=1e-4, maxval=16.0)
  dt = jnp.exp(jax.random.uniform(rngs.params(), (num_heads,), minval=math.log(1e-3), maxval=math.log(1e-1)))
  dt = jnp.maximum(dt, 1e-4)
  return nnx.Param(jnp.log(a), logical_axes=(None,)), nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=(None,))


def init_conv_weight(width: int, channels: int, rngs: nnx.Rngs) -> nnx.Param:
  """Depthwise conv weight [width, channels], U(±1/√width) (PyTorch Conv1d default for groups = channels)."""
  bound = 1.0 / math.sqrt(width)
  return nnx.Param(jax.random.uniform(rngs.params(), (width, channels), minval=-bound, maxval=bound),
                   logical_axes=(None, "heads"))


class GatedOutput(nnx.Module):
  """o ↦ W_o(RMSNorm_V(o) · w · silu(W_g x)) per head; one RMSNorm weight [V] shared by all heads."""

  def __init__(self, shape: MemoryShape, *, rngs: nnx.Rngs):
    self.eps, self.num_heads = shape.norm_eps, shape.num_heads
    self.g_proj = dense(shape.d_model, shape.value_dim, dtype=shape.compute_dtype, rngs=rngs, axes=("embed", "heads"))
    self.norm_weight = nnx.Param(jnp.ones((shape.value_head_dim,), jnp.float32), logical_axes=(None,))
    self.o_proj = dense(shape.value_dim, shape.d_model, dtype=shape.compute_dtype, rngs=rngs, axes=("heads", "embed"),
                        std=shape.out_std)

  def __call__(self, o: jax.Array, x: jax.Array) -> jax.Array:
    """o: [b, t, H, V]; x: [b, t, D] -> [b, t, D]."""
    b, t = x.shape[:2]
    gate = self.g_proj(x).reshape(b, t, self.num_heads, -1).astype(jnp.float32)
    o32 = o.astype(jnp.float32)
    o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + self.eps) * self.norm_weight[...]
    return self.o_proj((o32 * jax.nn.silu(gate)).astype(x.dtype).reshape(b, t, -1))


class GatedDeltaNet(nnx.Module):
  """One Gated DeltaNet memory: x [b, t, D] -> (y [b, t, D], {}).

  ``__call__(x, use_cache=True)`` continues from (and updates) the decode cache made by :meth:`init_cache`, so
  a prompt followed by single tokens gives the same outputs as one pass over the whole sequence.
  """

  def __init__(self, cfg: GDNConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shape = s = MemoryShape.of(cfg, ctx)
    proj = lambda width, out="heads": dense(s.d_model, width, dtype=s.compute_dtype, rngs=rngs, axes=("embed", out))
    self.q_proj, self.k_proj, self.v_proj = proj(s.key_dim), proj(s.key_dim), proj(s.value_dim)
    self.b_proj, self.a_proj = proj(s.num_heads, None), proj(s.num_heads, None)
    self.a_log, self.dt_bias = init_decay_params(s.num_heads, rngs)
    self.q_conv = init_conv_weight(cfg.conv_size, s.key_dim, rngs)
    self.k_conv = init_conv_weight(cfg.conv_size, s.key_dim, rngs)
    self.v_conv = init_conv_weight(cfg.conv_size, s.value_dim, rngs)
    self.out = GatedOutput(s, rngs=rngs)
    self.cache: nnx.Dict | None = nnx.data(None)  # made by init_cache

  def init_cache(self, batch_size: int, max_length: int | None = None) -> None:
    """Reset the decode cache to the empty memory for ``batch_size`` sequences.

    ``max_length`` is accepted for the common mixer interface; recurrent state does not grow with it.
    """
    c, s = self.cfg, self.shape
    conv = lambda ch: MemoryCache(jnp.zeros((batch_size, c.conv_size - 1, ch), s.compute_dtype))
    self.cache = nnx.Dict(
        state=MemoryCache(jnp.zeros((batch_size, s.num_heads, s.head_dim, s.value_head_dim), jnp.float32)),
        q=conv(s.key_dim), k=conv(s.key_dim), v=conv(s.value_dim))

  def __call__(self, x: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    c, s = self.cfg, self.shape
    b, t, _ = x.shape
    if use_cache and self.cache is None:
      raise ValueError("use_cache=True needs init_cache(batch_size) first")
    cached = self.cache if use_cache else None
    zeros = lambda ch: jnp.zeros((b, c.conv_size - 1, ch), x.dtype)
    feats, prefixes = {}, {}
    branches = (("q", self.q_proj, self.q_conv, s.key_dim), ("k", self.k_proj, self.k_conv, s.key_dim),
                ("v", self.v_proj, self.v_conv, s.value_dim))
    for name, proj, weight, ch in branches:
      prefix = cached[name][...] if cached is not None else zeros(ch)
      feats[name], ext = causal_conv(proj(x), weight[...], prefix)
      prefixes[name] = ext[:, t:]
    q = l2_normalize(feats["q"].reshape(b, t, s.num_heads, s.head_dim))
    k = l2_normalize(feats["k"].reshape(b, t, s.num_heads, s.head_dim))
    v = feats["v"].reshape(b, t, s.num_heads, s.value_head_dim)
    g, beta = decay_and_beta(self.a_proj(x), self.b_proj(x), self.a_log[...], self.dt_bias[...])
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=None if cached is None else cached["state"][...],
                                chunk_size=c.chunk_size, implementation=c.implementation)
    if cached is not None:
      cached["state"][...] = state
      for name, prefix in prefixes.items():
        cached[name][...] = prefix
    return self.out(o, x), {}


register_mixer("gdn", config=GDNConfig)(GatedDeltaNet)
