"""Miras MLP memories as two Pallas (Triton backend, GPU) kernels that walk a head's chunks tile by tile.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4) in the chunkwise form of :mod:`flat` (same
semantics: the frozen-gradient loop R1 of :mod:`reference`). The XLA paths launch ~130 kernels per chunk
forward and backward, each moving [b·h, c, E] float32 activations through HBM (docs/benchmarks.md, profile); here
the whole chunk loop is ONE kernel per direction, grid [b·h]: a program owns one head and runs every chunk in a
``fori_loop``, as :mod:`layers.kernels.gated_delta.pallas_triton` does for the gated delta rule's [K, V] state.

The head's state {W2 [E, d], W1 [d, E]} (2·E·d float32: 128 KiB at d = 64, E = 256) is too big to stay in a
program's registers, so it lives in global memory (L2-resident) and every pass over it walks the hidden axis E
in tiles of ``Tuning.hidden_tile`` columns with ``fori_loop``, keeping only [c, tile] activations and [c, d] / [c, c]
accumulators live. Chunk j reads its start state from slot j of the checkpoints and writes its end state to slot
j + 1 (n + 1 slots, behind a barrier). Per chunk (:mod:`flat`'s step; s₂, s₁ the read scales):

  * forward, two passes over the tiles: (1) u = s₁ Σ_tiles gelu(s₂ K W2ᵀ) W1ᵀ, then the row-wise LayerNorm, bias
    gradient and LayerNorm backward give the keys' errors e1 [c, d]; (2) per tile the keys' second-layer errors
    e2 = s₁ (e1 W1) ⊙ gelu'(z), the queries' hidden reads hq = gelu(s₂ (Q̃ W2ᵀ − S_q e2)), the sums
    hq hᵀ [c, c] and hq W1ᵀ [c, d], and the closed tile of the end state, written to slot j + 1 while its read-scale
    sums are taken (kept per slot for the backward); then the chunk's last query reads the closed state
    (``boundary_read``: Moneta), one more pass;
  * backward, a reverse loop that recomputes the chunk from its checkpointed start state and pulls the cotangents
    back by hand (the order of operations of ``flat``'s step run backwards): the closed-state read's pull-back into
    the end state's cotangent, the two forward passes, the row-wise and [c, c] pieces of the reads, then (B1) per
    tile the pull-back through the reads and the chunk end, writing the start state's cotangent tile and the keys'
    partial cotangents [c, tile] to scratch, the row-wise pull-back through the keys' errors (``jax.vjp`` of
    LayerNorm, bias gradient and LayerNorm backward, element-wise and per row), then (B2) per tile the pull-back
    through the keys' forward, and (B3) the read scale's share of the state's cotangent (Moneta).

Gates: per head, the chunk's [c, c] step coefficients C and first-layer dual-form scores S_q come from XLA
(:func:`flat.chunk_inputs`, with the decays) and the kernels return their cotangents; per channel, C is [c, c, d]
and both layers' uses of it are formed in the kernels in row blocks (:class:`_ChannelGates`), which return the
per-token gates' cotangents directly. Nothing state-sized runs in XLA.

Covers the MLP memory with no momentum, no lag token, no inner clip and a retention without a chunk-end map
(decay, ℓq normalisation: Moneta; ``unsupported`` says why otherwise); c, d and the tile must be powers of two
≥ 16 (Triton tiles). Memory: the checkpoints are (n + 1)·2·E·d float32 per head (8 × 4096 tokens, d = 64,
E = 256, H = 16: 1 GiB), and the backward's scratch 2·c·E float32 per head. The kernels run in Pallas interpret
mode on the CPU, which is how the tests check them (against autodiff of :mod:`flat`, to 1e-15 in float64). Triton
has no erf, so GELU inside the kernels uses :func:`erf` (|error| < 1.2e-7, so |Δgelu(z)| < 6e-8·|z|). Shapes and
returns as :func:`chunked.miras_chunked`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.miras import flat
from layers.kernels.miras.chunked import unchunk, with_matmul
from layers.miras.memory import gelu, gelu_grad, gelu_grad2, layer_norm, layer_norm_backward, plain_matmul, row_mean
from layers.miras.spec import Gates, MemorySpec

# Numerical Recipes in C, 2nd ed. (Press et al., 1992), §6.2, routine erfcc: erfc(z) = t·exp(−z² + P(t)),
# t = 1 / (1 + z/2), z ≥ 0, a Chebyshev fit with fractional error < 1.2e-7 everywhere.
_ERFC_POLY = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
              -0.82215223, 0.17087277)


def erf(x: jax.Array) -> jax.Array:
  """erf(x) from exp and arithmetic only (Triton lowers no erf); |error| < 1.2e-7 (8.3e-8 measured in float64)."""
  z = jnp.abs(x)
  t = 1.0 / (1.0 + 0.5 * z)
  poly = jnp.full_like(t, _ERFC_POLY[-1])
  for a in reversed(_ERFC_POLY[:-1]):
    poly = a + t * poly
  erfc = t * jnp.exp(poly - z * z)
  return jnp.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def kernel_gelu(z):
  return gelu(z, erf)  # the module's erf looked up at each call, so tests can swap in XLA's


def kernel_gelu_grad(z):
  return gelu_grad(z, erf)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch settings, read when the kernels are traced (static): ``num_warps`` per program (one program per
  head); ``hidden_tile``: columns of E per tile of the state and of every [c, E] activation (E if it is smaller);
  ``num_stages``: Triton's software pipelining of the tile loops (2 loads the next tile during this one's work, at
  the price of shared memory). Timed on the GPU by ``benchmarks/miras.py --memory-op --warps ... --hidden-tile ...
  --pipeline``."""

  num_warps: int = 8  # fewer spills than 4 when compiled for sm_90a (docs/benchmarks.md)
  hidden_tile: int = 32  # H100, Moneta, 8 × 4096: fwd 6.9 vs 9.9 ms, fwd+bwd 50.3 vs 53.3 ms at 64 columns
  num_stages: int = 1

  def tile(self, hidden: int) -> int:
    return min(hidden, self.hidden_tile)


