"""Miras MLP memories, chunkwise, laid out for a GPU: all heads at once, little inside the scan.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4) in the chunkwise form of :mod:`chunked` (same
semantics: the frozen-gradient loop R1 of :mod:`reference`). On an H200 the chunked path runs ~47 small kernels per
chunk forward and ~160 forward + backward (docs/benchmarks.md, profile), so a step costs what its kernels launch,
not what they compute. This path computes the same chunk step with fewer kernels inside the scan:

  * everything that does not depend on the state is computed for all chunks before the scan: the decays and step
    coefficients C[t, i] (:func:`chunked.coefficients`) and the first layer's dual-form scores
    Σ_i q_ti k_si C[t, s, i] (with per-channel gates a batch of chunks at a time, and the second layer's mixing
    stays in the scan; both in sub-blocks that never form a chunk's [c, c, d] coefficients, :mod:`channel_gates`);
  * one matmul takes the chunk's keys and the previous chunk's last query through W2 = s₂·A2: that query's read is
    the chunk-end read of the closed state (``boundary_read``: Moneta, elastic net), which is the *next* chunk's
    start state; the last chunk's is one apply after the scan;
  * the read scale s₀ (Moneta's ‖A‖_q^{−(q−2)}) multiplies matmul outputs, never the state;
  * states are [b·h, out, in] arrays and every product is one batched matmul over b·h (no vmap of per-head code);
  * ``split=True`` (``xla_split``): the scan carries only the keys' recurrence (:func:`_keys`), and every chunk's
    per-token reads (:func:`_reads`) and the previous chunk's last query's read are taken afterwards from the stacked
    start states, a batch of chunks at a time (fewer kernels per chunk inside the scan, the start states kept).

Covers the MLP memory with per-head or per-channel gates and no momentum, with retentions whose weights are s₀·S
(decay, ℓq normalisation, elastic net); everything else is :mod:`chunked`'s (``unsupported`` says why). Shapes and
returns as :func:`chunked.miras_chunked`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.kernels.miras import channel_gates
from layers.kernels.miras.chunked import chunk_sequence, coefficients, unchunk, with_matmul
from layers.miras.memory import MLPMemory, gelu, gelu_grad, layer_norm, layer_norm_backward
from layers.miras.memory import matmul as product
from layers.miras.spec import Gates, MemorySpec, along


def unsupported(spec: MemorySpec) -> str | None:
  """Why the flat path cannot run this memory, or None if it can."""
  if not isinstance(spec.memory, MLPMemory):
    return "it covers the MLP memory only"
  if spec.momentum:
    return "it has no momentum"
  if spec.retention.lag:
    return "it has no lag token (Memora)"
  return None


def _read_scales(ret, s: dict) -> dict:
  """Each head's read scale s₀ per layer (the retention's per-head rule), shaped [N, 1, 1] to scale [N, r, out]."""
  return {name: r[:, None, None] for name, r in jax.vmap(ret.read_scale)(s).items()}


def _forward(s: dict, scale: dict, x: jax.Array, ln, mem: MLPMemory):
  """Rows x [N, r, d] through the plain memory at W = scale·S, every head at once: ``mem.forward``'s
  (y = x + LN(u), (x, z [N, r, E], h = gelu(z), n, 1/σ))."""
  batched = lambda name, w, a: product("nri,noi->nro", a, w, mem.matmul) * scale[name]
  return mem.forward(s, x, ln, matvec=batched)


class KeyPass(NamedTuple):
  """What a chunk's keys leave for its queries' reads, every head at once: the start state's read scales
  {layer: [N, 1, 1]}, the keys' errors e1 [N, c, d] and e2 [N, c, E] and hidden activations hk [N, c, E]."""

  scale: dict
  e1: jax.Array
  e2: jax.Array
  hk: jax.Array


