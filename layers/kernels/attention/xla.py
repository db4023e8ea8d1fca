"""XLA's dense attention, ``jax.nn.dot_product_attention(implementation="xla")``, for short sequences.

It materialises the [B, H, T, S] logits, so it runs only up to :data:`MAX_LOGITS` logits per head (2048² — 16 MiB
per head in float32); there, on CPU especially, one fused softmax beats the tile loop of the blockwise path. Like
MaxText's ``autoselected`` kernel, the automatic order picks it for dense causal and plain sliding-window layers
at short T, and leaves longer sequences to the blockwise and Pallas paths.
"""

from __future__ import annotations

import jax

from layers.kernels.attention.call import AttentionCall, Implementation
from layers.kernels.attention.patterns import Dense, SinkWindow

MAX_LOGITS = 2048 * 2048


def unsupported(c: AttentionCall) -> str | None:
  if c.return_lse:
    return "returns no logsumexp"
  if not c.aligned:
    return "needs T = S and q_offset = 0"
  if not (isinstance(c.pattern, Dense) or (isinstance(c.pattern, SinkWindow) and c.pattern.sink == 0)):
    return "expresses dense and sink-free window patterns only"
  if c.q.shape[1] * c.k.shape[1] > MAX_LOGITS:
    return f"materialises T·S logits per head; T·S = {c.q.shape[1] * c.k.shape[1]} exceeds {MAX_LOGITS}"
  return None


def jax_nn_attention(c: AttentionCall, implementation: str) -> jax.Array:
  """``jax.nn.dot_product_attention`` for a Dense or sink-free SinkWindow call (a window is always causal)."""
  if isinstance(c.pattern, SinkWindow):
    return jax.nn.dot_product_attention(c.q, c.k, c.v, scale=c.scale, is_causal=True,
                                        local_window_size=(c.pattern.window - 1, 0), implementation=implementation)
  return jax.nn.dot_product_attention(c.q, c.k, c.v, scale=c.scale, is_causal=c.pattern.causal,
                                      implementation=implementation)


IMPLEMENTATION = Implementation("xla", unsupported, lambda c: (jax_nn_attention(c, "xla"), None))