def unsupported(spec: MemorySpec, chunk_size: int, head_dim: int, tuning: Tuning = Tuning()) -> str | None:
  """Why these kernels cannot run this memory, or None if they can (any backend: interpret mode runs anywhere)."""
  if (why := flat.unsupported(spec)) is not None:
    return why
  if spec.inner_clip is not None:
    return "they have no inner clip"
  if spec.retention.maps_chunk_end:
    return f"they have no chunk-end map ({type(spec.retention).__name__})"
  hidden = spec.memory.expansion * head_dim
  sizes = (("chunk_size", chunk_size), ("head dim", head_dim), ("hidden width", hidden),
           ("hidden_tile", tuning.tile(hidden)))
  for name, n in sizes:
    if n < 16 or n & (n - 1):
      return f"{name} must be a power of two >= 16 (Triton tiles), got {n}"
  return None


def kernel_dot(mode: str):
  """2-D einsums in the memory's matmul mode (bfloat16 operands with float32 accumulation, or full float32)."""
  return functools.partial(plain_matmul, mode=mode)


def kernel_operands(mode: str, *xs) -> tuple:
  """xs rounded to the matmuls' operand dtype once (bfloat16 in the bfloat16 mode, which every product they enter
  casts them to anyway, so nothing changes but the registers: a value held as a bf16 operand takes half).
  ``pallas_reads``' backward spills 0.86 KB a thread at 4 warps with its tile loop's invariants in bfloat16, 1.08 KB
  in float32 (ptxas for sm_90a)."""
  return tuple(x.astype(jnp.bfloat16) if mode == "bfloat16" else x for x in xs)


def pair_row(a, b, kind):
  """(a, b) as a [2] row (Triton blocks hold no lone scalars); ``kind`` only for the dtype."""
  return jnp.where(jnp.arange(2) == 0, a, b).astype(kind.dtype)


def row_scalars(row) -> tuple:
  """The two scalars of a [2] row (:func:`pair_row`)."""
  return tuple(jnp.sum(jnp.where(jnp.arange(2) == i, row, 0.0)) for i in range(2))


def leading_block(x) -> pl.BlockSpec:
  """What program (a, b) of a 2-D grid sees of x [A, B, ...]: x[a, b], the rest whole."""
  return pl.BlockSpec((None, None, *x.shape[2:]), lambda a, b: (a, b) + (0,) * (x.ndim - 2))


def _aligned(start, multiple: int):
  return start if isinstance(start, int) else pl.multiple_of(start, multiple)


def _sync(interpret: bool) -> None:
  """Every thread of the program waits here and sees the others' earlier stores (a no-op when interpreted, which
  runs sequentially): the state, its cotangent and the scratch pass between threads through global memory."""
  if not interpret:
    plgpu.debug_barrier()


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """A head's state slots in refs, W2 rows of [slots·E, d] and W1 columns of [slots·d, E], cut along E."""

  w2: object
  w1: object
  e: int
  d: int
  tile: int

  def index(self, slot, i) -> tuple:
    """Ref indices of tile i of ``slot``."""
    return ((pl.ds(_aligned(slot * self.e + i * self.tile, self.tile), self.tile), slice(None)),
            (pl.ds(_aligned(slot * self.d, self.d), self.d), pl.ds(_aligned(i * self.tile, self.tile), self.tile)))

  def load(self, slot, i) -> tuple:
    w2, w1 = self.index(slot, i)
    return self.w2[w2], self.w1[w1]

  def store(self, slot, i, w2, w1) -> None:
    i2, i1 = self.index(slot, i)
    self.w2[i2], self.w1[i1] = w2, w1

  def add(self, slot, i, x2, x1, interpret: bool) -> None:
    """Adds (x2, x1) to tile i of ``slot`` (every thread loads the tile before any stores it)."""
    w2, w1 = self.load(slot, i)
    _sync(interpret)
    self.store(slot, i, w2 + x2, w1 + x1)

  def loop(self, body, init):
    return jax.lax.fori_loop(0, self.e // self.tile, body, init)


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One chunk of one head as both kernels see it: its start state (``slot`` of ``states``) and its ``rows`` of the
  keys K [c, d], the queries scaled by their decay Q̃ [c, d] and (``scores_rows`` of ``scores_ref``) the first
  layer's dual-form scores S_q [c, c], loaded afresh wherever they are used (a value live through a tile loop costs
  registers; a load hits L1/L2)."""

  spec: MemorySpec
  states: _Tiles
  slot: object
  rows: object
  k_ref: object
  qd_ref: object
  scores_ref: object
  scores_rows: object

  @property
  def k(self):
    return self.k_ref[self.rows, :]

  @property
  def qd(self):
    return self.qd_ref[self.rows, :]

  @property
  def scores(self):
    return self.scores_ref[self.scores_rows, :]

  def dot(self, spec, a, b):
    return kernel_dot(self.spec.memory.matmul)(spec, a, b)

  def scales(self, totals):
    """(s₂, s₁) of the start state from its summed scale terms (t₂, t₁), and the vjp of that map."""
    ret = self.spec.retention
    return jax.vjp(lambda t2, t1: (ret.scale_from(t2), ret.scale_from(t1)), *totals)

  def keys_forward(self, s2):
    """Pass 1 over the tiles: Σ_tiles gelu(s₂ K W2ᵀ) W1ᵀ [c, d] (u before s₁)."""
    def body(i, u):
      w2, w1 = self.states.load(self.slot, i)
      return u + self.dot("ce,de->cd", kernel_gelu(s2 * self.dot("ci,ei->ce", self.k, w2)), w1)

    return self.states.loop(body, jnp.zeros((self.scores_ref.shape[1], self.k_ref.shape[1]), self.k_ref.dtype))

  def acts(self, i, s2, s1, e1) -> dict:
    """Tile i's weights and activations: the keys' z = s₂ zraw, h, praw = e1 W1, e2 = s₁ praw ⊙ gelu'(z); the
    queries' zq (before s₂) and hq = gelu(s₂ zq)."""
    w2, w1 = self.states.load(self.slot, i)
    zraw = self.dot("ci,ei->ce", self.k, w2)
    z = s2 * zraw
    praw = self.dot("cd,de->ce", e1, w1)
    e2 = s1 * praw * kernel_gelu_grad(z)
    zq = self.dot("ti,ei->te", self.qd, w2) - self.dot("ts,se->te", self.scores, e2)
    return dict(w2=w2, w1=w1, zraw=zraw, z=z, h=kernel_gelu(z), praw=praw, e2=e2, zq=zq, hq=kernel_gelu(s2 * zq))

  def read_sums(self, s2, s1, e1, end=None):
    """Pass 2 over the tiles: hq hᵀ [c, c], hq W1ᵀ [c, d] and the scale terms (t₂, t₁) of the chunk end; with
    ``end`` = (slot, B_c [1, g], coefficients [c, g]) each tile of the chunk end A' = B_c ⊙ A − (errors ⊙
    coefficients)ᵀ inputs is written to that slot on the way (the gates act on W2's input axis and W1's output
    axis), and its scale terms summed."""
    c, d = self.scores_ref.shape[1], self.k_ref.shape[1]
    ret = self.spec.retention

    def body(i, sums):
      hh, t1, terms = sums
      a = self.acts(i, s2, s1, e1)
      if end is not None:
        slot, decay, coef = end
        new = (decay * a["w2"] - self.dot("ce,ci->ei", a["e2"], self.k * coef),
               decay.T * a["w1"] - self.dot("cd,ce->de", e1 * coef, a["h"]))
        self.states.store(slot, i, *new)
        terms = tuple(t + ret.scale_terms(w) for t, w in zip(terms, new, strict=True))
      return hh + self.dot("te,se->ts", a["hq"], a["h"]), t1 + self.dot("te,de->td", a["hq"], a["w1"]), terms

    zero = jnp.zeros((), e1.dtype)
    return self.states.loop(body, (jnp.zeros((c, c), e1.dtype), jnp.zeros((c, d), e1.dtype), (zero, zero)))