def _keys(spec: MemorySpec, ln, s: dict, rows, v, delta, end_decay, end_coef, complete):
  """A chunk's keys through its start state s {w2: [N, E, d], w1: [N, d, E]}: (the closed state, ``KeyPass``,
  the plain reads y [N, r − c, d] of the rows after the c keys: the previous chunk's last query, if any)."""
  mem, ret, mode = spec.memory, spec.retention, spec.memory.matmul
  c = v.shape[1]
  scale = _read_scales(ret, s)
  y, (_, z, h, n, rstd) = _forward(s, scale, rows, ln, mem)
  k, hk = rows[:, :c], h[:, :c]
  e1 = layer_norm_backward(spec.bias.grad(y[:, :c], v, delta), n[:, :c], rstd[:, :c], ln[0])
  e2 = product("nco,noi->nci", e1, s["w1"], mode) * scale["w1"] * gelu_grad(z[:, :c])
  acts = spec.clip_errors({"w2": (k, e2), "w1": (hk, e1)})
  e2, e1 = acts["w2"][1], acts["w1"][1]
  # the chunk end: S = B_c ⊙ S₀ − Σ_i (η_i B_c / B_i) ⊙ e_i a_iᵀ, then the retention's chunk-end map; the gates
  # are zero (step) and one (decay) for a chunk that is not complete, so its state stays
  new = ret.close({"w2": along(end_decay, "in") * s["w2"] - product("nce,nci->nei", e2, k * end_coef, mode),
                   "w1": along(end_decay, "out") * s["w1"] - product("ncd,nce->nde", e1 * end_coef, hk, mode)})
  if ret.maps_chunk_end:  # elastic net's threshold
    new = {name: jnp.where(complete[:, None, None], new[name], s[name]) for name in s}
  return new, KeyPass(scale, e1, e2, hk), y[:, c:]


def read_u(spec: MemorySpec, s: dict, keys: KeyPass, rows, decay, w1_coef, scores_q, scale: dict) -> jax.Array:
  """A chunk's per-token reads before their LayerNorm, u [N, c, d], from its start state s and its keys'
  ``KeyPass``, in the dual form W_t = s₀ (decay_t ⊙ A₀ − Σ_i C[t, i] ⊙ e_i a_iᵀ), layer by layer; rows [N, c, d]
  are decay_t ⊙ q_t (W2's input); ``scale``: the read scales s₀ {layer: [N, 1, 1]} (the start state's,
  ``keys.scale``) or [N, c, 1] per row (:func:`_row_scales`)."""
  mode = spec.memory.matmul
  zq = product("nri,noi->nro", rows, s["w2"], mode) * scale["w2"]
  hq = gelu(zq - scale["w2"] * product("nts,nse->nte", scores_q, keys.e2, mode))
  scores_h = product("nte,nse->nts", hq, keys.hk, mode)
  if decay.shape[-1] == 1:
    mixed = product("nts,nsd->ntd", scores_h * w1_coef, keys.e1, mode)
  else:  # per-channel coefficients on W1's output axis, in float32 sub-blocks
    mixed = _channel_product(spec, channel_gates.Coefficients.mix, scores_h, keys.e1, w1_coef)
  return scale["w1"] * (decay * product("nte,nde->ntd", hq, s["w1"], mode) - mixed)


def _reads(spec: MemorySpec, ln, s: dict, keys: KeyPass, rows, q, decay, w1_coef, scores_q) -> jax.Array:
  """A chunk's per-token reads o [N, c, d] (:func:`read_u`, then the memory's LayerNorm and residual)."""
  return q + layer_norm(read_u(spec, s, keys, rows, decay, w1_coef, scores_q, keys.scale), ln, spec.memory.ln_eps)[0]


def _step(spec: MemorySpec, ln, s: dict, xs):
  """One chunk of every head, keys then reads: state -> (closed state, (o [N, c, d], ``_keys``' plain reads))."""
  key_xs, read_xs = xs
  new, keys, y = _keys(spec, ln, s, *key_xs)
  return new, (_reads(spec, ln, s, keys, *read_xs), y)


def _key_step(spec: MemorySpec, ln, s: dict, xs):
  """A chunk's keys alone: state -> (closed state, (start state, ``KeyPass``))."""
  new, keys, _ = _keys(spec, ln, s, *xs)
  return new, (s, keys)


