"""Miras MLP memories as two Pallas (Triton backend, GPU) kernels: one program walks all chunks of one head.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4) in the chunkwise form of :mod:`chunked` (same
semantics: the frozen-gradient loop R1 of :mod:`reference`). On an H200 the XLA paths launch ~32 (:mod:`flat`) to
~47 (:mod:`chunked`) kernels per chunk forward and ~160 forward + backward, ~5 µs each, so a step costs what its
kernels launch, not what they compute (docs/benchmarks.md, profile). Here the whole chunk loop is ONE kernel launch
per direction, grid [b·h]: a program owns one head and runs every chunk step of :func:`chunk_step` in a
``fori_loop`` (as :mod:`layers.kernels.gated_delta.pallas_triton` does for the gated delta rule's [K, V] state).
The head's state {W2 [E, d], W1 [d, E]} (2·E·d float32, every register of 128 threads) lives in global memory
between chunks, behind a barrier:

  * forward: chunk j reads its start state from slot j of the checkpoints and writes its end state to slot j + 1
    (n + 1 slots; the last is the final state), and writes the reads o [c, d];
  * backward: a reverse ``fori_loop`` that loads chunk j's start state, recomputes the chunk step and pulls the
    cotangents (dS of its end state, do of its reads) back through it with ``jax.vjp`` traced *inside* the kernel,
    so the derivative is the chunk step's own (every product a 2-D matmul Triton lowers); dS lives in the dS₀
    output between chunks. The pull-back runs in two parts, reads and chunk end first, then the keys' errors
    recomputed from fresh loads, so the two parts' intermediates are never live together (with E = 256, d = 64
    the whole step's were: > 227 KiB of shared memory at compile time, docs/benchmarks.md).

The chunk step is :mod:`flat`'s for one head, with what :mod:`flat` hoists out of its scan formed in the program
from the per-token gates (the step coefficients, the decays, the chunk end's coefficients). Per-head gates take
the chunk as one block of rows. Channel gates need the [c, c, d] coefficients C[t, s, i] = η_si B_ti / B_si, which
are not one matmul: the chunk is cut into sub-blocks of 16 rows (GLA's secondary chunking, spec mom §2.4); a
sub-block with itself is formed element-wise ([16, 16, d], exponents masked before the exp), and with an earlier one
factors through B at the last row of the sub-block before, q ⊙ B_t/B_ref and k ⊙ η B_ref/B_s, both ≤ 1, so it is a
matmul that cannot overflow. Sub-blocks are loaded from the refs one by one (Triton cannot slice a value). The
chunk boundary read (Moneta, elastic net) reads the closed state in the same iteration. Triton has no erf, so GELU
inside the kernels uses :func:`erf` (|error| < 1.2e-7, so |Δgelu(z)| < 6e-8·|z|).

Covers the MLP memory with no momentum and no lag token (``unsupported`` says why otherwise); c, d and E must be
powers of two ≥ 16 (Triton tiles). Memory: the checkpoints are (n + 1)·2·E·d float32 per head (8 × 4096 tokens,
d = 64, E = 256, H = 16: 1 GiB). Compiling the backward kernel takes minutes (the chunk step and its derivative are
unrolled: 4–8 minutes per-head on a 2-core CPU, over 35 with channel gates; ``benchmarks/triton_compile.py``). The
kernels run in Pallas interpret mode on the CPU, which is how the tests check them. Shapes and returns as
:func:`chunked.miras_chunked`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.miras import flat
from layers.kernels.miras.chunked import chunk_sequence, unchunk, with_matmul
from layers.miras.memory import layer_norm, layer_norm_backward
from layers.miras.memory import matmul as product
from layers.miras.spec import Gates, MemorySpec

log = logging.getLogger("memlab")

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


def _gelu(z):
  return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def _gelu_grad(z):
  return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


SUB_BLOCK = 16  # rows of a chunk's sub-blocks with channel gates (secondary chunking; Triton's smallest tile)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch settings, read when the kernels are traced (static): ``num_warps`` per program (one program per
  head); ``hidden_tile``: the state and every [·, E] activation are cut into tiles of this many columns of E (E
  if it is smaller), so each
  matmul and each live tile is smaller (fewer registers and less shared memory at once) at the price of more,
  smaller matmuls. With E = 256, d = 64, whole-E tiles need 256 KiB of shared memory in the backward kernel,
  more than a block may use (227 KiB); 64 needs 208 KiB (``benchmarks/triton_compile.py``). Timed on the GPU by
  ``benchmarks/miras.py --warps ... --hidden-tile ...``."""

  num_warps: int = 4
  hidden_tile: int = 64

  def tiles(self, hidden: int) -> int:
    """How many tiles cut a hidden width E."""
    return max(1, hidden // self.hidden_tile)


def unsupported(spec: MemorySpec, chunk_size: int, head_dim: int, tuning: Tuning = Tuning()) -> str | None:
  """Why these kernels cannot run this memory, or None if they can (any backend: interpret mode runs anywhere): the
  memories :mod:`flat` covers, at Triton's tile sizes."""
  if (why := flat.unsupported(spec)) is not None:
    return why
  hidden = spec.memory.expansion * head_dim
  sizes = (("chunk_size", chunk_size), ("head dim", head_dim), ("hidden width", hidden),
           ("tuning.hidden_tile", min(hidden, tuning.hidden_tile)))
  for name, n in sizes:
    if n < 16 or n & (n - 1):
      return f"{name} must be a power of two >= 16 (Triton tiles), got {n}"
  return None


def _gated_scores(dot, q, k, coef):
  """Σ_i q_ti k_si C[t, s, i] [r, r] for coefficients C [r, r, g]: one matmul per head (g = 1), element-wise in
  float32 per channel (g = d)."""
  if coef.shape[-1] == 1:
    return dot("ti,si->ts", q, k) * coef.reshape(coef.shape[:2])
  return jnp.sum(q[:, None, :] * k[None, :, :] * coef, axis=-1)


def _gated_mix(dot, scores, coef, e):
  """Σ_s scores[t, s] C[t, s, o] e_so [r, d] for coefficients C [r, r, g] (g = 1 or d, as :func:`_gated_scores`)."""
  if coef.shape[-1] == 1:
    return dot("ts,sd->td", scores * coef.reshape(coef.shape[:2]), e)
  return jnp.sum(scores[:, :, None] * coef * e[None, :, :], axis=1)


def _through_w2(dot, w2s: tuple, x):
  """x W2ᵀ, tile by tile along E: [r, d] -> tuple of [r, E/m]."""
  return [dot("ti,ei->te", x, w2) for w2 in w2s]


def _through_w1(dot, w1s: tuple, hs):
  """Σ_tiles h W1ᵀ: tuple of [r, E/m] -> [r, d]."""
  return sum(dot("te,de->td", h, w1) for h, w1 in zip(hs, w1s, strict=True))


def _hidden_scores(dot, hs, gs):
  """Σ_E h_t g_s over the tiles: [r, r]."""
  return sum(dot("te,se->ts", h, g) for h, g in zip(hs, gs, strict=True))


def key_errors(spec: MemorySpec, dot, s: dict, blocks: tuple, ln: tuple) -> tuple:
  """Step 1 of :func:`chunk_step`: per row block, (h, e2, e1) of its keys at the chunk-start weights W₀ = s₀·S₀ (h
  and e2 tuples of E-tiles [r, E/m], e1 [r, d]), the errors clipped as ``spec.inner_clip`` says."""
  mem = spec.memory
  scale = spec.retention.read_scale(s)
  s2, s1, w1s = scale["w2"], scale["w1"], s["w1"]
  keys = []
  for _, k, v, _, _, _, delta in blocks:
    zk = [s2 * z for z in _through_w2(dot, s["w2"], k)]
    hk = tuple(_gelu(z) for z in zk)
    y, n, rstd = layer_norm(s1 * _through_w1(dot, w1s, hk), ln, mem.ln_eps)
    e1 = layer_norm_backward(spec.bias.grad(k + y, v, delta), n, rstd, ln[0])
    e2 = tuple(s1 * dot("td,de->te", e1, w1) * _gelu_grad(z) for z, w1 in zip(zk, w1s, strict=True))
    acts = spec.clip_errors({"w2": (k, e2), "w1": (hk, e1)})
    keys.append((hk, acts["w2"][1], acts["w1"][1]))
  return tuple(keys)


def chunk_step(spec: MemorySpec, dot, s: dict, blocks: tuple, complete, ln: tuple) -> tuple[dict, tuple]:
  """One chunk of one head: state -> (state at the chunk end, reads o [r, d] per row block).

  The state is tiled along the hidden axis E: {w2: tuple of [E/m, d], w1: tuple of [d, E/m]} for m hidden blocks
  (every [·, E] activation is then a tuple of m tiles, the sums over E run over the tiles). ``blocks``: the chunk's
  rows in consecutive blocks of r, each (q, k, v [r, d], η, log α, log B [r, g], δ [r]), log B the chunk-local
  inclusive cumulative sum of log α, g = 1 (per-head gates) or d (per channel: on W2's input axis and W1's output
  axis); ``complete``: a scalar flag, the chunk is closed into the state; ln = (γ, β) [d]; ``dot(spec, a, b)`` a
  2-D einsum. The arithmetic of :func:`flat._step` for one head (see :mod:`chunked` for the steps): the keys'
  errors (:func:`key_errors`), then the reads and the chunk end (:func:`reads_and_close`).
  """
  return reads_and_close(spec, dot, s, blocks, key_errors(spec, dot, s, blocks, ln), complete, ln)


def reads_and_close(spec: MemorySpec, dot, s: dict, blocks: tuple, keys: tuple, complete, ln: tuple):
  """Steps 3 and 4 of :func:`chunk_step` from the keys' errors, block by block: the step coefficients
  C[t, s] = η_s B_t / B_s of a row block with itself are formed element-wise with every exponent masked before the
  exp; with an earlier block they factor through B at the last row of the block before (GLA's secondary chunking:
  both factors ≤ 1), so they are matmuls. The chunk-end map is element-wise."""
  mem, ret = spec.memory, spec.retention
  post = spec.read == "post"
  t = jnp.arange(blocks[0][0].shape[0])
  mask = (t[:, None] >= t[None, :] if post else t[:, None] > t[None, :])[..., None]
  at_last_row = lambda x: jnp.sum(jnp.where((t == t.shape[0] - 1)[:, None], x, 0.0), axis=0)  # [r, m] -> [m]
  scale = ret.read_scale(s)
  s2, s1, w2s, w1s = scale["w2"], scale["w1"], s["w2"], s["w1"]
  ends = [at_last_row(block[5]) for block in blocks]  # log B at each row block's last row [g]
  # an earlier block j's keys (or errors) scaled by η_s B_ref / B_s, ref the last row of the block before this one
  earlier = lambda j, x, ref: x * blocks[j][3] * jnp.exp(ref - blocks[j][5])
  reads = []
  for i, (q, k, _, eta, la, lb, _) in enumerate(blocks):  # per-token reads, dual form (step 3), layer by layer
    lread = lb if post else lb - la
    coef = jnp.exp(jnp.where(mask, lread[:, None, :] - lb[None, :, :], -jnp.inf)) * eta[None]  # [r, r, g]
    hk, e2, e1 = keys[i]
    ref = ends[i - 1] if i else None
    scores = [(_gated_scores(dot, q, k, coef), i)] + [
        (dot("ti,si->ts", q * jnp.exp(lread - ref), earlier(j, blocks[j][1], ref)), j) for j in range(i)]
    z = [zq - sum(dot("ts,se->te", p, keys[j][1][m]) for p, j in scores)
         for m, zq in enumerate(_through_w2(dot, w2s, q * jnp.exp(lread)))]
    hq = tuple(_gelu(s2 * zm) for zm in z)
    mixed = _gated_mix(dot, _hidden_scores(dot, hq, hk), coef, e1)
    for j in range(i):
      mixed = mixed + jnp.exp(lread - ref) * dot("ts,sd->td", _hidden_scores(dot, hq, keys[j][0]),
                                                 earlier(j, keys[j][2], ref))
    reads.append(q + layer_norm(s1 * (jnp.exp(lread) * _through_w1(dot, w1s, hq) - mixed), ln, mem.ln_eps)[0])
  # the chunk end (step 4): S = B_c ⊙ S₀ − Σ_i (η_i B_c / B_i) ⊙ e_i a_iᵀ, then the retention's chunk-end map
  lend = ends[-1]
  rows = [(earlier(j, blocks[j][1], lend), earlier(j, keys[j][2], lend)) for j in range(len(blocks))]
  w2_end = [jnp.exp(lend)[None, :] * w2 - sum(dot("se,si->ei", keys[j][1][m], kj) for j, (kj, _) in enumerate(rows))
            for m, w2 in enumerate(w2s)]
  w1_end = [jnp.exp(lend)[:, None] * w1 - sum(dot("sd,se->de", ej, keys[j][0][m]) for j, (_, ej) in enumerate(rows))
            for m, w1 in enumerate(w1s)]
  closed = {"w2": tuple(ret.close({"w2": w})["w2"] for w in w2_end),
            "w1": tuple(ret.close({"w1": w})["w1"] for w in w1_end)}
  new = {name: tuple(jnp.where(complete, w, w0) for w, w0 in zip(closed[name], s[name], strict=True))
         for name in s}
  if post and ret.boundary_read:  # the chunk's last token reads the closed state (one row: element-wise products)
    q_last = at_last_row(blocks[-1][0])
    scale = ret.read_scale(new)
    h_last = [_gelu(scale["w2"] * jnp.sum(w2 * q_last[None, :], axis=1)) for w2 in new["w2"]]
    u_last = scale["w1"] * sum(jnp.sum(w1 * h[None, :], axis=1) for w1, h in zip(new["w1"], h_last, strict=True))
    o_last = q_last + layer_norm(u_last, ln, mem.ln_eps)[0]
    reads[-1] = jnp.where((t == t.shape[0] - 1)[:, None] & complete, o_last[None, :], reads[-1])
  return new, tuple(reads)


def _plain_dot(mode: str):
  """The forward kernel's products: :func:`layers.miras.memory.matmul` without its custom vjp (Triton lowers no
  custom_vjp call; the backward kernel differentiates ``matmul`` itself, whose vjp keeps bfloat16 operands)."""
  if mode == "bfloat16":
    return lambda spec, a, b: jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                         preferred_element_type=jnp.float32)
  return functools.partial(product, mode="float32")