def keys_errors(spec: MemorySpec, u, k, v, delta, ln, mean=row_mean, pullbacks: bool = True):
  """Row-wise: the keys' errors e1 = ∂ℓ/∂u from u = s₁ Σ h W1ᵀ (y = k + LN(u)), and the vjps of the pieces
  (``mean``: the LayerNorm's row mean, :func:`layers.miras.memory.layer_norm`; ``pullbacks=False``: e1 alone, and
  None, traced without vjps for a kernel whose compiler keeps what they trace)."""
  forward = lambda u, g, b: layer_norm(u, (g, b), spec.memory.ln_eps, mean)
  backward = functools.partial(layer_norm_backward, mean=mean)
  if not pullbacks:
    yn, nrm, rstd = forward(u, *ln)
    return backward(spec.bias.grad(k + yn, v, delta), nrm, rstd, ln[0]), None
  (yn, nrm, rstd), ln_vjp = jax.vjp(forward, u, *ln)
  g, bias_vjp = jax.vjp(spec.bias.grad, k + yn, v, delta)
  e1, lnb_vjp = jax.vjp(backward, g, nrm, rstd, ln[0])
  return e1, (ln_vjp, bias_vjp, lnb_vjp)


SUB_BLOCK = 16  # rows of a chunk's blocks for channel gates' coefficients (secondary chunking; Triton's smallest tile)