def _split_reads(spec: MemorySpec, ln, xs):
  """A chunk's reads from its start state in the split path: (o [N, c, d], the plain read [N, 1, d] of the previous
  chunk's last query ``q_prev``, whose read is of this start state; None where ``q_prev`` is None)."""
  s, keys, q_prev, *read_xs = xs
  plain = None if q_prev is None else _forward(s, keys.scale, q_prev, ln, spec.memory)[0]
  return _reads(spec, ln, s, keys, *read_xs), plain


def _row_scales(spec: MemorySpec, scale: dict, end_state: dict, complete, chunk_size: int) -> dict:
  """Every chunk's read scales per row {layer: [n, N, c, 1]}: the start state's (``scale`` {layer: [n, N, 1, 1]}),
  but where a complete chunk's last token reads the closed state (``spec.reads_closed_state``; ``complete`` [n, N])
  and the retention has no chunk-end map, that read is the dual form's last row at the next start state's scales
  (the end state's for the last chunk)."""
  if not spec.reads_closed_state:
    return {name: jnp.broadcast_to(s, (*complete.shape, chunk_size, 1)) for name, s in scale.items()}
  last = (jnp.arange(chunk_size) == chunk_size - 1)[:, None] & complete[..., None, None]  # [n, N, c, 1]
  final = _read_scales(spec.retention, end_state)
  return {name: jnp.where(last, jnp.concatenate([s[1:], final[name][None]]), s) for name, s in scale.items()}


class ChunkInputs(NamedTuple):
  """What a chunk step needs besides the state, for every chunk and head ([n, b·h, ...], gates [.., g], g = 1 or d):
  q, k, v [n, N, c, d], δ [n, N, c]; ``decay`` [n, N, c, g] (B_t, or B_{t−1} for pre reads); ``w1_coef``: W1's
  step coefficients C[t, s] [n, N, c, c] (per-head gates) or the chunk's log-gates (channel gates, formed in the
  scan); ``scores_q`` [n, N, c, c]: the first layer's dual-form scores Σ_i q_ti k_si C[t, s, i]; ``end_decay``
  [n, N, g] and ``end_coef`` [n, N, c, g]: the chunk end's B_c and η_i B_c / B_i (1 and 0 for a chunk that is not
  complete); ``complete`` [n, N] bool; ``gates``: the chunk's (η, log α, log B, log P) [n, N, c, g] (for kernels
  that form the coefficients themselves)."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  delta: jax.Array
  decay: jax.Array
  w1_coef: jax.Array | tuple
  scores_q: jax.Array
  end_decay: jax.Array
  end_coef: jax.Array
  complete: jax.Array
  gates: tuple


def _chunk_batch(n: int, per_chunk_bytes: int, budget: int) -> int:
  """Chunks per batch for work mapped over the chunks outside the scan, so that its largest array takes at most
  ``budget`` bytes (one chunk if even that exceeds it)."""
  return max(1, min(n, budget // per_chunk_bytes))


def _channel_product(spec: MemorySpec, product, u, w, gates) -> jax.Array:
  """``channel_gates.Coefficients.scores`` or ``.mix`` of one chunk of every head: u, w [N, ...]; gates (η, log α,
  log B, log P) [N, c, d]."""
  coefficients = functools.partial(channel_gates.Coefficients.from_gates, post=spec.read == "post")
  return jax.vmap(lambda u, w, *g: product(coefficients(*g), u, w))(u, w, *gates[:3])


def _channel_scores(spec: MemorySpec, qc, kc, gate_chunks, budget: int) -> jax.Array:
  """The first layer's dual-form scores Σ_i q_ti k_si C[t, s, i] [n, N, c, c] with per-channel coefficients C,
  in float32 sub-blocks (:mod:`channel_gates`), a batch of chunks at a time and again in the backward."""
  n, heads, c, d = qc.shape
  scores = jax.checkpoint(lambda xs: _channel_product(spec, channel_gates.Coefficients.scores, *xs[:2], xs[2:]))
  per_chunk = 4 * heads * channel_gates.coefficient_elements(c, d)
  return jax.lax.map(scores, (qc, kc, *gate_chunks), batch_size=_chunk_batch(n, per_chunk, budget))


def chunk_inputs(spec: MemorySpec, q, k, v, gates: Gates, chunk_size: int, lengths,
                 batch_bytes: int = 1 << 30, keep_dtype: bool = False) -> ChunkInputs:
  """The state-independent part of every chunk step, for all chunks at once (before any scan); ``batch_bytes``
  bounds the per-channel coefficients held at once (``_channel_scores``); ``keep_dtype`` as
  :func:`chunked.chunk_sequence`'s."""
  b, t, h, d = q.shape
  x = chunk_sequence(q, k, v, gates, spec, chunk_size, lengths, keep_dtype)
  n = x.q.shape[0]
  heads = lambda a: a.reshape(n, b * h, *a.shape[3:])  # [n, b, h, ...] -> [n, b·h, ...]
  qc, kc = heads(x.q), heads(x.k)
  gate_chunks = tuple(heads(a) for a in (x.eta, x.log_alpha, x.log_b, x.log_p))  # [n, b·h, c, g]
  co = jax.vmap(jax.vmap(functools.partial(coefficients, spec)))(*gate_chunks)
  if gates.eta.shape[-1] == 1:
    scores_q = product("nbti,nbsi->nbts", qc, kc, spec.memory.matmul) * co["coef"][..., 0]
    w1_coef = co["coef"][..., 0]
  else:  # channel gates act on the query/key axis of W2 (co["coef"] is unused, so never computed)
    scores_q = _channel_scores(spec, qc, kc, gate_chunks, batch_bytes)
    w1_coef = gate_chunks  # W1's per-channel mixing is formed from the gates inside the scan
  complete = jnp.repeat(x.complete, h, axis=1)  # [n, b·h]
  return ChunkInputs(qc, kc, heads(x.v), heads(x.delta), co["decay"], w1_coef, scores_q,
                     jnp.where(complete[..., None], co["end_decay"], 1.0),
                     jnp.where(complete[..., None, None], co["end_coef"], 0.0), complete, gate_chunks)


