"""Miras MLP memories: every chunk's per-token reads as Pallas (Triton) kernels, one forward and two backward, a
program per chunk and head.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4) in the split form of :mod:`flat` (``xla_split``):
once the keys' recurrence has left every chunk's start state S_j and its ``flat.KeyPass`` (e1, e2, h), the reads
of all chunks are independent. In XLA they are batched matmuls over [n·b·h, c, E] float32 activations, each
written to and read back from HBM several times forward and again in the backward (the largest share of the
``pallas_tiles`` layer's time after its scan kernels, docs/benchmarks.md). Here one program owns one chunk of one
head (grid [n, b·h], ~8k programs at 8 × 4096 tokens: a full GPU, unlike the scan's 128 heads) and walks the hidden
axis E in tiles, so the [c, tile] activations never leave the chip; per-head gates only (:func:`flat.read_u`'s
per-head form):

  * forward: the chunk's coefficients from its gates, C[t, s] = η_s B̃_t / B_s (s ≤ t), the decayed queries
    Q̃ = B̃ ⊙ q and the first layer's scores S_q = (q kᵀ) ⊙ C ([c, c] on chip, never in HBM: as XLA arrays they
    and their cotangents were 4 × 134 MB and ≥ 0.5 ms of fusions per fwd+bwd at 8 × 4096 in an H100 profile,
    docs/benchmarks.md, "Fifteenth session"); one pass over the tiles: z = s₂ (Q̃ W2ᵀ − S_q e2), hq = gelu(z),
    summing hq hᵀ [c, c] and hq W1ᵀ [c, d]; then u = s₁ (B̃ ⊙ hq W1ᵀ − ((hq hᵀ) ⊙ C) e1) [c, d], with read scales
    (s₂, s₁) per row [c, 1] (a chunk's last token may read the closed state: :func:`flat.miras_flat`);
  * backward from u's cotangent and the two sums (which the forward keeps: 32 KiB a chunk and head, instead of a
    second pass over the tiles): the [c, c] / [c, d] pieces are pulled back, a pass over the tiles writes each
    tile's cotangents of W2, W1, e2, h and sums those of Q̃ and S_q, which a second kernel pulls back to q, k and
    the gates (log B̃ [c, 1], log B and η [1, c]).

The kernels return what XLA would for the start states (their cotangents in the start states' dtype, [n, b·h, E, d]
and [n, b·h, d, E]), so the keys' recurrence pulls back through them unchanged. GELU inside the kernels uses
:func:`pallas_triton.erf`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.miras.flat import ChunkInputs, KeyPass
from layers.kernels.miras.pallas_triton import kernel_dot, kernel_gelu, kernel_gelu_grad, kernel_operands, leading_block
from layers.miras.spec import MemorySpec


@dataclasses.dataclass(frozen=True)
class ReadTiling:
  """Launch settings (static): ``hidden_tile`` columns of E per step of a program's tile loop, Triton's
  ``num_warps`` per program of the forward and the queries' backward kernel and ``backward_warps`` of the first
  backward kernel's, ``num_stages`` (Triton's software pipelining of the tile loop's loads), and ``interpret``
  (Pallas interpret mode: any backend).

  The first backward kernel runs at 8 warps by default: its live values spill less there (ptxas for sm_90a, Moneta,
  tile 64: 544 B a thread against 1.36 KB at 4), and the sixteenth session's one-kernel read backward ran ~0.9 ms
  faster at 8 on an H100. The queries' kernel spills 72 B at 4 and none at 8, yet ran 0.37 ms at 4 and 0.50 at 8
  (the layer's profiles of the nineteenth and twentieth sessions, H100; docs/benchmarks.md). Two stages (the next
  tile's loads issued during this one's work) took the reads' forward from 1.42 to 1.00 ms and their fwd+bwd from
  5.13 to 4.67 ms (``benchmarks/miras_reads.py``, 8 × 4096, one H100, same run; docs/benchmarks.md, "Twenty-second
  session"); three took their fwd+bwd from 4.63 to 4.49 ms and the Moneta layer's from 15.07 to 14.89 (one H100,
  same call; "Twenty-third session")."""

  hidden_tile: int = 64
  num_warps: int = 4
  interpret: bool = False
  backward_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for name in ("hidden_tile", "num_warps", "backward_warps", "num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"ReadTiling.{name} must be positive, got {getattr(self, name)}")

  def backward(self) -> ReadTiling:
    """The first backward kernel's settings (``backward_warps`` warps)."""
    return dataclasses.replace(self, num_warps=self.backward_warps)


