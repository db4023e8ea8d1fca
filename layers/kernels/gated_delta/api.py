"""Public entry points of the gated delta rule: ``gated_delta_rule`` (whole sequences) and ``gated_delta_step``.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464). Semantics and shapes are
those of :mod:`reference`: q, k [b, t, h, K]; v [b, t, h, V]; g (log-decay ≤ 0), beta [b, t, h]; state float32
[b, h, K, V]; returns (o [b, t, h, V], final state).

``implementation`` picks how the sequence is processed:
  * ``"pallas_triton"``: chunked WY form with the per-chunk WY representation and the inter-chunk recurrence as
    Pallas-Triton kernels (GPU only; K, V and chunk_size powers of two ≥ 16);
  * ``"xla_chunked"``: the same chunked form with the recurrence as ``lax.scan`` (any backend, any shape);
  * ``"reference"``: the token-by-token scan.
``None`` takes the first that applies, in that order (on a GPU, missing the Pallas path is logged once). An
explicitly requested implementation that cannot run on this backend/shape raises a ValueError saying why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.kernels.fallback import slower_fallback
from layers.kernels.gated_delta import chunked, reference
from layers.kernels.gated_delta.chunked import SUPPORTED_CHUNK_SIZES
from layers.kernels.gated_delta.tuning import Tuning

IMPLEMENTATIONS = ("pallas_triton", "xla_chunked", "reference")

gated_delta_step = reference.recurrent_step


def _unsupported(implementation: str, q: jax.Array, v: jax.Array, chunk_size: int) -> str | None:
  """Why ``implementation`` cannot run here, or None if it can."""
  if implementation == "pallas_triton":
    if jax.default_backend() != "gpu":
      return f"needs a GPU backend, this one is {jax.default_backend()!r}"
    from layers.kernels.gated_delta import (
      pallas_triton,  # imported lazily: GPU-only module
    )
    try:
      pallas_triton.check_shapes(chunk_size, q.shape[-1], v.shape[-1])
    except ValueError as e:
      return str(e)
  if implementation in ("pallas_triton", "xla_chunked") and chunk_size not in SUPPORTED_CHUNK_SIZES:
    return f"chunk_size must be one of {SUPPORTED_CHUNK_SIZES}, got {chunk_size}"
  return None


def gated_delta_rule(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None, chunk_size: int = 64,
    implementation: str | None = None, chunk_resets: jax.Array | None = None, tuning: Tuning | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Gated delta rule over a whole sequence, from ``initial_state`` (zeros if None).

  Args:
    q, k: [b, t, h, K] (normally L2-normalised per head); v: [b, t, h, V]; g: log-decay ≤ 0 [b, t, h];
      beta: [b, t, h] in [0, 1].
    scale: query scale (default K^-0.5).
    initial_state: float32 [b, h, K, V] or None.
    chunk_size: chunk length of the chunked implementations.
    implementation: one of ``IMPLEMENTATIONS`` or None (first applicable).
    chunk_resets: bool [b, ceil(t / chunk_size)] or None: packed segments; the state is zeroed before token
      c·chunk_size where ``chunk_resets[:, c]`` (every implementation, the reference included).
    tuning: Triton launch settings of ``pallas_triton`` (a static, hashable value; None for the defaults).

  Returns:
    (o [b, t, h, V] in v's dtype, final state float32 [b, h, K, V]).
  """
  if implementation is None:
    skipped = {i: _unsupported(i, q, v, chunk_size) for i in IMPLEMENTATIONS}
    implementation = next(i for i in IMPLEMENTATIONS if skipped[i] is None)
    if implementation != IMPLEMENTATIONS[0] and jax.default_backend() == "gpu":
      slower_fallback("gated delta rule", implementation, f"pallas_triton {skipped['pallas_triton']}")
  elif implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  elif (why := _unsupported(implementation, q, v, chunk_size)) is not None:
    raise ValueError(f"gated delta rule implementation {implementation!r} cannot run: {why}")
  if implementation == "reference":
    resets = None
    if chunk_resets is not None:  # token c·C resets where chunk c does
      t = q.shape[1]
      resets = jnp.zeros((q.shape[0], t), bool).at[:, ::chunk_size].set(chunk_resets[:, :-(-t // chunk_size)])
    return reference.gated_delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                                resets=resets)
  kernel_impl = "pallas_triton" if implementation == "pallas_triton" else "xla"
  return chunked.gated_delta_rule_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                          chunk_size=chunk_size, kernel_impl=kernel_impl, chunk_resets=chunk_resets,
                                          tuning=tuning or Tuning())
