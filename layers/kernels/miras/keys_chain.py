"""Miras MLP memories: the keys' backward cut into its chain and what does not depend on it.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4), the pull-back of :mod:`pallas_tiles`' keys'
recurrence S_{j+1} = f_j(S_j). Of each chunk's pull-back only a few products take the end state's cotangent G
(W2 [E, d], W1 [d, E] per head); everything else (the keys' forward through the start state, GELU's slopes, the row
step's linearisation, the input cotangents that G's chain leaves behind) is the same for every G. So the backward is
three passes:

  * :func:`chain_inputs`, all chunks at once (batched XLA): −K ⊙ c and −e1 ⊙ c, and the row step's linearisation
    (:func:`row_terms`); z = s₂ K W2ᵀ and h = gelu(z) are the forward's (bf16 from the Mosaic kernel);
  * the chain, chunk by chunk in reverse (:func:`chain_scan`), per chunk and head

      ĝ_e2 = g_e2 + (−K ⊙ c) G2ᵀ                  g_e1 = g_e1' + s₁ (ĝ_e2 ⊙ gelu'(z)) W1ᵀ − c ⊙ (h G1ᵀ)
      g_u = J_rowᵀ g_e1 (:func:`row_pullback`)    g_h = g_h' − (e1 ⊙ c) G1 + s₁ g_u W1
      g_z = ĝ_e2 ⊙ curvature + g_h ⊙ gelu'(z)     G2 ← B G2 + s₂ g_zᵀ K + g_S2',  G1 ← B G1 + s₁ e1ᵀ (ĝ_e2 ⊙ gelu'(z))
                                                                                     + s₁ g_uᵀ h + g_S1'

    with (') the reads' cotangents, the slope gelu'(z) and the curvature s₁ (e1 W1) ⊙ gelu''(z) formed in the
    step from z (one product more a chunk, where a batched pass would move both through memory), and Moneta's read
    scales' share added to G from two sums the updates give (Σ ΔG2 ⊙ W2 / s₂ is Σ g_z ⊙ K W2ᵀ, Σ ΔG1 ⊙ W1 / s₁ is
    s₁'s), so the chain holds no [c, E] array but z;
  * :func:`chain_outputs`, all chunks at once: the row step's vjp in K, V and the LayerNorm from each chunk's g_e1
    (:func:`row_inputs_pullback`, in closed form at the linearisation), K's share through z (s₂ g_z W2), K ⊙ c's
    (−e2 G2 from each chunk's end-state cotangent), the coefficients' and the decays' cotangents.

Shapes and returns as :func:`mosaic_keys.keys_backward`; per-head gates (the decay's cotangent is one number a
layer). :func:`chain_scan` is the chain as an XLA scan, the reference of :mod:`mosaic_chain`'s kernel;
:func:`chunk_terms` and :func:`chain_outputs` the references of :mod:`pallas_chain_inputs`' and
:mod:`pallas_chain_outputs`' kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.miras.memory import gelu_grad, gelu_grad2, layer_norm, plain_matmul, row_mean
from layers.miras.spec import MemorySpec

F32 = jnp.float32


class RowTerms(NamedTuple):
  """The row step e1(u) = rstd · P_n(a) linearised at a chunk's u (:func:`row_terms`), [.., c, d] each but the two
  row scalars [.., c]: n the normalised u, a = γ ⊙ ∂ℓ/∂y, ê = P_n(a) (e1 / rstd), D = γ² ⊙ ∂²ℓ/∂y², rstd = 1/σ and
  mean(n ⊙ a), where P_n(x) = x − mean(x) − n mean(n ⊙ x) (the LayerNorm backward's projection)."""

  n: jax.Array
  a: jax.Array
  ehat: jax.Array
  curve: jax.Array
  rstd: jax.Array
  na: jax.Array


def _row_means(*xs) -> list:
  return [row_mean(x) for x in xs]


def row_terms(spec: MemorySpec, u, k, v, delta, gamma, beta) -> RowTerms:
  """:class:`RowTerms` of one chunk's rows (u, K, V [c, d]; γ, β [1, d]) for a bias whose gradient is element-wise
  (its Hessian in y is diagonal: the biases without δ)."""
  yn, n, rstd = layer_norm(u, (gamma, beta), spec.memory.ln_eps)
  y = k + yn
  g, g_slope = jax.jvp(lambda y: spec.bias.grad(y, v, delta), (y,), (jnp.ones_like(y),))
  a = gamma * g
  a_mean, na = _row_means(a, a * n)
  return RowTerms(n, a, a - a_mean - n * na, gamma * gamma * g_slope, rstd[..., 0], na[..., 0])


def row_pullback(terms: RowTerms, w: jax.Array, means=_row_means, row=lambda x: x[..., None]) -> jax.Array:
  """The row step's vjp at :func:`row_terms`' point: ∂e1/∂uᵀ w for the keys' errors' cotangent w [.., c, d]
  (``means``: the row means of several arrays at once, broadcast against them; ``row``: a [.., c] vector broadcast
  against w; a kernel that holds blocks of columns passes its exchange of partial sums). With P = P_n:

    de1 = −rstd² mean(n ⊙ du) ê − rstd (dn mean(n ⊙ a) + n mean(a ⊙ dn)) + rstd P (D ⊙ dn),  dn = rstd P du,

  so ∂e1/∂uᵀ w = rstd² [P(y) − mean(w ⊙ ê) n] with y = −mean(n ⊙ a) w − mean(w ⊙ n) a + D ⊙ P(w)."""
  wn, w_mean, we = means(w * terms.n, w, w * terms.ehat)
  y = -row(terms.na) * w - wn * terms.a + terms.curve * (w - w_mean - terms.n * wn)
  y_mean, yn = means(y, y * terms.n)
  return row(terms.rstd * terms.rstd) * (y - y_mean - terms.n * (yn + we))


def row_inputs_pullback(spec: MemorySpec, terms: RowTerms, k, v, delta, gamma, beta, w) -> tuple:
  """The row step's vjp in its other inputs at :func:`row_terms`' point (u's share is :func:`row_pullback`'s), from
  e1's cotangent w [c, d]: with q = rstd P_n(w) the cotangent of a = γ ⊙ g, g = ∂ℓ/∂y (y, v) and y = K + n γ + β,

    ȳ = ∂g/∂yᵀ (γ ⊙ q),  V̄ = ∂g/∂vᵀ (γ ⊙ q),  K̄ = ȳ,  β̄ = Σ_rows ȳ,  γ̄ = Σ_rows (g ⊙ q + n ⊙ ȳ).

  One round of row means and the bias' gradient once, where ``jax.vjp`` of the row step redoes the LayerNorm and
  pulls back through it and P_n. Returns (K̄, V̄ [c, d], γ̄, β̄ [1, d])."""
  w_mean, wn = _row_means(w, w * terms.n)
  q = terms.rstd[..., None] * (w - w_mean - terms.n * wn)
  g, pullback = jax.vjp(lambda y, v: spec.bias.grad(y, v, delta), k + terms.n * gamma + beta, v)
  g_y, g_v = pullback(gamma * q)
  rows_sum = lambda x: jnp.sum(x, axis=-2, keepdims=True)
  return g_y, g_v, rows_sum(g * q + terms.n * g_y), rows_sum(g_y)


class ChainInputs(NamedTuple):
  """What the chain reads of each chunk, stacked [n, N, ...] (n chunks, N heads), each in the dtype it comes in
  (bf16 start states, e2 and cotangents from ``pallas_mosaic_bf16``'s forward and reads): the start state (W2 [E, d],
  W1 [d, E]), K, e1, −K ⊙ c and −e1 ⊙ c [c, d], the coefficients c [c], h, e2 and z = s₂ K W2ᵀ [c, E], the row
  step's :class:`RowTerms`, the scales (s₂, s₁) and summed scale terms [2],
  the chunk-end decay [], and the reads' cotangents: of e2 and h [c, E], of e1 [c, d], of the start state, and of the
  scales [2]."""

  w2: jax.Array
  w1: jax.Array
  k: jax.Array
  e1: jax.Array
  nkc: jax.Array
  ne1c: jax.Array
  coef: jax.Array
  h: jax.Array
  e2: jax.Array
  z: jax.Array
  rows: RowTerms
  scales: jax.Array
  totals: jax.Array
  decay: jax.Array
  g_e2: jax.Array
  g_h: jax.Array
  g_e1: jax.Array
  g_w2: jax.Array
  g_w1: jax.Array
  g_scales: jax.Array


def _per_chunk_and_head(fun):
  return jax.vmap(jax.vmap(fun))


def _every_chunk(ln, n: int) -> tuple:
  """The LayerNorm's (γ, β) [N, 1, d] repeated for n chunks, [n, N, 1, d] each."""
  return tuple(jnp.broadcast_to(x[None], (n, *x.shape)) for x in ln)


def chunk_terms(spec: MemorySpec, residuals) -> tuple:
  """What :func:`chain_inputs` forms rather than passes on, every chunk at once: −K ⊙ c, −e1 ⊙ c [n, N, c, d] and
  the rows' :class:`RowTerms` (stacked [n, N, ...])."""
  ln, xs, _, keys, u, *_ = residuals
  k, v, delta, _, end_coef, _ = xs
  rows = _per_chunk_and_head(functools.partial(row_terms, spec))(u, k, v, delta, *_every_chunk(ln, k.shape[0]))
  return -k * end_coef, -keys.e1 * end_coef, rows


def chain_inputs(spec: MemorySpec, residuals, cotangents, *, terms=chunk_terms) -> ChainInputs:
  """:class:`ChainInputs` from ``pallas_tiles``' recurrence's residuals and cotangents (as
  :func:`mosaic_keys.keys_backward` takes them), every chunk at once (``terms``: :func:`chunk_terms` or a kernel
  taking the same arguments and returning the same, in its own dtypes)."""
  nkc, ne1c, rows = terms(spec, residuals)
  _, xs, starts, keys, _, scales, totals, z = residuals
  _, (g_starts, g_keys) = cotangents
  k, _, _, end_decay, end_coef, _ = xs
  g_scales = jnp.stack([g_keys.scale["w2"][..., 0, 0], g_keys.scale["w1"][..., 0, 0]], axis=-1)
  return ChainInputs(starts["w2"], starts["w1"], k, keys.e1, nkc, ne1c, end_coef[..., 0], keys.hk, keys.e2, z, rows,
                     scales, totals, end_decay[..., 0], g_keys.e2, g_keys.hk, g_keys.e1, g_starts["w2"],
                     g_starts["w1"], g_scales)


class ChainOutputs(NamedTuple):
  """What the chain leaves of each chunk for :func:`chain_outputs` [n, N, ...]: e1's cotangent g_e1 and h G1ᵀ's,
  −h G1ᵀ [c, d], the end state's W2 cotangent G2 [E, d] (K ⊙ c's is −e2 G2; bf16 from the kernel, the operand its
  products take), z's [c, E] and the chunk-end decay's on each layer, Σ G ⊙ W [2]."""

  g_e1: jax.Array
  via_end: jax.Array
  g2_end: jax.Array
  g_z: jax.Array
  g_decay: jax.Array


def scale_terms_share(ret, w: jax.Array, g_total: jax.Array) -> jax.Array:
  """The read scales' share of a state block's cotangent, ∂(Σ scale_terms)/∂w · g_total (float32 even from a bf16
  block)."""
  return jax.vjp(ret.scale_terms, w.astype(jnp.promote_types(w.dtype, F32)))[1](g_total)[0]


def scales_share(spec: MemorySpec, w: jax.Array, total: jax.Array, g_scale: jax.Array) -> jax.Array:
  """The read scale's share of a layer's state cotangent: ∂s/∂w · g_scale with s = scale_from(Σ scale_terms(w)) at
  the forward's summed terms ``total`` (one head: w a layer's state, total and g_scale numbers)."""
  g_total = jax.vjp(spec.retention.scale_from, total)[1](g_scale)[0]
  return scale_terms_share(spec.retention, w, g_total)


def chain_step(spec: MemorySpec, g_state, x: ChainInputs):
  """One chunk of the chain, every head: the end state's cotangent (G2 [N, E, d], G1 [N, d, E]) to the start
  state's, and the chunk's :class:`ChainOutputs`."""
  g2, g1 = g_state
  dot = functools.partial(plain_matmul, mode=spec.memory.matmul)
  s2, s1 = x.scales[:, 0, None, None], x.scales[:, 1, None, None]
  ge2 = x.g_e2 + dot("hcd,hed->hce", x.nkc, g2)
  z = x.z.astype(jnp.promote_types(x.z.dtype, F32))
  slope = gelu_grad(z)
  gs = s1 * ge2 * slope
  via_end = -dot("hce,hde->hcd", x.h, g1)
  g_e1 = x.g_e1 + dot("hce,hde->hcd", gs, x.w1) + x.coef[..., None] * via_end
  gu = s1 * row_pullback(x.rows, g_e1)
  g_h = x.g_h + dot("hcd,hde->hce", x.ne1c, g1) + dot("hcd,hde->hce", gu, x.w1)
  g_z = ge2 * s1 * dot("hcd,hde->hce", x.e1, x.w1) * gelu_grad2(z) + g_h * slope
  step2 = s2 * dot("hce,hcd->hed", g_z, x.k)
  step1 = dot("hcd,hce->hde", x.e1, gs) + dot("hcd,hce->hde", gu, x.h)
  total = lambda a: jnp.sum(a, axis=(1, 2))
  g_decay = jnp.stack([total(g2 * x.w2), total(g1 * x.w1)], axis=-1)
  b = x.decay[:, None, None]
  g2, g1 = b * g2 + step2 + x.g_w2, b * g1 + step1 + x.g_w1
  if spec.retention.scaled:  # s₂'s cotangent Σ g_z ⊙ K W2ᵀ, s₁'s Σ (ĝ_e2 ⊙ gelu'(z)) ⊙ e1 W1 + Σ g_u ⊙ u / s₁
    g_s2 = total(step2 * x.w2) / s2[:, 0, 0] + x.g_scales[:, 0]
    g_s1 = total(step1 * x.w1) / s1[:, 0, 0] + x.g_scales[:, 1]
    share = jax.vmap(functools.partial(scales_share, spec))
    g2 = g2 + share(x.w2, x.totals[:, 0], g_s2)
    g1 = g1 + share(x.w1, x.totals[:, 1], g_s1)
  return (g2, g1), ChainOutputs(g_e1, via_end, g_state[0], g_z, g_decay)


def chain_scan(spec: MemorySpec, inputs: ChainInputs, g_end: dict):
  """The chain as an XLA scan over the chunks in reverse: (the initial state's cotangent {w2, w1}, the stacked
  :class:`ChainOutputs`)."""
  (g2, g1), outputs = jax.lax.scan(functools.partial(chain_step, spec), (g_end["w2"], g_end["w1"]), inputs,
                                   reverse=True)
  return {"w2": g2, "w1": g1}, outputs


def chain_outputs(spec: MemorySpec, residuals, inputs: ChainInputs, outputs: ChainOutputs):
  """The chunk inputs' and the LayerNorm's cotangents from the chain's outputs, every chunk at once: (the
  LayerNorm's (γ, β) [N, 1, d] each, the factors' {k, v, coef, kc [n, N, c, d], decay [n, N, 2]})."""
  ln, xs, *_ = residuals
  k, v, delta, *_ = xs
  g_k, g_v, g_gamma, g_beta = _per_chunk_and_head(functools.partial(row_inputs_pullback, spec))(
      inputs.rows, k, v, delta, *_every_chunk(ln, k.shape[0]), outputs.g_e1)
  dot = functools.partial(plain_matmul, mode=spec.memory.matmul)
  g_kz = inputs.scales[..., 0, None, None] * dot("nhce,nhed->nhcd", outputs.g_z, inputs.w2)
  factors = {"k": g_k + g_kz, "v": g_v, "coef": inputs.e1 * outputs.via_end,
             "kc": -dot("nhce,nhed->nhcd", inputs.e2, outputs.g2_end), "decay": outputs.g_decay}
  return (jnp.sum(g_gamma, axis=0), jnp.sum(g_beta, axis=0)), factors


def keys_backward(spec: MemorySpec, residuals, cotangents, *, inputs_pass=chain_inputs, chain=chain_scan,
                  outputs_pass=chain_outputs):
  """The keys' backward in three passes (``inputs_pass``: :func:`chain_inputs` or a kernel taking the same
  arguments; ``chain``: :func:`chain_scan` or a kernel taking the same arguments; ``outputs_pass``:
  :func:`chain_outputs` or a kernel taking the same arguments). Arguments and returns as
  :func:`mosaic_keys.keys_backward`."""
  inputs = inputs_pass(spec, residuals, cotangents)
  g_state, outputs = chain(spec, inputs, cotangents[0])
  g_ln, factors = outputs_pass(spec, residuals, inputs, outputs)
  return g_state, g_ln, factors