def _acc(x):
  """The accumulators' dtype for inputs like x: float32, or float64 for float64 inputs (tests)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _acc_array(like, *shape) -> jax.ShapeDtypeStruct:
  """A kernel output of ``shape`` in the accumulators' dtype for inputs like ``like``."""
  return jax.ShapeDtypeStruct(shape, _acc(like))


def _passed_array(mode: str, like, *shape) -> jax.ShapeDtypeStruct:
  """A sum one kernel leaves another (the forward's tile sums for the backward, the first backward kernel's for the
  queries'): bf16 in the bfloat16 mode, where the products they enter take bf16 operands anyway (rounded once, read
  back in float32: half the HBM traffic of 4 × 128 MiB at 8 × 4096), else as :func:`_acc_array`."""
  return jax.ShapeDtypeStruct(shape, jnp.bfloat16 if mode == "bfloat16" else _acc(like))


def _query_hidden(dot, s2, rows, w2, sq, e2):
  """The queries' first layer on one tile: (zraw = Q̃ W2ᵀ − S_q e2, z = s₂ zraw, hq = gelu(z)), [c, tile] each."""
  zraw = dot("ti,ei->te", rows, w2) - dot("ts,se->te", sq, e2)
  z = s2 * zraw
  return zraw, z, kernel_gelu(z)


def _gates(refs, strict: bool):
  """A chunk's dual-form decays from its gates' refs, as :func:`chunked.coefficients` has them (per head): the reads'
  decay B̃_t = exp(log_read_t) [c, 1], E[t, s] = B̃_t / B_s where s ≤ t (s < t if ``strict``: pre reads) and
  C = E ⊙ η_s [c, c], from log_read [c, 1] and the rows log B [1, c], η [1, c]. Returns (B̃, E, C). Loaded and
  formed where they are needed, again after a tile loop rather than held across it (each [c, c] array held is 32
  registers a thread at 4 warps)."""
  log_read, log_b, eta = (ref[...] for ref in refs)
  c = log_read.shape[0]
  t, s = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0), jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  visible = t > s if strict else t >= s
  ratio = jnp.exp(jnp.where(visible, log_read - log_b, -jnp.inf))
  return jnp.exp(log_read), ratio, ratio * eta


def _query_operands(dot, mode: str, strict: bool, q_ref, k_ref, gates):
  """The decayed queries Q̃ = B̃ ⊙ q [c, d] and first-layer scores S_q = (q kᵀ) ⊙ C [c, c] (as matmul operands,
  :func:`pallas_triton.kernel_operands`). Returns (B̃, C, Q̃, S_q)."""
  decay, _, coef = _gates(gates, strict)
  q = q_ref[...]
  return decay, coef, *kernel_operands(mode, q * decay, dot("td,sd->ts", q, k_ref[...]) * coef)


