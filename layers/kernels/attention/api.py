"""One entry point for exact (dense or sparse) attention with an ordered choice of implementation.

``attention(q, k, v, pattern=..., implementation=None)`` tries, in order:

1. ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on GPU for patterns cuDNN expresses
   (dense, causal, left window), bf16/f16. A left window always goes with ``is_causal=True``: cuDNN with
   ``(L, 0)`` and ``is_causal=False`` silently attends to the future (jax issue #39576). Sink tokens are added
   exactly by merging a small sink pass into the cuDNN window pass (``cudnn_sink_window.py``).
2. ``"pallas_gpu"``: the block-sparse Pallas kernel (``pallas_gpu.py``) on GPU: sinks, strided blocks, per-head
   patterns; sequences are padded to its tile.
3. ``"blockwise"``: XLA ``lax.scan`` over visible tiles (``blockwise.py``), any backend, memory linear in N.
4. ``"reference"``: the C4 einsum cascade with a dense mask (``reference.py``), O(T·S) memory.

An explicitly requested implementation that cannot run raises ``ValueError`` saying why; the automatic order skips
it (and warns when it has to end at the reference). Shapes as ``jax.nn.dot_product_attention``:
q [B, T, Hq, E], k [B, S, Hkv, E], v [B, S, Hkv, F] -> o [B, T, Hq, F] (+ lse [B, T, Hq] float32 with
``return_lse``; cuDNN does not return a differentiable lse, so ``return_lse`` skips it).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from layers.kernels.attention import blockwise, cudnn_sink_window, pallas_gpu
from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow
from layers.kernels.attention.reference import attention_reference

IMPLEMENTATIONS = ("cudnn", "pallas_gpu", "blockwise", "reference")


def bind_heads(pattern: Pattern, num_q_heads: int, num_kv_heads: int) -> Pattern:
  """The pattern evaluated for these head counts (BlockSparse's default step and dense heads depend on them)."""
  if isinstance(pattern, BlockSparse):
    if pattern.num_dense_heads > num_kv_heads:
      raise ValueError(f"BlockSparse.num_dense_heads ({pattern.num_dense_heads}) exceeds the KV heads "
                       f"({num_kv_heads})")
    return dataclasses.replace(pattern, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
  return pattern


def simplify(pattern: Pattern, num_positions: int) -> Pattern:
  """An equivalent simpler pattern: a window spanning all ``num_positions`` query positions is plain causal."""
  if isinstance(pattern, SinkWindow) and pattern.window >= num_positions:
    return Dense(causal=True)
  return pattern


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _cudnn_problem(q, k, v, pattern, q_offset, return_lse):
  if not _on_gpu():
    return "needs a GPU backend"
  if return_lse:
    return "returns no differentiable logsumexp"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"needs bfloat16/float16 inputs (got {q.dtype})"
  if q.shape[-1] % 8 or q.shape[-1] > 256 or q.shape[-1] != v.shape[-1]:
    return f"needs equal q/v head dims, a multiple of 8 and <= 256 (got {q.shape[-1]}, {v.shape[-1]})"
  if q_offset != 0 or q.shape[1] != k.shape[1]:
    return "needs T = S and q_offset = 0"
  if isinstance(pattern, BlockSparse):
    return "cannot express strided blocks without a dense mask"
  if isinstance(pattern, SinkWindow) and pattern.sink > 0:
    return cudnn_sink_window.cudnn_problem()
  return None


def _cudnn(q, k, v, pattern, scale):
  if isinstance(pattern, SinkWindow) and pattern.sink > 0:
    return cudnn_sink_window.sink_window_attention(q, k, v, pattern, scale=scale)
  if isinstance(pattern, SinkWindow):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=(pattern.window - 1, 0), implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=pattern.causal, implementation="cudnn")


def _pallas_problem(q, k, v, pattern, q_offset, blocks):
  if not _on_gpu():
    return "needs a GPU backend (CPU tests call pallas_gpu.pallas_attention(..., interpret=True))"
  if q_offset != 0 or q.shape[1] != k.shape[1]:
    return "needs T = S and q_offset = 0"
  return pallas_gpu.check_supported(q, k, v, pattern, blocks)


def _pallas(q, k, v, pattern, scale, blocks):
  n = q.shape[1]
  padded = -(-n // blocks.max_tile) * blocks.max_tile
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
  o, lse = pallas_gpu.pallas_attention(pad(q), pad(k), pad(v), pattern, scale=scale, kv_length=n, blocks=blocks)
  return o[:, :n], lse[:, :n]


def _blockwise_problem(pattern):
  return None if isinstance(pattern, (Dense, SinkWindow, BlockSparse)) else f"unknown pattern {pattern!r}"


def attention(q, k, v, *, pattern: Pattern = Dense(causal=True), scale: float | None = None, q_offset: int = 0,
              implementation: str | None = None, return_lse: bool = False,
              blocks: pallas_gpu.BlockSizes | None = None):
  """Exact attention of queries at absolute positions q_offset + [0, T) over keys [0, S) under ``pattern``.

  Args:
    q, k, v: [B, T, Hq, E], [B, S, Hkv, E], [B, S, Hkv, F]; Hkv divides Hq (GQA).
    pattern: ``Dense(causal)``, ``SinkWindow(sink, window)`` or ``BlockSparse(...)`` (heads bound from shapes).
    scale: logit scale, default 1/sqrt(E).
    q_offset: absolute position of query 0 (chunked prefill); patterns use absolute positions.
    implementation: one of ``IMPLEMENTATIONS`` or None for the first that supports the call.
    return_lse: also return the natural-log logsumexp [B, T, Hq] (float32; -inf on rows with no visible key).
    blocks: Pallas tile sizes (default ``BlockSizes.for_pattern``).

  Returns:
    o [B, T, Hq, F] in q's dtype, or (o, lse) with ``return_lse``.
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS} (got {implementation!r})")
  pattern = simplify(bind_heads(pattern, q.shape[2], k.shape[2]), q_offset + q.shape[1])
  blocks = blocks or pallas_gpu.BlockSizes.for_pattern(pattern)
  problems = {
      "cudnn": lambda: _cudnn_problem(q, k, v, pattern, q_offset, return_lse),
      "pallas_gpu": lambda: _pallas_problem(q, k, v, pattern, q_offset, blocks),
      "blockwise": lambda: _blockwise_problem(pattern),
      "reference": lambda: None,
  }
  if implementation is None:
    skipped = {name: problems[name]() for name in IMPLEMENTATIONS}
    implementation = next(name for name in IMPLEMENTATIONS if skipped[name] is None)
    if implementation == "reference":
      warnings.warn(f"attention falls back to the O(T·S) reference: {skipped}", stacklevel=2)
  elif (problem := problems[implementation]()) is not None:
    raise ValueError(f"attention implementation {implementation!r} {problem}")

  if implementation == "cudnn":
    return _cudnn(q, k, v, pattern, scale)
  if implementation == "pallas_gpu":
    o, lse = _pallas(q, k, v, pattern, scale, blocks)
  elif implementation == "blockwise":
    o, lse = blockwise.blockwise_attention(q, k, v, pattern, scale=scale, q_offset=q_offset)
  else:
    o, lse = attention_reference(q, k, v, pattern, scale=scale, q_offset=q_offset)
  return (o, lse) if return_lse else o