def layer_norm_params(ln, b: int, h: int, d: int) -> tuple:
  """(γ, β) [h, d] (or None: the identity LayerNorm) per head of every batch row, [b·h, 1, d]."""
  ln = ln if ln is not None else (jnp.ones((h, d)), jnp.zeros((h, d)))
  return tuple(jnp.broadcast_to(p[None], (b, h, d)).reshape(b * h, 1, d) for p in ln)


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size", "remat", "matmul", "split", "key_scan",
                                             "chunk_reads", "batch_bytes", "keep_dtype"))
def miras_flat(q, k, v, gates: Gates, *, spec: MemorySpec, initial_state: dict, initial_momentum=None, ln=None,
               chunk_size: int = 64, lengths=None, remat: bool = False, matmul: str = "float32", split: bool = False,
               key_scan=None, chunk_reads=None, batch_bytes: int = 1 << 30, keep_dtype: bool = False):
  """The chunked Miras memory for the memories :func:`unsupported` accepts; arguments and returns as
  :func:`chunked.miras_chunked` (``initial_momentum`` must be None). ``split``: scan over the chunks' keys alone
  (the state's recurrence), then take every chunk's reads from its start state at once; ``remat`` recomputes both
  in the backward. ``key_scan`` (with ``split``): another implementation of that recurrence with its own backward,
  (spec, state, ln, xs) -> (closed state, (start states, ``KeyPass``es stacked over chunks)), e.g.
  ``pallas_tiles.KeyScan``; ``remat`` then applies to the reads. ``chunk_reads`` (with ``split``, per-head gates):
  another implementation of every chunk's :func:`read_u` at once with its own backward, (spec, start states,
  ``KeyPass``es, ``ChunkInputs``, read scales per row (:func:`_row_scales`), all stacked over chunks) ->
  u [n, b·h, c, d], e.g. ``pallas_reads.ChunkReads``, which also takes the chunks' last tokens' reads of the closed
  states (as the dual form's last rows, so the retention must have no chunk-end map). Work mapped over the chunks
  outside the scan (the split reads; with per-channel gates the first layer's scores) runs in batches of chunks
  whose largest float32 array stays under ``batch_bytes``. ``keep_dtype`` (with ``key_scan`` and ``chunk_reads``
  that take them so): the chunked q, k, v stay in their dtype (:func:`chunked.chunk_sequence`)."""
  if (why := unsupported(spec)) is not None:
    raise ValueError(f"the flat Miras path cannot run this memory: {why}")
  if (key_scan is not None or chunk_reads is not None) and not split:
    raise ValueError("key_scan and chunk_reads replace parts of the split path: they need split=True")
  if chunk_reads is not None and gates.eta.shape[-1] != 1:
    raise ValueError("chunk_reads covers per-head gates (eta [..., 1]) only")
  if chunk_reads is not None and spec.retention.maps_chunk_end:
    raise ValueError("chunk_reads reads the closed state as the dual form's last row: it needs a retention without "
                     f"a chunk-end map, not {type(spec.retention).__name__}")
  del initial_momentum
  spec = with_matmul(spec, matmul)
  b, t, h, d = q.shape
  if keep_dtype and (key_scan is None or chunk_reads is None):
    raise ValueError("keep_dtype is for a key_scan and chunk_reads that take q, k, v in their dtype: pass both")
  x = chunk_inputs(spec, q, k, v, gates, chunk_size, lengths, batch_bytes, keep_dtype)
  boundary = spec.reads_closed_state and chunk_reads is None  # chunk_reads read the closed state themselves
  # rows through W2 per chunk: keys and the previous chunk's last query (whose read is the closed state's), then
  # the queries scaled by their decay (W₀ decay_t q_t for channel gates on W2's input axis, decay_t W₀ q_t per head)
  q_prev = jnp.concatenate([jnp.zeros_like(x.q[:1, :, -1:]), x.q[:-1, :, -1:]]) if boundary else x.q[:, :, :0]
  query_rows = x.q * x.decay
  key_xs = (x.k, x.v, x.delta, x.end_decay, x.end_coef, x.complete)
  read_xs = (query_rows, x.q, x.decay, x.w1_coef, x.scores_q)
  ln = layer_norm_params(ln, b, h, d)
  state = {name: w.reshape(b * h, *w.shape[2:]) for name, w in initial_state.items()}
  remat_if = lambda f: jax.checkpoint(f) if remat else f
  if split:
    if key_scan is not None:
      state, (starts, keys) = key_scan(spec, state, ln, key_xs)
    else:
      state, (starts, keys) = jax.lax.scan(remat_if(functools.partial(_key_step, spec, ln)), state, key_xs)
    if chunk_reads is not None:
      scale = _row_scales(spec, keys.scale, state, x.complete, chunk_size)
      u = chunk_reads(spec, starts, keys, x, scale)
      o = x.q + layer_norm(u, ln, spec.memory.ln_eps)[0]
    else:
      n, heads, c, _ = x.q.shape  # the largest of a chunk's reads: [N, c, E] or per-channel coefficients
      channel = channel_gates.coefficient_elements(c, d) if x.decay.shape[-1] > 1 else 0
      per_chunk = 4 * heads * max(c * d * spec.memory.expansion, channel)
      batch = _chunk_batch(n, per_chunk, batch_bytes)
      o, reads = jax.lax.map(remat_if(functools.partial(_split_reads, spec, ln)),
                             (starts, keys, q_prev if boundary else None, *read_xs), batch_size=batch)
  else:  # the previous chunk's last query rides with the keys through the start state (one matmul)
    key_xs = (jnp.concatenate([x.k, q_prev], axis=2), *key_xs[1:])
    state, (o, reads) = jax.lax.scan(remat_if(functools.partial(_step, spec, ln)), state, (key_xs, read_xs))
  if boundary:  # the last query of chunk j reads the state closed by chunk j: row c of chunk j + 1, or after the scan
    last = _forward(state, _read_scales(spec.retention, state), x.q[-1, :, -1:], ln, spec.memory)[0]
    reads = jnp.concatenate([reads[1:, :, 0], last[:, 0][None]])
    o = o.at[:, :, -1].set(jnp.where(x.complete[..., None], reads, o[:, :, -1]))
  o = unchunk(o.reshape(-1, b, h, chunk_size, d), t)
  return o, {name: w.reshape(b, h, *w.shape[1:]) for name, w in state.items()}, None
