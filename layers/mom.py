"""Mixture-of-Memories sequence mixer (registered as ``"mom"``): routed Gated DeltaNet memories + a shared one.

Paper: "MoM: Linear Sequence Modeling with Mixture-of-Memories" (arXiv 2502.13685, §3, Eq. 3–4); memories are
Gated DeltaNets ("Gated Delta Networks", arXiv 2412.06464); load balancing as in Switch Transformers (arXiv
2101.03961). For x [b, t, D]:

  * router: p = softmax(x W_r) over M memories (float32); the top-k weights, renormalised to sum 1, mix the k
    selected memories' outputs; unselected memories neither read nor write at that token;
  * every memory m has its own k/v/β/decay projections; the q projection, the short-conv weights, A_log and
    dt_bias are shared by all memories; an optional shared memory sees every token and is added with weight 1;
  * dispatch ``"packed"`` (default): per sequence, the tokens routed to each memory are laid out one memory after
    another in time order, each segment padded to a multiple of the chunk C with identity tokens (β = 0, g = 0,
    q = k = v = 0), and the whole row runs as one chunked gated delta rule whose state is reset at every segment
    start (``chunk_resets``) and whose short conv stops at segment starts. Every token appears k (+1 shared)
    times, so the row is (k + shared)·t + (M+1)·(C−1) long at most instead of (M+1)·t; loads may be arbitrarily
    uneven and no token is dropped. Outputs are scatter-added back to their tokens. The decode cache
    (``use_cache``) runs the sorted path below, which computes the same function. Packing trades sequential
    depth for work: a row's state scan walks ~(k + 1)·t tokens instead of M+1 parallel scans of t, so with few
    sequences (b·H well below the GPU's SM count) sorted is faster. On an H100 at H = 16, K = V = 128, fwd+bwd:
    1.28× faster than sorted at b = 8, T = 2048, but 0.94× at b = 1, T = 16384. It uses 38–40% less XLA temp
    memory in both cases (docs/benchmarks.md);
  * ``dispatch="sorted"``: a stable sort per (memory, sequence) moves the tokens routed to a memory to the front,
    in time order; each memory runs over that sub-sequence padded to length t with identity tokens;
  * ``dispatch="dense"`` is the test reference: each memory runs over the full sequence with identity updates at
    tokens not routed to it, its conv window gathered from the previous tokens routed to it by cumulative ranks;
  * output: per-head RMSNorm gated by SiLU(W_g x), then W_o;
  * aux loss ``"mom_load_balance"`` = M · Σ_m f_m P_m, f_m = mean over tokens of [m among the top-k],
    P_m = mean router probability; it equals k whenever routing is balanced (or the router is uniform).

Memories are stacked: slot m < M is routed memory m, slot M the shared memory. Decode cache (``MemoryCache``
variables): states [b, M(+1), H, K, V] float32 and conv windows [b, M(+1), conv_size − 1, ch] for q, k, v.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.gated_deltanet import (
  GatedOutput,
  GDNConfig,
  MemoryCache,
  MemoryShape,
  causal_conv,
  decay_and_beta,
  init_conv_weight,
  init_decay_params,
  l2_normalize,
)
from layers.kernels.gated_delta import gated_delta_rule
from research.config import Config, Problem, option
from research.models.blocks import INIT_STD, dense
from research.models.registry import MixerContext, register_mixer

DISPATCHES = ("packed", "sorted", "dense")
AUX_LOSS_NAME = "mom_load_balance"


@dataclasses.dataclass(frozen=True)
class MoMConfig(Config):
  """A MoM layer (``mom``): each memory's settings and the routing.

  Attributes:
    memory: every memory's Gated DeltaNet settings (value expansion, conv, chunk, kernel).
    num_memories: routed memories M.
    top_k: memories mixed per token k (1 ≤ k ≤ M).
    shared_memory: add a memory that sees every token, with weight 1.
    dispatch: how the memories run: ``packed`` (segments of all memories in one row; default, less memory and
      faster at training batch sizes), ``sorted`` (every memory over a padded full-length sub-sequence; faster with
      very few sequences, e.g. b = 1 at long T) or ``dense`` (test reference, no decode cache). All compute the
      same function.
  """

  memory: GDNConfig = dataclasses.field(default_factory=GDNConfig)
  num_memories: int = option(4, minimum=1)
  top_k: int = option(2, minimum=1)
  shared_memory: bool = True
  dispatch: str = option("packed", choices=DISPATCHES, resumable=True)

  def check(self):
    if self.top_k > self.num_memories:
      yield Problem("top_k", f"must be in [1, num_memories={self.num_memories}] (got {self.top_k})")

  @property
  def num_slots(self) -> int:
    return self.num_memories + int(self.shared_memory)


def _stacked(n: int, d_in: int, d_out: int, rngs: nnx.Rngs, out_axis: str | None = "heads") -> nnx.Param:
  """n independent [d_in, d_out] projection matrices, N(0, INIT_STD²); logical axes (None, embed, ``out_axis``)."""
  return nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (n, d_in, d_out), jnp.float32),
                   logical_axes=(None, "embed", out_axis))


def _gather_time(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [n, b, t, ...] gathered along t by index [n, b, t']."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, index, axis=2)


class PackedLayout(NamedTuple):
  """Where each (slot, token) goes in the packed rows (``dispatch="packed"``), for routed mask [n, b, t].

  Attributes:
    token, slot, position: int [b, L], the source token (−1 on padding), its slot and its index within its
      slot's segment, for every packed position.
    chunk_resets: bool [b, L / C], True where a chunk starts a segment.
  """

  token: jax.Array
  slot: jax.Array
  position: jax.Array
  chunk_resets: jax.Array


def packed_length(t: int, chunk: int, slots: int, copies: int) -> int:
  """Static packed row length: ``copies``·t routed tokens plus at most chunk−1 padding per slot, in chunks."""
  return -(-(copies * t + slots * (chunk - 1)) // chunk) * chunk


def packed_layout(mask: jax.Array, chunk: int, copies: int) -> PackedLayout:
  """Lay out every slot's routed tokens (mask [n, b, t], ``copies`` slots per token) slot after slot in time
  order, each segment starting at a multiple of ``chunk``. The row holds ``copies``·t routed (slot, token) pairs, as
  MoM routes every token to exactly k memories (+ the shared one); pairs beyond that would be dropped."""
  n, b, t = mask.shape
  length = packed_length(t, chunk, n, copies)
  rank = jnp.cumsum(mask, axis=-1) - 1  # index within the slot's segment
  padded = -(-jnp.sum(mask, axis=-1) // chunk) * chunk  # [n, b]
  offset = jnp.cumsum(padded, axis=0) - padded
  slot, row, token = jnp.meshgrid(jnp.arange(n), jnp.arange(b), jnp.arange(t), indexing="ij")
  where = (row, jnp.where(mask, offset[..., None] + rank, length))  # unrouted tokens land past the end: dropped
  scatter = lambda fill, values: jnp.full((b, length), fill, jnp.int32).at[where].set(values, mode="drop")
  resets = jnp.zeros((b, length // chunk), bool).at[jnp.arange(b), offset // chunk].set(True, mode="drop")
  return PackedLayout(token=scatter(-1, token), slot=scatter(0, slot), position=scatter(0, rank),
                      chunk_resets=resets)


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Router: logits [b, t, M] -> (probs [b, t, M] float32, weights [b, t, k] summing to 1, indices [b, t, k])."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, indices = jax.lax.top_k(probs, top_k)
  return probs, weights / jnp.sum(weights, axis=-1, keepdims=True), indices


def load_balance_loss(probs: jax.Array, indices: jax.Array) -> jax.Array:
  """Switch-style M · Σ_m f_m P_m; f_m = mean_tokens #[m in top-k], P_m = mean_tokens p_m. probs [b,t,M]."""
  m = probs.shape[-1]
  f = jnp.mean(jnp.sum(jax.nn.one_hot(indices, m, dtype=jnp.float32), axis=-2), axis=(0, 1))
  return m * jnp.sum(f * jnp.mean(probs, axis=(0, 1)))


