"""What every attention implementation receives and declares: one :class:`AttentionCall` and an
:class:`Implementation` (its name, what it cannot run, and how it attends).

``api.attention`` builds the call (heads bound to the pattern, the pattern simplified) and asks the
implementations in order; each one states its own limits beside its code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from layers.kernels.attention.patterns import Pattern


class AttentionCall(NamedTuple):
  """One exact-attention call. q [B, T, Hq, E], k [B, S, Hkv, E], v [B, S, Hkv, F] (Hkv divides Hq).

  Attributes:
    pattern: who sees whom (``patterns.Dense``, ``SinkWindow`` or ``BlockSparse``, heads bound).
    scale: logit scale, None for 1/sqrt(E).
    q_offset: absolute position of query 0 (chunked prefill).
    return_lse: the caller needs the logsumexp [B, T, Hq] (float32) as well.
    blocks: Pallas tile sizes (``pallas_gpu.BlockSizes``) or None for the pattern's defaults.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  pattern: Pattern
  scale: float | None
  q_offset: int
  return_lse: bool
  blocks: Any

  @property
  def aligned(self) -> bool:
    """Queries and keys are the same positions 0..T-1 (no prefill offset, T = S)."""
    return self.q_offset == 0 and self.q.shape[1] == self.k.shape[1]


class Implementation(NamedTuple):
  """An attention implementation: ``unsupported(call)`` says why it cannot run a call (None if it can);
  ``attend(call)`` returns (o [B, T, Hq, F] in q's dtype, lse [B, T, Hq] float32 or None when not asked for)."""

  name: str
  unsupported: Callable[[AttentionCall], str | None]
  attend: Callable[[AttentionCall], tuple[jax.Array, jax.Array | None]]


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"