def _gate_sum(x: jax.Array, g: int) -> jax.Array:
  """A cotangent [.., d] of something broadcast from gates [.., g]: summed over d for per-head gates (g = 1)."""
  return x if g > 1 else jnp.sum(x, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class _HeadGates:
  """Per-head gates: the chunk's step coefficients C [c, c] (W1's dual-form mixing Σ_s (hq_t·h_s) C[t, s] e1_s) and
  the first layer's dual-form scores S_q [c, c] are formed outside the kernels (refs [n·c, c]); the kernels return
  their cotangents and XLA takes them to the gates."""

  coef: object
  scores_ref: object

  def scores(self, dot, rows, q_ref, k_ref) -> tuple:
    """(ref, index) of the chunk's S_q."""
    return self.scores_ref, rows

  def dscores(self, rows, grads) -> tuple:
    """(ref, index) where the chunk's cotangent of S_q is summed."""
    return grads[1], rows

  def scores_backward(self, dot, rows, q_ref, k_ref, grads):
    return None  # S_q's cotangent is already in its output

  def mix(self, dot, rows, hh, e1):
    return dot("ts,sd->td", hh * self.coef[rows, :], e1)

  def mix_backward(self, dot, rows, hh, e1, d_mixed, mixed, grads) -> tuple:
    """(d hh, d e1) of the mixing; C's cotangent is stored in ``grads[0]``."""
    del mixed
    coef = self.coef[rows, :]
    d_sh = dot("td,sd->ts", d_mixed, e1)
    grads[0][rows, :] = d_sh * hh
    return d_sh * coef, dot("ts,td->sd", hh * coef, d_mixed)


@dataclasses.dataclass(frozen=True)
class _ChannelGates:
  """Channel gates: C[t, s, i] = η_si B_ti / B_si (s ≤ t; B_{t−1} for pre reads) is [c, c, d], on W2's input axis
  (the scores S_q[t, s] = Σ_i q_ti C[t, s, i] k_si) and W1's output axis (the mixing Σ_s (hq_t·h_s) C[t, s, o] e1_so),
  so neither is one matmul; both are formed here from η, log B_read and log B [n·c, d]. The chunk is cut into row
  blocks of :data:`SUB_BLOCK` (GLA's secondary chunking, spec mom §2.4): a block with itself is formed element-wise
  ([r, r, d], exponents masked before the exp); with an earlier block it factors through B at the last row of the
  block before, B_t / B_ref and η_s B_ref / B_s, both ≤ 1, so it is a matmul that cannot overflow. Blocks of values
  are loaded from scratch refs (Triton cannot slice a value). Three bilinear forms cover the forward and backward:
  ``_mix`` Σ_s a[t, s] C[t, s, o] x[s, o], ``_pair`` Σ_o y[t, o] C[t, s, o] x[s, o] and ``_mix_t`` Σ_t y[t, o] a[t, s]
  C[t, s, o] / η[s, o]. The gate cotangents come from the same products: for a form's summand G[t, s, o], Σ_s G is
  log B_read's and Σ_t G is −log B's and (without η) η's."""

  eta: object  # refs [n·c, d]: η, log B_read, log B
  lread: object
  lb: object
  a: object  # scratch refs [c, c], [c, d] × 4, [c, c] × 3
  x: object
  y: object
  out: object
  out2: object
  pairs: object
  sq: object
  dsq: object
  post: bool
  interpret: bool

  def _blocks(self, base):
    c = self.a.shape[0]
    r = min(c, SUB_BLOCK)
    t = jnp.arange(r)
    mask = (t[:, None] >= t[None, :] if self.post else t[:, None] > t[None, :])[..., None]
    local = [pl.ds(i * r, r) for i in range(c // r)]
    rows = [pl.ds(_aligned(base + i * r, r), r) for i in range(c // r)]
    ref = [None] + [self.lb[pl.ds(base + i * r - 1, 1), :] for i in range(1, c // r)]  # log B before block i
    return local, rows, ref, mask

  def _diag(self, row, mask):
    """C of a row block with itself [r, r, d], and the same without η."""
    plain = jnp.exp(jnp.where(mask, self.lread[row, :][:, None, :] - self.lb[row, :][None, :, :], -jnp.inf))
    return plain * self.eta[row, :][None], plain

  def _mix(self, dot, blocks, a, x, out) -> None:
    local, rows, ref, mask = blocks
    for i, (li, ri) in enumerate(zip(local, rows, strict=True)):
      acc = jnp.sum(a[li, li][:, :, None] * self._diag(ri, mask)[0] * x[li, :][None], axis=1)
      if i:
        inner = sum(dot("ts,sd->td", a[li, lj], x[lj, :] * self.eta[rj, :] * jnp.exp(ref[i] - self.lb[rj, :]))
                    for lj, rj in zip(local[:i], rows[:i], strict=True))
        acc = acc + jnp.exp(self.lread[ri, :] - ref[i]) * inner
      out[li, :] = acc

  def _pair(self, dot, blocks, y, x, out) -> None:
    local, rows, ref, mask = blocks
    for i, (li, ri) in enumerate(zip(local, rows, strict=True)):
      for j, (lj, rj) in enumerate(zip(local, rows, strict=True)):
        if j < i:
          out[li, lj] = dot("td,sd->ts", y[li, :] * jnp.exp(self.lread[ri, :] - ref[i]),
                            x[lj, :] * self.eta[rj, :] * jnp.exp(ref[i] - self.lb[rj, :]))
        elif j == i:
          out[li, li] = jnp.sum(y[li, :][:, None, :] * self._diag(ri, mask)[0] * x[li, :][None], axis=2)
        else:
          out[li, lj] = jnp.zeros((li.size, lj.size), out.dtype)

  def _mix_t(self, dot, blocks, a, y, out) -> None:
    local, rows, ref, mask = blocks
    for j, (lj, rj) in enumerate(zip(local, rows, strict=True)):
      acc = jnp.sum(y[lj, :][:, None, :] * a[lj, lj][:, :, None] * self._diag(rj, mask)[1], axis=0)
      for i in range(j + 1, len(local)):
        li, ri = local[i], rows[i]
        acc = acc + jnp.exp(ref[i] - self.lb[rj, :]) * dot(
            "ts,td->sd", a[li, lj], y[li, :] * jnp.exp(self.lread[ri, :] - ref[i]))
      out[lj, :] = acc

  def scores(self, dot, rows, q_ref, k_ref) -> tuple:
    self.y[...], self.x[...] = q_ref[rows, :], k_ref[rows, :]
    _sync(self.interpret)
    self._pair(dot, self._blocks(rows.start), self.y, self.x, self.sq)
    _sync(self.interpret)
    return self.sq, pl.ds(0, self.sq.shape[0])

  def dscores(self, rows, grads) -> tuple:
    return self.dsq, pl.ds(0, self.dsq.shape[0])

  def scores_backward(self, dot, rows, q_ref, k_ref, grads) -> tuple:
    """(d q, d k) [c, d] from the summed cotangent of S_q; the gates' shares are added to ``grads``."""
    blocks = self._blocks(rows.start)
    q, k, eta = q_ref[rows, :], k_ref[rows, :], self.eta[rows, :]
    self.y[...], self.x[...] = q, k
    _sync(self.interpret)
    self._mix(dot, blocks, self.dsq, self.x, self.out)
    self._mix_t(dot, blocks, self.dsq, self.y, self.out2)
    _sync(self.interpret)
    d_q, d_k = self.out[...], self.out2[...]
    d_eta, d_lread, d_lb = grads
    d_eta[rows, :] += k * d_k
    d_lread[rows, :] += q * d_q
    d_lb[rows, :] -= eta * k * d_k
    return d_q, eta * d_k

  def mix(self, dot, rows, hh, e1):
    self.a[...], self.x[...] = hh, e1
    _sync(self.interpret)
    self._mix(dot, self._blocks(rows.start), self.a, self.x, self.out)
    _sync(self.interpret)
    return self.out[...]

  def mix_backward(self, dot, rows, hh, e1, d_mixed, mixed, grads) -> tuple:
    """(d hh, d e1) of the mixing; the gates' cotangents are stored in ``grads``."""
    blocks = self._blocks(rows.start)
    self.a[...], self.x[...], self.y[...] = hh, e1, d_mixed
    _sync(self.interpret)
    self._pair(dot, blocks, self.y, self.x, self.pairs)
    self._mix_t(dot, blocks, self.a, self.y, self.out)
    _sync(self.interpret)
    m_prime, eta = self.out[...], self.eta[rows, :]
    d_eta, d_lread, d_lb = grads
    d_eta[rows, :], d_lread[rows, :], d_lb[rows, :] = e1 * m_prime, d_mixed * mixed, -eta * e1 * m_prime
    return self.pairs[...], eta * m_prime


def _gates(spec, refs, scratch, interpret):
  """The gate kind the inputs carry: two refs (C, S_q [n·c, c]) per head, three (η, log B_read, log B) per
  channel."""
  if len(refs) == 2:
    return _HeadGates(*refs)
  return _ChannelGates(*refs, *scratch, post=spec.read == "post", interpret=interpret)


_COMMON = 9  # k, Q̃, q, v, δ, decay, B_c, chunk-end coefficients, complete


def _add_scale_cotangent(ret, states: _Tiles, slot, ds: _Tiles, scale_vjp, d_s2, d_s1, interpret) -> None:
  """The read scales' share of a state's cotangent, ∂s/∂A through the summed scale terms, added tile by tile."""
  if not ret.scaled:
    return
  d_t2, d_t1 = scale_vjp((d_s2, d_s1))
  _sync(interpret)

  def body(i, _):
    w2, w1 = states.load(slot, i)
    ds.add(0, i, jax.vjp(ret.scale_terms, w2)[1](d_t2)[0], jax.vjp(ret.scale_terms, w1)[1](d_t1)[0], interpret)
    return 0

  states.loop(body, 0)


def _closed_read(at_end: _Chunk, q_last, totals):
  """Pass over the closed state (``at_end.slot``, scale terms ``totals``): the chunk's last query's
  u = Σ_tiles gelu(s₂ W2 q) W1ᵀ [1, d] (before s₁), row by row (a [1, d] query is no matmul), with (s₂, s₁) and
  their vjp."""
  (s2, s1), scale_vjp = at_end.scales(totals)

  def body(i, u):
    w2, w1 = at_end.states.load(at_end.slot, i)
    h = kernel_gelu(s2 * jnp.sum(w2 * q_last, axis=1, keepdims=True))  # [tile, 1]
    return u + jnp.sum(w1 * h.T, axis=1, keepdims=True).T

  return at_end.states.loop(body, jnp.zeros_like(q_last)), (s2, s1), scale_vjp


def _closed_read_backward(spec, at_end: _Chunk, q_last, totals, d_o, ds: _Tiles, ln, interpret):
  """The pull-back of :func:`_closed_read` (o = q + LN(s₁ u)) from d_o [1, d]: the closed state's cotangent is added
  to ``ds`` tile by tile; returns (d q [1, d], dγ, dβ)."""
  u, (s2, s1), scale_vjp = _closed_read(at_end, q_last, totals)
  d_su, dg, db = jax.vjp(lambda u, g, b: layer_norm(u, (g, b), spec.memory.ln_eps)[0], s1 * u, *ln)[1](d_o)
  d_u = s1 * d_su

  def body(i, carry):
    d_q, d_s2 = carry
    w2, w1 = at_end.states.load(at_end.slot, i)
    zraw = jnp.sum(w2 * q_last, axis=1, keepdims=True)  # [tile, 1]
    d_z = jnp.sum(w1 * d_u.T, axis=0, keepdims=True).T * kernel_gelu_grad(s2 * zraw)
    ds.add(0, i, s2 * d_z * q_last, d_u.T * kernel_gelu(s2 * zraw).T, interpret)
    return d_q + s2 * jnp.sum(w2 * d_z, axis=0, keepdims=True), d_s2 + jnp.sum(d_z * zraw)

  d_q, d_s2 = at_end.states.loop(body, (jnp.zeros_like(q_last), jnp.zeros((), q_last.dtype)))
  _add_scale_cotangent(spec.retention, at_end.states, at_end.slot, ds, scale_vjp, d_s2, jnp.sum(d_su * u), interpret)
  return d_q, dg, db


def _store_totals(ref, slot, totals) -> None:
  """A slot's scale terms (t₂, t₁) into row ``slot`` of ``ref`` [n + 1, 2]."""
  ref[pl.ds(slot, 1), :] = jnp.where(jnp.arange(2)[None, :] == 0, totals[0], totals[1])


def _load_totals(ref, slot) -> tuple:
  return row_scalars(ref[pl.ds(slot, 1), :])


def _last_row(c: int, complete):
  """[c, 1] mask of the chunk's last row where the chunk is complete (its read is the closed state's)."""
  return (jnp.arange(c) == c - 1)[:, None] & (complete > 0)


def _fwd_kernel(*refs, spec, n, c, tile, gates, interpret):
  (k_ref, qd_ref, q_ref, v_ref, delta_ref, decay_ref, end_decay_ref, end_coef_ref, complete_ref), rest = (
      refs[:_COMMON], refs[_COMMON:])
  gate_refs, (w2_ref, w1_ref, gamma_ref, beta_ref, o_ref, states2_ref, states1_ref, totals_ref), scratch = (
      rest[:gates], rest[gates:gates + 8], rest[gates + 8:])
  e, d = w2_ref.shape
  ln = (gamma_ref[...], beta_ref[...])
  initial, states = _Tiles(w2_ref, w1_ref, e, d, tile), _Tiles(states2_ref, states1_ref, e, d, tile)
  gate = _gates(spec, gate_refs, scratch, interpret)
  boundary = spec.reads_closed_state
  ret, dot = spec.retention, kernel_dot(spec.memory.matmul)

  def copy(i, terms):  # slot 0: the initial state
    w = initial.load(0, i)
    states.store(0, i, *w)
    return tuple(t + ret.scale_terms(x) for t, x in zip(terms, w, strict=True))

  zero = jnp.zeros((), w2_ref.dtype)
  totals = states.loop(copy, (zero, zero))
  _store_totals(totals_ref, 0, totals)

  def chunk(j, totals):  # totals: the scale terms of chunk j's start state
    _sync(interpret)  # chunk j's start state, stored by every thread, is complete
    rows = pl.ds(pl.multiple_of(j * c, c), c)
    scores = gate.scores(dot, rows, q_ref, k_ref)
    at = _Chunk(spec, states, j, rows, k_ref, qd_ref, *scores)
    (s2, s1), _ = at.scales(totals)
    e1, _ = keys_errors(spec, s1 * at.keys_forward(s2), at.k, v_ref[rows, :], delta_ref[rows], ln)
    hh, t1, totals = at.read_sums(s2, s1, e1, end=(j + 1, end_decay_ref[pl.ds(j, 1), :], end_coef_ref[rows, :]))
    _store_totals(totals_ref, j + 1, totals)
    uq = s1 * (decay_ref[rows, :] * t1 - gate.mix(dot, rows, hh, e1))
    o = q_ref[rows, :] + layer_norm(uq, ln, spec.memory.ln_eps)[0]
    if boundary:  # the chunk's last query reads the state it closed
      _sync(interpret)
      q_last = q_ref[pl.ds(j * c + c - 1, 1), :]
      u, (_, s1), _ = _closed_read(_Chunk(spec, states, j + 1, rows, k_ref, qd_ref, *scores), q_last, totals)
      o_last = q_last + layer_norm(s1 * u, ln, spec.memory.ln_eps)[0]
      o = jnp.where(_last_row(c, complete_ref[pl.ds(j, 1), :]), o_last, o)
    o_ref[rows, :] = o
    return totals

  jax.lax.fori_loop(0, n, chunk, totals)


def _bwd_kernel(*refs, spec, n, c, tile, gates, interpret):
  """Reverse over the chunks; ds2/ds1 hold the cotangent of the current chunk's end state (then of its start)."""
  (k_ref, qd_ref, q_ref, v_ref, delta_ref, decay_ref, end_decay_ref, end_coef_ref, complete_ref), rest = (
      refs[:_COMMON], refs[_COMMON:])
  gate_refs, rest = rest[:gates], rest[gates:]
  (states2_ref, states1_ref, totals_ref, gamma_ref, beta_ref, do_ref, dfinal2_ref, dfinal1_ref), rest = (
      rest[:8], rest[8:])
  (dk_ref, dqd_ref, dq_ref, dv_ref, ddelta_ref, ddecay_ref, dend_decay_ref, dend_coef_ref), rest = rest[:8], rest[8:]
  dgate_refs, (ds2_ref, ds1_ref, dgamma_ref, dbeta_ref, dh_ref, dz_ref), scratch = (
      rest[:gates], rest[gates:gates + 6], rest[gates + 6:])
  e, d = ds2_ref.shape
  g = decay_ref.shape[-1]
  ln = (gamma_ref[...], beta_ref[...])
  ret, eps = spec.retention, spec.memory.ln_eps
  states, dfinal = _Tiles(states2_ref, states1_ref, e, d, tile), _Tiles(dfinal2_ref, dfinal1_ref, e, d, tile)
  ds = _Tiles(ds2_ref, ds1_ref, e, d, tile)
  gate = _gates(spec, gate_refs, scratch, interpret)
  boundary = spec.reads_closed_state
  columns = lambda i: (slice(None), pl.ds(_aligned(i * tile, tile), tile))  # of the scratch [c, E]

  def final(i, _):  # the final state's cotangent
    ds.store(0, i, *dfinal.load(0, i))
    return 0

  ds.loop(final, 0)
  zero = jnp.zeros((), ds2_ref.dtype)

  def chunk(r, dln):
    j = n - 1 - r
    _sync(interpret)  # the cotangent of chunk j's end state, stored by every thread, is complete
    rows = pl.ds(pl.multiple_of(j * c, c), c)
    decay, do = decay_ref[rows, :], do_ref[rows, :]
    end_decay, end_coef = end_decay_ref[pl.ds(j, 1), :], end_coef_ref[rows, :]
    dot = kernel_dot(spec.memory.matmul)
    scores = gate.scores(dot, rows, q_ref, k_ref)
    at = _Chunk(spec, states, j, rows, k_ref, qd_ref, *scores)
    dq, dg_b, db_b = do, 0.0, 0.0
    if boundary:  # the chunk's last query read the state it closed: that read's cotangent joins the end state's
      last = _last_row(c, complete_ref[pl.ds(j, 1), :])
      d_q_last, dg_b, db_b = _closed_read_backward(
          spec, _Chunk(spec, states, j + 1, rows, k_ref, qd_ref, *scores), q_ref[pl.ds(j * c + c - 1, 1), :],
          _load_totals(totals_ref, j + 1), jnp.sum(jnp.where(last, do, 0.0), axis=0, keepdims=True), ds, ln,
          interpret)
      dq = do + jnp.where((jnp.arange(c) == c - 1)[:, None], d_q_last, 0.0)
      do = jnp.where(last, 0.0, do)
    dq_ref[rows, :] = dq
    # ---- recompute the forward (pass 1, the keys' errors, pass 2's sums) ----
    (s2, s1), scale_vjp = at.scales(_load_totals(totals_ref, j))
    uraw = at.keys_forward(s2)
    e1, _ = keys_errors(spec, s1 * uraw, at.k, v_ref[rows, :], delta_ref[rows], ln)
    hh, t1, _ = at.read_sums(s2, s1, e1)
    t2 = gate.mix(dot, rows, hh, e1)
    # ---- the reads: O = Q + LN(Uq), Uq = s₁ (decay ⊙ T1 − T2), T2 = the W1 mixing of HH and E1 ----
    (d_uq, dg_o, db_o) = jax.vjp(lambda u, g, b: layer_norm(u, (g, b), eps)[0], s1 * (decay * t1 - t2), *ln)[1](do)
    d_s1 = jnp.sum(d_uq * (decay * t1 - t2))
    d_t1 = s1 * decay * d_uq
    ddecay_ref[rows, :] = _gate_sum(s1 * d_uq * t1, g)  # stored now: fewer values live through the loops
    d_hh, d_e1 = gate.mix_backward(dot, rows, hh, e1, -s1 * d_uq, t2, dgate_refs)
    dscores_ref, dscores_rows = gate.dscores(rows, dgate_refs)
    dqd_ref[rows, :], dscores_ref[dscores_rows, :] = jnp.zeros_like(do), jnp.zeros((c, c), do.dtype)  # tile sums
    _sync(interpret)

    def reads_and_end(i, carry):  # B1: back through the reads and the chunk end, tile by tile
      d_kc, d_e1c, d_e1, d_s1, d_s2, d_end_decay = carry
      kc, e1c = at.k * end_coef, e1 * end_coef
      a = at.acts(i, s2, s1, e1)
      p2, p1 = ds.load(0, i)  # the end state's cotangent
      d_end_decay = (d_end_decay + jnp.sum(p2 * a["w2"], axis=0, keepdims=True)
                     + jnp.sum(p1 * a["w1"], axis=1, keepdims=True).T)
      d_e2 = -dot("ci,ei->ce", kc, p2)
      d_kc = d_kc - dot("ce,ei->ci", a["e2"], p2)
      d_e1c = d_e1c - dot("ce,de->cd", a["h"], p1)
      d_hk = dot("ts,te->se", d_hh, a["hq"]) - dot("cd,de->ce", e1c, p1)
      d_hq = dot("td,de->te", d_t1, a["w1"]) + dot("ts,se->te", d_hh, a["h"])
      da1 = dot("td,te->de", d_t1, a["hq"])
      d_zq = d_hq * kernel_gelu_grad(s2 * a["zq"])
      d_s2 = d_s2 + jnp.sum(d_zq * a["zq"])
      dqd_ref[rows, :] += s2 * dot("te,ei->ti", d_zq, a["w2"])
      dscores_ref[dscores_rows, :] -= s2 * dot("te,se->ts", d_zq, a["e2"])
      da2 = s2 * dot("te,ti->ei", d_zq, at.qd)
      d_e2 = d_e2 - s2 * dot("ts,te->se", at.scores, d_zq)
      d_p = d_e2 * kernel_gelu_grad(a["z"])
      d_z = s1 * a["praw"] * d_e2 * gelu_grad2(a["z"])  # through gelu'(z) in e2
      d_s1 = d_s1 + jnp.sum(d_p * a["praw"])
      d_e1 = d_e1 + s1 * dot("ce,de->cd", d_p, a["w1"])
      da1 = da1 + s1 * dot("cd,ce->de", e1, d_p)
      dz_ref[columns(i)], dh_ref[columns(i)] = d_z, d_hk
      _sync(interpret)  # every thread has read this tile of the end state's cotangent (and stored dQ̃, dS_q)
      ds.store(0, i, end_decay * p2 + da2, end_decay.T * p1 + da1)
      return d_kc, d_e1c, d_e1, d_s1, d_s2, d_end_decay

    d_kc, d_e1c, d_e1, d_s1, d_s2, d_end_decay = states.loop(
        reads_and_end, (jnp.zeros_like(do), jnp.zeros_like(do), d_e1, d_s1, zero, jnp.zeros((1, d), do.dtype)))
    d_k = d_kc * end_coef
    if (through_scores := gate.scores_backward(dot, rows, q_ref, k_ref, dgate_refs)) is not None:
      dq_ref[rows, :] += through_scores[0]
      d_k = d_k + through_scores[1]
    dend_decay_ref[pl.ds(j, 1), :] = _gate_sum(d_end_decay, g)
    dend_coef_ref[rows, :] = _gate_sum(d_kc * at.k + d_e1c * e1, g)
    # ---- back through the keys' errors, row-wise (recomputed from fresh loads: nothing of the first computation
    # but u stays live through B1) ----
    _, (ln_vjp, bias_vjp, lnb_vjp) = keys_errors(spec, s1 * uraw, at.k, v_ref[rows, :], delta_ref[rows], ln)
    d_g, d_nrm, d_rstd, dg_e = lnb_vjp(d_e1 + d_e1c * end_coef)
    d_y, d_v, d_delta = bias_vjp(d_g)
    d_u, dg_y, db_y = ln_vjp((d_y, d_nrm, d_rstd))
    d_s1 = d_s1 + jnp.sum(d_u * uraw)
    _sync(interpret)  # the scratch and the start state's cotangent of B1 are complete

    def keys(i, carry):  # B2: back through the keys' forward z = s₂ K W2ᵀ, u = s₁ gelu(z) W1ᵀ
      d_k, d_s2 = carry
      w2, w1 = states.load(j, i)
      zraw = dot("ci,ei->ce", at.k, w2)
      z = s2 * zraw
      d_zk, d_hk = dz_ref[columns(i)], dh_ref[columns(i)]
      da1 = s1 * dot("cd,ce->de", d_u, kernel_gelu(z))
      d_z = (s1 * dot("cd,de->ce", d_u, w1) + d_hk) * kernel_gelu_grad(z) + d_zk
      da2 = s2 * dot("ce,ci->ei", d_z, at.k)
      ds.add(0, i, da2, da1, interpret)
      return d_k + s2 * dot("ce,ei->ci", d_z, w2), d_s2 + jnp.sum(d_z * zraw)

    d_k, d_s2 = states.loop(keys, (d_y + d_k, d_s2))
    _add_scale_cotangent(ret, states, j, ds, scale_vjp, d_s2, d_s1, interpret)  # B3
    dk_ref[rows, :], dv_ref[rows, :], ddelta_ref[rows] = d_k, d_v, d_delta
    return dln[0] + dg_o + dg_e + dg_y + dg_b, dln[1] + db_o + db_y + db_b

  zeros_d = jnp.zeros(gamma_ref.shape, gamma_ref.dtype)
  dgamma_ref[...], dbeta_ref[...] = jax.lax.fori_loop(0, n, chunk, (zeros_d, zeros_d))


def _call(kernel, inputs, out_shapes, *, tuning: Tuning, interpret: bool):
  """Grid [b·h]: every input and output [b·h, ...] is passed whole per head."""
  spec = lambda shape: pl.BlockSpec((None, *shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))
  return pl.pallas_call(
      kernel,
      grid=(inputs[0].shape[0],),
      in_specs=[spec(x.shape) for x in inputs],
      out_specs=[spec(o.shape) for o in out_shapes],
      out_shape=out_shapes,
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
  )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(spec, tuning, interpret, rows, s0, ln):
  """rows: per head (K, Q̃, Q, V [N, n·c, d], δ [N, n·c], decay [N, n·c, g], S_q [N, n·c, c], B_c [N, n, g], chunk-end
  coefficients [N, n·c, g], complete [N, n, 1] (1.0 where the chunk is closed), then W1's mixing: C [N, n·c, c]
  (g = 1) or η, log B_read, log B [N, n·c, d]); s0 (W2 [N, E, d], W1 [N, d, E]); ln (γ, β) [N, d] -> (o
  [N, n·c, d], the final state W2 [N, E, d], W1 [N, d, E])."""
  return _scan_fwd(spec, tuning, interpret, rows, s0, ln)[0]


def _launch(spec, tuning, interpret, rows, e: int) -> dict:
  n = rows[6].shape[1]
  return dict(spec=spec, n=n, c=rows[0].shape[1] // n, tile=tuning.tile(e), gates=len(rows) - _COMMON,
              interpret=interpret)


def _scratch(like, c: int, d: int) -> tuple:
  """Channel gates' per-head scratch (:class:`_ChannelGates`), allocated for either gate kind."""
  return like(c, c), like(c, d), like(c, d), like(c, d), like(c, d), like(c, c), like(c, c), like(c, c)


def _scan_fwd(spec, tuning, interpret, rows, s0, ln):
  big, length, d = rows[0].shape
  e = s0[0].shape[1]
  launch = _launch(spec, tuning, interpret, rows, e)
  n = launch["n"]
  like = lambda *shape: jax.ShapeDtypeStruct((big, *shape), rows[0].dtype)  # float32 (float64 in tests)
  o, states2, states1, totals, *_ = _call(  # the start of every chunk and the end of the last, n + 1 slots
      functools.partial(_fwd_kernel, **launch), (*rows, *s0, *ln),
      (like(length, d), like((n + 1) * e, d), like((n + 1) * d, e), like(n + 1, 2), *_scratch(like, launch["c"], d)),
      tuning=tuning, interpret=interpret)
  return (o, (states2[:, n * e:], states1[:, n * d:])), (rows, (states2, states1, totals), ln)


def _scan_bwd(spec, tuning, interpret, residuals, cotangents):
  rows, states, ln = residuals
  do, dfinal = cotangents
  big, _, d = rows[0].shape
  e = states[1].shape[2]
  launch = _launch(spec, tuning, interpret, rows, e)
  like = lambda *shape: jax.ShapeDtypeStruct((big, *shape), rows[0].dtype)
  grads = rows[:_COMMON - 1] + rows[_COMMON:]  # every row input but ``complete``
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in grads)
  shapes += (like(e, d), like(d, e), like(d), like(d), like(launch["c"], e), like(launch["c"], e))
  out = _call(functools.partial(_bwd_kernel, **launch), (*rows, *states, *ln, do, *dfinal),
              shapes + _scratch(like, launch["c"], d), tuning=tuning, interpret=interpret)
  drows, (ds2, ds1, dgamma, dbeta) = out[:len(grads)], out[len(grads):len(grads) + 4]
  drows = (*drows[:_COMMON - 1], jnp.zeros_like(rows[_COMMON - 1]), *drows[_COMMON - 1:])
  return drows, (ds2, ds1), (dgamma, dbeta)


_scan.defvjp(_scan_fwd, _scan_bwd)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "remat", "matmul", "tuning", "interpret"))
def miras_pallas(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None, ln=None,
                 chunk_size: int = 64, lengths=None, remat: bool = True, matmul: str = "float32",
                 tuning: Tuning = Tuning(), interpret: bool = False):
  """The chunked Miras memory for the memories :func:`unsupported` accepts; arguments and returns as
  :func:`chunked.miras_chunked` (``initial_momentum`` must be None). The backward always recomputes each chunk
  from its checkpointed start state (``remat`` is implied). ``interpret`` runs the kernels in Pallas interpret mode
  (any backend); ``tuning`` the launch settings (:class:`Tuning`)."""
  b, t, h, d = q.shape
  if (why := unsupported(spec, chunk_size, d, tuning)) is not None:
    raise ValueError(f"the Pallas Miras kernels cannot run this memory: {why}")
  del initial_momentum, remat
  spec = with_matmul(spec, matmul)
  x = flat.chunk_inputs(spec, q, k, v, gates, chunk_size, lengths)
  n, big = x.q.shape[0], b * h
  per_head = lambda a: jnp.moveaxis(a, 0, 1).reshape(big, n * chunk_size, *a.shape[3:])  # [n, N, c, ..]
  rows = tuple(per_head(a) for a in (x.k, x.q * x.decay, x.q, x.v, x.delta, x.decay))
  rows += (jnp.moveaxis(x.end_decay, 0, 1), per_head(x.end_coef), x.complete.T[..., None].astype(x.q.dtype))
  if gates.eta.shape[-1] == 1:
    rows += (per_head(x.w1_coef), per_head(x.scores_q))
  else:  # channel gates: W1's coefficients are formed in the kernels from η, log B_read and log B
    eta, log_alpha, log_b, _ = x.w1_coef
    rows += tuple(per_head(a) for a in (eta, log_b if spec.read == "post" else log_b - log_alpha, log_b))
  ln = flat.layer_norm_params(ln, b, h, d)
  s0 = tuple(initial_state[name].reshape(big, *initial_state[name].shape[2:]) for name in ("w2", "w1"))
  o, final = _scan(spec, tuning, interpret, rows, s0, tuple(p[:, 0] for p in ln))
  o = unchunk(jnp.moveaxis(o.reshape(b, h, n, chunk_size, d), 2, 0), t)
  return o, {name: w.reshape(b, h, *w.shape[1:]) for name, w in zip(("w2", "w1"), final, strict=True)}, None