class MixtureOfMemories(nnx.Module):
  """MoM layer: x [b, t, D] -> (y [b, t, D], {"mom_load_balance": scalar}).

  ``__call__(x, use_cache=True)`` continues from (and updates) the cache made by :meth:`init_cache` (packed or
  sorted dispatch): a prompt followed by single tokens gives the outputs of one pass over the whole sequence.
  """

  def __init__(self, cfg: MoMConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shape = g = MemoryShape.of(cfg.memory, ctx)
    n = cfg.num_slots
    self.router = dense(g.d_model, cfg.num_memories, dtype=jnp.float32, rngs=rngs, axes=("embed", None))  # f32 logits
    self.q_proj = dense(g.d_model, g.key_dim, dtype=g.compute_dtype, rngs=rngs, axes=("embed", "heads"))
    self.k_proj = _stacked(n, g.d_model, g.key_dim, rngs)
    self.v_proj = _stacked(n, g.d_model, g.value_dim, rngs)
    self.b_proj = _stacked(n, g.d_model, g.num_heads, rngs, out_axis=None)
    self.a_proj = _stacked(n, g.d_model, g.num_heads, rngs, out_axis=None)
    self.a_log, self.dt_bias = init_decay_params(g.num_heads, rngs)
    self.q_conv = init_conv_weight(g.conv_size, g.key_dim, rngs)
    self.k_conv = init_conv_weight(g.conv_size, g.key_dim, rngs)
    self.v_conv = init_conv_weight(g.conv_size, g.value_dim, rngs)
    self.out = GatedOutput(g, rngs=rngs)
    self.cache: nnx.Dict | None = nnx.data(None)  # made by init_cache

  def init_cache(self, batch_size: int, max_length: int | None = None) -> None:
    """Reset the decode cache (every memory empty) for ``batch_size`` sequences.

    ``max_length`` is accepted for the common mixer interface; recurrent state does not grow with it.
    """
    if self.cfg.dispatch == "dense":
      raise ValueError("the decode cache needs dispatch='packed' or 'sorted', this layer has 'dense'")
    g, n = self.shape, self.cfg.num_slots
    conv = lambda ch: MemoryCache(jnp.zeros((batch_size, n, g.conv_size - 1, ch), g.compute_dtype))
    self.cache = nnx.Dict(
        state=MemoryCache(jnp.zeros((batch_size, n, g.num_heads, g.head_dim, g.value_head_dim), jnp.float32)),
        q=conv(g.key_dim), k=conv(g.key_dim), v=conv(g.value_dim))

  def routing(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(probs [b,t,M], slot weights [b,t,slots], routed mask [b,t,slots], top-k indices [b,t,k]).

    Slot weights are the renormalised top-k weights scattered to their memories; the shared slot has weight 1.
    """
    probs, weights, indices = route(self.router(x), self.cfg.top_k)
    one_hot = jax.nn.one_hot(indices, self.cfg.num_slots, dtype=jnp.float32)  # [b, t, k, slots]
    slot_weights = jnp.einsum("btk,btks->bts", weights, one_hot)
    routed = jnp.any(one_hot > 0, axis=-2)  # from the indices, immune to weight underflow
    if self.cfg.shared_memory:
      slot_weights = slot_weights.at[..., -1].set(1.0)
      routed = routed.at[..., -1].set(True)
    return probs, slot_weights, routed, indices

  def __call__(self, x: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    if use_cache and self.cache is None:
      raise ValueError("use_cache=True needs init_cache(batch_size) first")
    probs, slot_weights, routed, indices = self.routing(x)
    mask = jnp.moveaxis(routed, -1, 0)  # [slots, b, t]
    mix = lambda per_slot: jnp.einsum("nbthv,btn->bthv", per_slot.astype(jnp.float32), slot_weights)
    if self.cfg.dispatch == "dense":
      if use_cache:
        raise ValueError("use_cache=True needs dispatch='packed' or 'sorted', this layer has 'dense'")
      o = mix(self._dense_memories(x, mask))
    elif self.cfg.dispatch == "sorted" or use_cache:
      o = mix(self._sorted_memories(x, mask, use_cache))
    else:
      o = self._packed_memories(x, mask, slot_weights)
    return self.out(o, x), {AUX_LOSS_NAME: load_balance_loss(probs, indices)}

  def _features(self, x_slots: jax.Array) -> tuple[jax.Array, ...]:
    """Per-slot projections of x_slots [slots, b, t, D]: k, v (pre-conv), log-decay g and β [slots, b, t, H]."""
    dt = self.shape.compute_dtype
    proj = lambda w: jnp.einsum("nbtd,nde->nbte", x_slots.astype(dt), w[...].astype(dt))
    g, beta = decay_and_beta(proj(self.a_proj), proj(self.b_proj), self.a_log[...], self.dt_bias[...])
    return proj(self.k_proj), proj(self.v_proj), g, beta

  def _run(self, q, k, v, g, beta, valid, initial_state, chunk_resets=None):
    """The gated delta rule per slot over [slots, b, t] sequences; invalid tokens become identity tokens."""
    c = self.shape
    n, b, t = valid.shape
    vf = valid[..., None].astype(q.dtype)
    q = l2_normalize((q * vf).reshape(n * b, t, c.num_heads, c.head_dim))  # per head
    k = l2_normalize((k * vf).reshape(n * b, t, c.num_heads, c.head_dim))
    v = (v * vf).reshape(n * b, t, c.num_heads, c.value_head_dim)
    g, beta = (jnp.where(valid[..., None], z, 0.0).reshape(n * b, t, c.num_heads) for z in (g, beta))
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, chunk_size=c.chunk_size,
                                implementation=c.implementation, chunk_resets=chunk_resets)
    return o.reshape(n, b, t, c.num_heads, c.value_head_dim), state

  def _sorted_memories(self, x: jax.Array, mask: jax.Array, use_cache: bool) -> jax.Array:
    """Outputs [slots, b, t, H, V] in token order, each slot run on its own time-ordered sub-sequence."""
    c = self.shape
    n, (b, t, _) = self.cfg.num_slots, x.shape
    order = jnp.argsort(~mask, axis=-1, stable=True)  # routed tokens first, in time order
    lengths = jnp.sum(mask, axis=-1)  # [slots, b]
    valid = jnp.arange(t) < lengths[..., None]
    x_slots = _gather_time(jnp.broadcast_to(x, (n, *x.shape)), order)
    k, v, g, beta = self._features(x_slots)
    q = _gather_time(jnp.broadcast_to(self.q_proj(x), (n, b, t, c.key_dim)), order)
    cache = self.cache if use_cache else None
    conv_out = {}
    for name, feat, weight in (("q", q, self.q_conv), ("k", k, self.k_conv), ("v", v, self.v_conv)):
      prefix = (jnp.swapaxes(cache[name][...], 0, 1) if cache is not None
                else jnp.zeros((n, b, c.conv_size - 1, feat.shape[-1]), feat.dtype))
      conv_out[name], ext = causal_conv(feat, weight[...], prefix)
      if cache is not None:  # the window after this call: the last conv_size-1 inputs of each sub-sequence
        tail = _gather_time(ext, lengths[..., None] + jnp.arange(c.conv_size - 1))
        cache[name][...] = jnp.swapaxes(tail, 0, 1).astype(cache[name].dtype)
    state0 = None
    if cache is not None:  # [b, slots, H, K, V] -> [slots·b, H, K, V]
      state0 = jnp.swapaxes(cache["state"][...], 0, 1).reshape(n * b, *cache["state"].shape[2:])
    o, state = self._run(conv_out["q"], conv_out["k"], conv_out["v"], g, beta, valid, state0)
    if cache is not None:
      cache["state"][...] = jnp.swapaxes(state.reshape(n, b, *state.shape[1:]), 0, 1)
    return _gather_time(o, jnp.argsort(order, axis=-1))  # back to token order

  def _packed_memories(self, x: jax.Array, mask: jax.Array, slot_weights: jax.Array) -> jax.Array:
    """The weighted sum over slots [b, t, H, V] (float32), all slots' sub-sequences of a row run as one packed row.

    Each packed output is scatter-added, times its slot weight, onto its token: k (+1) writes per token, and the
    backward is a gather (gathering [slots, b, t] from the packed row instead would scatter-add its backward,
    with every unrouted (slot, token) colliding on one address).
    """
    c = self.shape
    n, b = self.cfg.num_slots, x.shape[0]
    layout = packed_layout(mask, c.chunk_size, self.cfg.top_k + int(self.cfg.shared_memory))
    rows = jnp.arange(b)[:, None]
    token = jnp.maximum(layout.token, 0)  # [b, L]; padding reads token 0 and is masked below
    pick = lambda feat: feat[layout.slot, rows, token]  # [n, b, t, ...] -> [b, L, ...]
    k, v, g, beta = (pick(f) for f in self._features(jnp.broadcast_to(x, (n, *x.shape))))
    q = self.q_proj(x)[rows, token]
    valid = layout.token >= 0
    no_prefix = lambda feat: jnp.zeros((b, c.conv_size - 1, feat.shape[-1]), feat.dtype)
    q, k, v = (causal_conv(jnp.where(valid[..., None], f, 0), w[...], no_prefix(f), layout.position)[0]
               for f, w in ((q, self.q_conv), (k, self.k_conv), (v, self.v_conv)))
    o, _ = self._run(*(f[None] for f in (q, k, v, g, beta, valid)), None, layout.chunk_resets)
    weight = jnp.where(valid, slot_weights[rows, token, layout.slot], 0.0)  # [b, L]
    mixed = jnp.zeros((b, x.shape[1], *o.shape[-2:]), jnp.float32)
    return mixed.at[rows, jnp.where(valid, layout.token, x.shape[1])].add(
        o[0].astype(jnp.float32) * weight[..., None, None], mode="drop")

  def _dense_memories(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference: each slot over the full sequence, identity updates where it is not routed. [slots,b,t,H,V]."""
    c = self.shape
    n, (b, t, _) = self.cfg.num_slots, x.shape
    k, v, g, beta = self._features(jnp.broadcast_to(x, (n, *x.shape)))
    q = jnp.broadcast_to(self.q_proj(x), (n, b, t, c.key_dim))
    rank = jnp.cumsum(mask, axis=-1) - 1  # position of each routed token within its sub-sequence
    slot, seq, pos = jnp.meshgrid(jnp.arange(n), jnp.arange(b), jnp.arange(t), indexing="ij")
    position_of_rank = jnp.zeros((n, b, t), jnp.int32).at[slot, seq, jnp.where(mask, rank, t)].set(pos, mode="drop")

    def conv(feat, weight):  # window = this token and the conv_size-1 previous tokens routed to the same slot
      total, sub_sequence = 0.0, _gather_time(feat, position_of_rank)
      for lag in range(c.conv_size):
        src = _gather_time(sub_sequence, jnp.maximum(rank - lag, 0))
        total = total + jnp.where((rank - lag >= 0)[..., None], src, 0.0) * weight[c.conv_size - 1 - lag]
      return jax.nn.silu(total)

    q, k, v = conv(q, self.q_conv[...]), conv(k, self.k_conv[...]), conv(v, self.v_conv[...])
    return self._run(q, k, v, g, beta, mask, None)[0]


register_mixer("mom", config=MoMConfig)(MixtureOfMemories)