def _block_rows(j, c: int, r: int) -> list:
  """Row slices of chunk j's blocks of r in per-head arrays [n·c, ...]."""
  return [pl.ds(pl.multiple_of(j * c + b * r, r), r) for b in range(c // r)]


def _load_blocks(token_refs, j, c: int, r: int) -> tuple:
  """Chunk j's blocks of (q, k, v, η, log α, log B, δ) from per-head refs [n·c, d] / [n·c, g] / [n·c]."""
  return tuple(tuple(ref[rows, :] if len(ref.shape) == 2 else ref[rows] for ref in token_refs)
               for rows in _block_rows(j, c, r))


def _state_slices(e: int, d: int, m: int, j) -> dict:
  """Ref indices of chunk j's state in m tiles along E: W2 rows of [n·E, d], W1 columns of [n·d, E] (j = 0 and
  n = 1 for a single state)."""
  tile = e // m
  w2 = [(pl.ds(_aligned(j * e + b * tile, tile), tile), slice(None)) for b in range(m)]
  w1 = [(pl.ds(_aligned(j * d, d), d), pl.ds(b * tile, tile)) for b in range(m)]
  return {"w2": w2, "w1": w1}


def _aligned(start, multiple: int):
  return start if isinstance(start, int) else pl.multiple_of(start, multiple)


def _load_state(w2_ref, w1_ref, m: int, j=0) -> dict:
  index = _state_slices(w1_ref.shape[-1], w2_ref.shape[-1], m, j)
  return {"w2": tuple(w2_ref[i] for i in index["w2"]), "w1": tuple(w1_ref[i] for i in index["w1"])}


def _store_state(w2_ref, w1_ref, state: dict, j=0) -> None:
  index = _state_slices(w1_ref.shape[-1], w2_ref.shape[-1], len(state["w2"]), j)
  for ref, name in ((w2_ref, "w2"), (w1_ref, "w1")):
    for i, w in zip(index[name], state[name], strict=True):
      ref[i] = w


def _sync(interpret: bool) -> None:
  """Every thread of the program waits here, and sees the others' earlier stores (a no-op when interpreted, which
  runs sequentially). The state lives in global memory between chunks: its 2·E·d float32 would take every register
  of 128 threads."""
  if not interpret:
    plgpu.debug_barrier()


def _fwd_kernel(q_ref, k_ref, v_ref, eta_ref, la_ref, lb_ref, delta_ref, complete_ref, w2_ref, w1_ref, gamma_ref,
                beta_ref, o_ref, states2_ref, states1_ref, *, spec, n, c, r, m, interpret):
  ln = (gamma_ref[...], beta_ref[...])
  dot = _plain_dot(spec.memory.matmul)
  token_refs = (q_ref, k_ref, v_ref, eta_ref, la_ref, lb_ref, delta_ref)
  _store_state(states2_ref, states1_ref, _load_state(w2_ref, w1_ref, m), 0)

  def body(j, carry):
    _sync(interpret)  # chunk j's start state, stored by every thread, is complete
    s, reads = chunk_step(spec, dot, _load_state(states2_ref, states1_ref, m, j), _load_blocks(token_refs, j, c, r),
                          complete_ref[j] > 0, ln)
    for rows, o in zip(_block_rows(j, c, r), reads, strict=True):
      o_ref[rows, :] = o
    _store_state(states2_ref, states1_ref, s, j + 1)
    return carry

  jax.lax.fori_loop(0, n, body, 0)


def _bwd_kernel(q_ref, k_ref, v_ref, eta_ref, la_ref, lb_ref, delta_ref, complete_ref, states2_ref, states1_ref,
                gamma_ref, beta_ref, do_ref, dfinal2_ref, dfinal1_ref,
                dq_ref, dk_ref, dv_ref, deta_ref, dla_ref, dlb_ref, ddelta_ref, ds2_ref, ds1_ref, dgamma_ref,
                dbeta_ref, *, spec, n, c, r, m, interpret):
  dot = functools.partial(product, mode=spec.memory.matmul)
  token_refs = (q_ref, k_ref, v_ref, eta_ref, la_ref, lb_ref, delta_ref)
  grad_refs = (dq_ref, dk_ref, dv_ref, deta_ref, dla_ref, dlb_ref, ddelta_ref)
  _store_state(ds2_ref, ds1_ref, _load_state(dfinal2_ref, dfinal1_ref, m))  # dS lives in ds2/ds1 between chunks

  def body(i, dln):
    j = n - 1 - i
    rows = _block_rows(j, c, r)
    inputs = lambda: (_load_state(states2_ref, states1_ref, m, j), _load_blocks(token_refs, j, c, r),
                      (gamma_ref[...], beta_ref[...]))
    s, blocks, ln = inputs()
    _, pull = jax.vjp(lambda s, blocks, keys, ln: reads_and_close(spec, dot, s, blocks, keys, complete_ref[j] > 0, ln),
                      s, blocks, key_errors(spec, _plain_dot(spec.memory.matmul), s, blocks, ln), ln)
    _sync(interpret)  # dS of chunk j's end, stored by every thread, is complete
    ds, dblocks, dkeys, dln_j = pull((_load_state(ds2_ref, ds1_ref, m), tuple(do_ref[block, :] for block in rows)))
    # the keys' errors are recomputed for their own derivative from fresh loads after a barrier, so the two
    # computations stay apart and the first one's intermediates are dead during the second's pull-back
    _sync(interpret)
    grads = jax.vjp(functools.partial(key_errors, spec, dot), *inputs())[1](dkeys)
    ds, dblocks, dln_j = jax.tree.map(jnp.add, (ds, dblocks, dln_j), grads)
    for block, grads in zip(rows, dblocks, strict=True):
      for ref, g in zip(grad_refs, grads, strict=True):
        if len(ref.shape) == 2:
          ref[block, :] = g
        else:
          ref[block] = g
    _sync(interpret)  # every thread has read dS before any overwrites it
    _store_state(ds2_ref, ds1_ref, ds)
    return dln[0] + dln_j[0], dln[1] + dln_j[1]

  zeros = jnp.zeros(gamma_ref.shape, gamma_ref.dtype)
  dgamma_ref[...], dbeta_ref[...] = jax.lax.fori_loop(0, n, body, (zeros, zeros))


def _call(kernel, inputs, out_shapes, *, num_warps: int, interpret: bool):
  """Grid [b·h]: every input and output [b·h, ...] is passed whole per head."""
  spec = lambda shape: pl.BlockSpec((None, *shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))
  return pl.pallas_call(
      kernel,
      grid=(inputs[0].shape[0],),
      in_specs=[spec(x.shape) for x in inputs],
      out_specs=[spec(o.shape) for o in out_shapes],
      out_shape=out_shapes,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(*inputs)


def _rows_per_block(c: int, eta: jax.Array) -> int:
  """The whole chunk with per-head gates (η [N, n·c, 1]); blocks of :data:`SUB_BLOCK` rows with channel gates."""
  return c if eta.shape[-1] == 1 else min(c, SUB_BLOCK)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(spec, tuning, interpret, tokens, complete, s0, ln):
  """tokens (q, k, v [N, n·c, d], η, log α, log B [N, n·c, g], δ [N, n·c]); complete [N, n]; s0 {w2 [N, E, d],
  w1 [N, d, E]};
  ln (γ, β) [N, d] -> (o [N, n·c, d], final state)."""
  return _scan_fwd(spec, tuning, interpret, tokens, complete, s0, ln)[0]


def _scan_fwd(spec, tuning, interpret, tokens, complete, s0, ln):
  big, rows, d = tokens[0].shape
  n, e = complete.shape[1], s0["w2"].shape[1]
  like = lambda *shape: jax.ShapeDtypeStruct((big, *shape), tokens[0].dtype)
  launch = dict(spec=spec, n=n, c=rows // n, r=_rows_per_block(rows // n, tokens[3]), m=tuning.tiles(e),
                interpret=interpret)
  o, states2, states1 = _call(  # states: the start of every chunk and the end of the last, n + 1 slots
      functools.partial(_fwd_kernel, **launch), (*tokens, complete, s0["w2"], s0["w1"], *ln),
      (like(rows, d), like((n + 1) * e, d), like((n + 1) * d, e)), num_warps=tuning.num_warps, interpret=interpret)
  final = {"w2": states2[:, n * e:], "w1": states1[:, n * d:]}
  return (o, final), (tokens, complete, states2, states1, ln)


def _scan_bwd(spec, tuning, interpret, residuals, cotangents):
  tokens, complete, states2, states1, ln = residuals
  do, dfinal = cotangents
  big, rows, d = tokens[0].shape
  n, e = complete.shape[1], states1.shape[2]
  out_shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tokens) + tuple(
      jax.ShapeDtypeStruct((big, *shape), tokens[0].dtype) for shape in ((e, d), (d, e), (d,), (d,)))
  launch = dict(spec=spec, n=n, c=rows // n, r=_rows_per_block(rows // n, tokens[3]), m=tuning.tiles(e),
                interpret=interpret)
  *dtokens, ds2, ds1, dgamma, dbeta = _call(
      functools.partial(_bwd_kernel, **launch),
      (*tokens, complete, states2, states1, *ln, do, dfinal["w2"], dfinal["w1"]), out_shapes,
      num_warps=tuning.num_warps, interpret=interpret)
  return tuple(dtokens), jnp.zeros_like(complete), {"w2": ds2, "w1": ds1}, (dgamma, dbeta)


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
  if gates.eta.shape[-1] != 1 and not interpret:
    log.warning("Miras Pallas kernels with channel gates: the backward kernel takes tens of minutes to compile "
                "(docs/benchmarks.md); per-head gates compile in minutes")
  spec = with_matmul(spec, matmul)
  x = chunk_sequence(q, k, v, gates, spec, chunk_size, lengths)
  n, big = x.q.shape[0], b * h
  per_head = lambda a: jnp.moveaxis(a, 0, 2).reshape(big, n * chunk_size, *a.shape[4:])  # [n, b, h, c, ..]
  tokens = tuple(per_head(a) for a in (x.q, x.k, x.v, x.eta, x.log_alpha, x.log_b, x.delta))
  complete = jnp.repeat(x.complete.T, h, axis=0).astype(x.q.dtype)  # [b·h, n], 1 where the chunk is closed
  ln = ln if ln is not None else (jnp.ones((h, d)), jnp.zeros((h, d)))
  ln = tuple(jnp.broadcast_to(p[None].astype(x.q.dtype), (b, h, d)).reshape(big, d) for p in ln)
  s0 = {name: w.reshape(big, *w.shape[2:]).astype(x.q.dtype) for name, w in initial_state.items()}
  o, state = _scan(spec, tuning, interpret, tokens, complete, s0, ln)
  o = unchunk(jnp.moveaxis(o.reshape(b, h, n, chunk_size, d), 2, 0), t)
  return o, {name: w.reshape(b, h, *w.shape[1:]) for name, w in state.items()}, None
