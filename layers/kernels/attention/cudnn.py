"""cuDNN's fused flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/f16).

It expresses dense, causal and causal-left-window patterns; sink tokens are added exactly by merging a small sink
pass into the window pass (``cudnn_sink_window.py``). A left window always goes with ``is_causal=True``: cuDNN with
``(L, 0)`` and ``is_causal=False`` silently attends to the future (jax issue #39576).
"""

from __future__ import annotations

import jax.numpy as jnp

from layers.kernels import jax_compat
from layers.kernels.attention import cudnn_sink_window, xla
from layers.kernels.attention.call import AttentionCall, Implementation, on_gpu
from layers.kernels.attention.patterns import BlockSparse, SinkWindow


def unsupported(c: AttentionCall) -> str | None:
  if not on_gpu():
    return "needs a GPU backend"
  if c.return_lse:
    return "returns no differentiable logsumexp"
  if c.q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"needs bfloat16/float16 inputs (got {c.q.dtype})"
  e, f = c.q.shape[-1], c.v.shape[-1]
  if e % 8 or e > 256 or e != f:
    return f"needs equal q/v head dims, a multiple of 8 and <= 256 (got {e}, {f})"
  if not c.aligned:
    return "needs T = S and q_offset = 0"
  if isinstance(c.pattern, BlockSparse):
    return "cannot express strided blocks without a dense mask"
  if isinstance(c.pattern, SinkWindow) and c.pattern.sink > 0:
    return jax_compat.cudnn_attention_problem()
  return None


def attend(c: AttentionCall):
  if isinstance(c.pattern, SinkWindow) and c.pattern.sink > 0:
    return cudnn_sink_window.sink_window_attention(c.q, c.k, c.v, c.pattern, scale=c.scale), None
  return xla.jax_nn_attention(c, "cudnn"), None


IMPLEMENTATION = Implementation("cudnn", unsupported, attend)