def _tile_sums(dot, mode: str, tile: int, strict: bool, s2, q_ref, k_ref, gates, refs):
  """The forward's pass over E: :func:`_query_operands`, then (hq hᵀ [c, c], hq W1ᵀ [c, d]) summed over the tiles
  of refs (W2 [E, d], W1 [d, E], e2 [c, E], h [c, E]). Returns (B̃, C, Q̃, S_q, hq hᵀ, hq W1ᵀ)."""
  decay, coef, rows, sq = _query_operands(dot, mode, strict, q_ref, k_ref, gates)
  w2_ref, w1_ref, e2_ref, h_ref = refs
  c, d = rows.shape

  def body(i, sums):
    hh, p = sums
    cols = pl.ds(pl.multiple_of(i * tile, tile), tile)
    hq = _query_hidden(dot, s2, rows, w2_ref[cols, :], sq, e2_ref[:, cols])[2]
    return hh + dot("te,se->ts", hq, h_ref[:, cols]), p + dot("te,de->td", hq, w1_ref[:, cols])

  zeros = jnp.zeros((c, c), _acc(rows)), jnp.zeros((c, d), _acc(rows))
  return decay, coef, rows, sq, *jax.lax.fori_loop(0, w2_ref.shape[0] // tile, body, zeros)


def _read_kernel(w2_ref, w1_ref, q_ref, k_ref, e2_ref, h_ref, log_read_ref, log_b_ref, eta_ref, e1_ref, s2_ref,
                 s1_ref, u_ref, *sums_refs, mode, tile, strict):
  """Forward: this chunk's u = s₁ (B̃ ⊙ hq W1ᵀ − ((hq hᵀ) ⊙ C) e1) [c, d] (s₂, s₁ [c, 1]); with ``sums_refs``
  also the tile loop's sums hq hᵀ [c, c] and hq W1ᵀ [c, d], the backward's residuals."""
  dot = kernel_dot(mode)
  s2, s1 = s2_ref[...], s1_ref[...]
  decay, coef, _, _, hh, p = _tile_sums(dot, mode, tile, strict, s2, q_ref, k_ref, (log_read_ref, log_b_ref, eta_ref),
                                        (w2_ref, w1_ref, e2_ref, h_ref))
  mixed = dot("ts,sd->td", hh * coef, e1_ref[...])
  u_ref[...] = (s1 * (decay * p - mixed)).astype(u_ref.dtype)
  for ref, total in zip(sums_refs, (hh, p)):
    ref[...] = total.astype(ref.dtype)


def _read_grad_kernel(w2_ref, w1_ref, q_ref, k_ref, e2_ref, h_ref, log_read_ref, log_b_ref, eta_ref, e1_ref, s2_ref,
                      s1_ref, hh_ref, p_ref, gu_ref, gw2_ref, gw1_ref, ge2_ref, gh_ref, glog_read_ref, glog_b_ref,
                      geta_ref, ge1_ref, gs2_ref, gs1_ref, grows_ref, gsq_ref, *, mode, tile, strict):
  """Backward, first kernel: from u's cotangent ĝ [c, d] and the forward's sums (hh = hq hᵀ, p = hq W1ᵀ, kept by
  it), the cotangents of every input of :func:`_read_kernel` but q and k; the gates' only through hh and p, and
  those of Q̃ [c, d] and S_q [c, c] for :func:`_queries_grad_kernel`. The pull-back through Q̃ and S_q is a kernel
  of its own: done here, it made this kernel (then with a second tile loop) spill 1.88 instead of 0.86 KB a thread
  (ptxas for sm_90a, 4 warps; spills track time on the H100: docs/benchmarks.md, "Sixteenth session")."""
  dot = kernel_dot(mode)
  gates = (log_read_ref, log_b_ref, eta_ref)
  s2, s1 = s2_ref[...], s1_ref[...]
  hh, p = hh_ref[...].astype(_acc(s2)), p_ref[...].astype(_acc(s2))
  decay, ratio, coef = _gates(gates, strict)
  e1, gu = e1_ref[...], gu_ref[...]
  weighted = hh * coef
  a = s1 * gu  # the cotangent of B̃ ⊙ p − mixed
  g_weighted = -dot("td,sd->ts", a, e1)
  ge1_ref[...] = (-dot("ts,td->sd", weighted, a)).astype(ge1_ref.dtype)
  gs1_ref[...] = jnp.sum(gu * (decay * p - dot("ts,sd->td", weighted, e1)), axis=1, keepdims=True).astype(gs1_ref.dtype)
  parts = _gate_parts(g_weighted * hh * ratio, eta_ref[...], jnp.sum(a * p, axis=1, keepdims=True) * decay)
  for ref, part in zip((glog_read_ref, glog_b_ref, geta_ref), parts, strict=True):
    ref[...] = part.astype(ref.dtype)
  gp, ghh = kernel_operands(mode, a * decay, g_weighted * coef)
  _, _, rows, sq = _query_operands(dot, mode, strict, q_ref, k_ref, gates)
  c, d = rows.shape

  def body(i, sums):
    grows, gsq, gs2 = sums
    cols = pl.ds(pl.multiple_of(i * tile, tile), tile)
    w2, w1, e2, h = w2_ref[cols, :], w1_ref[:, cols], e2_ref[:, cols], h_ref[:, cols]
    zraw, z, hq = _query_hidden(dot, s2, rows, w2, sq, e2)
    gw1_ref[:, cols] = dot("td,te->de", gp, hq).astype(gw1_ref.dtype)
    gh_ref[:, cols] = dot("ts,te->se", ghh, hq).astype(gh_ref.dtype)
    gz = (dot("td,de->te", gp, w1) + dot("ts,se->te", ghh, h)) * kernel_gelu_grad(z)
    gzs = s2 * gz
    gw2_ref[cols, :] = dot("te,ti->ei", gzs, rows).astype(gw2_ref.dtype)
    ge2_ref[:, cols] = (-dot("ts,te->se", sq, gzs)).astype(ge2_ref.dtype)
    return (grows + dot("te,ei->ti", gzs, w2), gsq - dot("te,se->ts", gzs, e2),
            gs2 + jnp.sum(gz * zraw, axis=1, keepdims=True))

  zeros = (jnp.zeros((c, d), _acc(rows)), jnp.zeros((c, c), _acc(rows)), jnp.zeros((c, 1), _acc(rows)))
  grows, gsq, gs2 = jax.lax.fori_loop(0, w2_ref.shape[0] // tile, body, zeros)
  gs2_ref[...] = gs2.astype(gs2_ref.dtype)
  grows_ref[...], gsq_ref[...] = grows.astype(grows_ref.dtype), gsq.astype(gsq_ref.dtype)


def _queries_grad_kernel(q_ref, k_ref, log_read_ref, log_b_ref, eta_ref, grows_ref, gsq_ref, glog_read_ref,
                         glog_b_ref, geta_ref, gq_ref, gk_ref, glog_read_out, glog_b_out, geta_out, *, mode, tile,
                         strict):
  """Backward, second kernel: the pull-back through Q̃ = B̃ ⊙ q and S_q = (q kᵀ) ⊙ E ⊙ η from their cotangents
  (``grows_ref`` [c, d], ``gsq_ref`` [c, c]) to q's and k's, and the gates' added to the first kernel's."""
  del tile
  dot = kernel_dot(mode)
  decay, ratio, _ = _gates((log_read_ref, log_b_ref, eta_ref), strict)
  eta, q, k, grows = eta_ref[...], q_ref[...], k_ref[...], grows_ref[...].astype(_acc(q_ref))
  g_sq = gsq_ref[...].astype(_acc(q_ref)) * ratio
  g_qk = g_sq * eta
  gq_ref[...] = (grows * decay + dot("ts,sd->td", g_qk, k)).astype(gq_ref.dtype)
  gk_ref[...] = dot("ts,td->sd", g_qk, q).astype(gk_ref.dtype)
  parts = _gate_parts(g_sq * dot("td,sd->ts", q, k), eta, jnp.sum(grows * q, axis=1, keepdims=True) * decay)
  for ref, out, part in zip((glog_read_ref, glog_b_ref, geta_ref), (glog_read_out, glog_b_out, geta_out), parts,
                            strict=True):
    out[...] = (ref[...] + part).astype(out.dtype)


def _gate_parts(g_ratio_eta, eta, g_log_decay) -> tuple:
  """The gates' cotangents (log_read [c, 1], log_b and η [1, c]) through C = E ⊙ η, E[t, s] = exp(log_read_t −
  log_b_s) (masked) and B̃ = exp(log_read), from C's cotangent times E (``g_ratio_eta`` [c, c]: η's cotangent is its
  column sums, and that of log_read_t − log_b_s is it times η) and B̃'s times B̃ (``g_log_decay`` [c, 1])."""
  g_log_ratio = g_ratio_eta * eta
  return (g_log_decay + jnp.sum(g_log_ratio, axis=1, keepdims=True), -jnp.sum(g_log_ratio, axis=0, keepdims=True),
          jnp.sum(g_ratio_eta, axis=0, keepdims=True))


def _call(kernel, mode: str, tiling: ReadTiling, strict: bool, inputs, outputs):
  """``kernel`` on grid [n, b·h] over stacked ``inputs``, returning stacked arrays like ``outputs``."""
  n, heads = inputs[0].shape[:2]
  tile = min(tiling.hidden_tile, inputs[0].shape[2])
  return pl.pallas_call(
      functools.partial(kernel, mode=mode, tile=tile, strict=strict),
      grid=(n, heads),
      in_specs=[leading_block(x) for x in inputs],
      out_specs=[leading_block(x) for x in outputs],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outputs],
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=tiling.interpret,
  )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _reads(mode: str, tiling: ReadTiling, strict: bool, *inputs):
  """u [n, b·h, c, d] of every chunk from the stacked inputs (W2, W1, q, k, e2, h, log B̃ [.., c, 1], log B and
  η [.., 1, c], e1, s₂, s₁)."""
  q = inputs[2]
  return _call(_read_kernel, mode, tiling, strict, inputs, [_acc_array(q, *q.shape)])[0]


def _reads_fwd(mode, tiling, strict, *inputs):
  """u and, as residuals, the inputs and every chunk's tile sums (hq hᵀ [n, b·h, c, c], hq W1ᵀ [n, b·h, c, d]:
  2 × 16 KiB a chunk and head in float32, which the backward would otherwise form again over every tile)."""
  q = inputs[2]
  n, heads, c, _ = q.shape
  u, hh, p = _call(_read_kernel, mode, tiling, strict, inputs,
                   [_acc_array(q, *q.shape), _passed_array(mode, q, n, heads, c, c), _passed_array(mode, q, *q.shape)])
  return u, (inputs, hh, p)


def _reads_bwd(mode, tiling, strict, residuals, g_u):
  inputs, hh, p = residuals
  w2, w1, q, k, e2, h, log_read, log_b, eta, e1, s2, s1 = inputs
  n, heads, c, _ = q.shape
  gw2, gw1, ge2, gh, *g_gates, ge1, gs2, gs1, grows, gsq = _call(
      _read_grad_kernel, mode, tiling.backward(), strict, (*inputs, hh, p, g_u),
      (w2, w1, e2, h, log_read, log_b, eta, e1, s2, s1, _passed_array(mode, q, *q.shape),
       _passed_array(mode, q, n, heads, c, c)))
  gq, gk, *g_gates = _call(_queries_grad_kernel, mode, tiling, strict,
                           (q, k, log_read, log_b, eta, grows, gsq, *g_gates), (q, k, log_read, log_b, eta))
  return gw2, gw1, gq, gk, ge2, gh, *g_gates, ge1, gs2, gs1


_reads.defvjp(_reads_fwd, _reads_bwd)


@dataclasses.dataclass(frozen=True)
class ChunkReads:
  """``flat.miras_flat``'s ``chunk_reads``: (spec, start states, ``KeyPass``es, ``flat.ChunkInputs``, read scales
  {layer: [n, b·h, c, 1]}) stacked over chunks -> u [n, b·h, c, d] (:func:`flat.read_u` of every chunk) with this
  module's kernels, which form each chunk's coefficients from its gates (per head) themselves."""

  tiling: ReadTiling = ReadTiling()

  def __call__(self, spec: MemorySpec, starts: dict, keys: KeyPass, x: ChunkInputs, scale: dict):
    eta, log_alpha, log_b, _ = x.gates
    log_read = log_b if spec.read == "post" else log_b - log_alpha
    row = lambda a: jnp.swapaxes(a, -1, -2)  # [.., c, 1] -> [.., 1, c]
    return _reads(spec.memory.matmul, self.tiling, spec.read != "post", starts["w2"], starts["w1"], x.q, x.k,
                  keys.e2, keys.hk, log_read, row(log_b), row(eta), keys.e1, scale["w2"], scale["w1"])
