"""Gated delta rule in the chunkwise-parallel WY/UT form (training), in plain XLA around a small state scan.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464), chunked form after
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484). Per head and
chunk of C rows, γ = cumsum(g) in float32 (chunk-local), Γ_rs = exp(γ_r − γ_s) for r ≥ s else 0 (masked before
the exp, so no positive exponent is ever evaluated), S₀ = state entering the chunk:

    A = StrictLower(diag(β) (K Kᵀ ⊙ Γ));  T = (I + A)⁻¹
    W = T diag(β e^γ) K ;  U = T diag(β) V
    V_new = U − W S₀ ;  S_next = e^{γ_C} S₀ + (diag(e^{γ_C − γ}) K)ᵀ V_new
    O = scale · (diag(e^γ) Q S₀ + (Q Kᵀ ⊙ Γ ⊙ LowerInclDiag) V_new)

Everything except the V_new/S_next recurrence is independent across chunks: W and U come from :mod:`wy` (fused
per chunk on GPU, analytic backward), the output from batched matmuls over [b, h, n_chunks]; only the recurrence
is sequential (:mod:`state_scan`, with a hand-written backward). Sequences are right-padded to a multiple of C
with identity tokens (β = 0, g = 0, q = k = v = 0), which leave the state unchanged.

Packed sequences (several independent segments in one row, each starting at a chunk boundary) reset the state
entering chunk c+1 by scaling chunk c's contribution to it, S_{c+1} = r (d_c S_c + K̃_cᵀ V_new,c) with r ∈ {0, 1}:
the scan's inputs d_c and K̃_c are multiplied by r, so the kernels and their backward need nothing new.

Shapes: q, k [b, t, h, K]; v [b, t, h, V]; g, beta [b, t, h]; state float32 [b, h, K, V]. Matmul operands are in
the inputs' dtype (bf16 inputs -> bf16 operands, float32 accumulation); gates, cumsums, T and the state are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels.gated_delta import state_scan, wy
from layers.kernels.gated_delta.reference import resolve_scale, zero_state
from layers.kernels.gated_delta.tuning import Tuning

KERNEL_IMPLS = ("xla", "pallas_triton", "pallas_interpret")

SUPPORTED_CHUNK_SIZES = (16, 32, 64, 128)


def _dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """einsum with operands cast to ``dtype`` and float32 accumulation/result."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[b, t, h, ...] (t a multiple of chunk) -> [b, h, n, chunk, ...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _from_chunks(x: jax.Array) -> jax.Array:
  """[b, h, n, chunk, ...] -> [b, n·chunk, h, ...]."""
  b, h, n, c = x.shape[:4]
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, *x.shape[4:])


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "kernel_impl", "tuning"))
def gated_delta_rule_chunked(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None, chunk_size: int = 64,
    kernel_impl: str = "xla", chunk_resets: jax.Array | None = None, tuning: Tuning = Tuning(),
) -> tuple[jax.Array, jax.Array]:
  """Chunkwise-parallel gated delta rule; same contract as ``gated_delta_rule_reference``.

  Args:
    q, k: [b, t, h, K]; v: [b, t, h, V]; g (log-decay ≤ 0), beta: [b, t, h]; any t ≥ 1.
    scale: query scale (default K^-0.5).
    initial_state: float32 [b, h, K, V]; zeros if None.
    chunk_size: C, one of ``SUPPORTED_CHUNK_SIZES``.
    chunk_resets: bool [b, ceil(t / C)] or None: the state is zeroed before chunk c's first token (token c·C)
      where True, i.e. a new segment starts there (the reference's ``resets`` at multiples of C).
    kernel_impl: how the WY representation and the inter-chunk recurrence run: ``"xla"`` (batched einsums and
      ``lax.scan``), ``"pallas_triton"`` (fused GPU kernels) or ``"pallas_interpret"`` (those kernels in the
      Pallas interpreter, for CPU tests).
    tuning: Triton launch settings of the Pallas kernels (static).

  Returns:
    (o [b, t, h, V] in v's dtype, final state float32 [b, h, K, V]).
  """
  if chunk_size not in SUPPORTED_CHUNK_SIZES:
    raise ValueError(f"chunk_size must be one of {SUPPORTED_CHUNK_SIZES}, got {chunk_size}")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = resolve_scale(scale, dk)
  dtype = jnp.promote_types(q.dtype, v.dtype)
  s0 = zero_state(b, h, dk, dv) if initial_state is None else initial_state.astype(jnp.float32)

  pad = -t % chunk_size
  if pad:  # identity tokens: β = 0, g = 0, q = k = v = 0
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    q, k, v, g, beta = (jnp.pad(x, widths(x)) for x in (q, k, v, g, beta))
  qc, kc, vc = (_to_chunks(x, chunk_size) for x in (q, k, v))
  gc, bc = (_to_chunks(x.astype(jnp.float32), chunk_size) for x in (g, beta))  # [b, h, n, c]

  gamma = jnp.cumsum(gc, axis=-1)
  decay_mat = wy.decay_matrix(gamma)  # Γ with its diagonal, [b, h, n, c, c]
  w, u = wy.wy_representation(kc.astype(dtype), vc.astype(dtype), bc, gamma, impl=kernel_impl, tuning=tuning)
  kd = kc * jnp.exp(gamma[..., -1:] - gamma)[..., None]
  decay = jnp.exp(gamma[..., -1])  # [b, h, n]
  if chunk_resets is not None:  # keep[c] = 0 where chunk c+1 starts a segment
    if chunk_resets.shape != decay.shape[::2]:
      raise ValueError(f"chunk_resets must be [b, n_chunks] = {decay.shape[::2]}, got {chunk_resets.shape}")
    s0 = jnp.where(chunk_resets[:, 0, None, None, None], 0.0, s0)
    keep = jnp.concatenate([~chunk_resets[:, 1:], jnp.ones_like(chunk_resets[:, :1])], axis=1)
    keep = keep[:, None, :].astype(jnp.float32)  # [b, 1, n]
    kd, decay = kd * keep[..., None, None], decay * keep

  states, v_new, final = state_scan.state_scan(w, u, kd.astype(dtype), decay, s0, impl=kernel_impl, tuning=tuning)

  qk = _dot("bhncd,bhnsd->bhncs", qc, kc, dtype) * decay_mat
  o_inter = _dot("bhncd,bhndv->bhncv", qc * jnp.exp(gamma)[..., None], states, dtype)
  o_intra = _dot("bhncs,bhnsv->bhncv", qk, v_new, dtype)
  o = _from_chunks(scale * (o_inter + o_intra))[:, :t]
  return o.astype(v.dtype), final
