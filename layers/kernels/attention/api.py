"""One entry point for exact (dense or sparse) attention with an ordered choice of implementation.

``attention(q, k, v, pattern=..., implementation=None)`` asks the implementations in :data:`AUTOMATIC_ORDER` and
runs the first that supports the call; each states its own limits beside its code (``unsupported(call)``):

1. ``"cudnn"`` (``cudnn.py``): cuDNN's fused kernel on GPU, bf16/f16; dense, causal, windows, sinks by a merge.
2. ``"pallas_gpu"`` (``pallas_gpu.py``): the block-sparse Pallas kernel on GPU (sinks, strided blocks, per-head
   patterns).
3. ``"xla"`` (``xla.py``): XLA's dense attention for short sequences (dense and sink-free window patterns).
4. ``"blockwise"`` (``blockwise.py``): XLA ``lax.scan`` over visible tiles, any backend, memory linear in N.
5. ``"reference"`` (``reference.py``): the 3-pass cascade with a dense mask, O(T·S) memory.

Landing on the reference (or, on a GPU, on the blockwise scan) is logged once per reason
(``layers.kernels.fallback``).

FuseMax's cascades (``fusemax.py``) are selectable by name but never chosen automatically: ``"fusemax_3pass"``,
``"fusemax_2pass"``, ``"fusemax_1pass"``. An explicitly requested implementation that cannot run raises
``ValueError`` saying why. Shapes as ``jax.nn.dot_product_attention``: q [B, T, Hq, E], k [B, S, Hkv, E],
v [B, S, Hkv, F] -> o [B, T, Hq, F] (+ lse [B, T, Hq] float32 with ``return_lse``).
"""

from __future__ import annotations

import dataclasses

from layers.kernels.attention import blockwise, cudnn, fusemax, pallas_gpu, reference, xla
from layers.kernels.attention.call import AttentionCall, on_gpu
from layers.kernels.fallback import slower_fallback
from layers.kernels.attention.patterns import BlockSparse, Dense, Pattern, SinkWindow

_BY_NAME = {i.name: i for i in (cudnn.IMPLEMENTATION, pallas_gpu.IMPLEMENTATION, xla.IMPLEMENTATION,
                                blockwise.IMPLEMENTATION, reference.IMPLEMENTATION, *fusemax.IMPLEMENTATIONS)}
AUTOMATIC_ORDER = ("cudnn", "pallas_gpu", "xla", "blockwise", "reference")
IMPLEMENTATIONS = tuple(_BY_NAME)


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


def choose(call: AttentionCall, implementation: str | None = None) -> str:
  """The implementation that runs ``call``: ``implementation`` if it can (ValueError otherwise), or the first of
  :data:`AUTOMATIC_ORDER` that can."""
  if implementation is not None:
    if implementation not in _BY_NAME:
      raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS} (got {implementation!r})")
    if (problem := _BY_NAME[implementation].unsupported(call)) is not None:
      raise ValueError(f"attention implementation {implementation!r} {problem}")
    return implementation
  skipped = {}
  for name in AUTOMATIC_ORDER:
    if (problem := _BY_NAME[name].unsupported(call)) is None:
      if name == "reference" or (name == "blockwise" and on_gpu()):
        slower_fallback("attention", name, "; ".join(f"{k} {v}" for k, v in skipped.items()))
      return name
    skipped[name] = problem
  raise AssertionError("the reference supports every call")


def attention(q, k, v, *, pattern: Pattern = Dense(causal=True), scale: float | None = None, q_offset: int = 0,
              implementation: str | None = None, return_lse: bool = False, blocks: pallas_gpu.BlockSizes | None = None):
  """Exact attention of queries at absolute positions q_offset + [0, T) over keys [0, S) under ``pattern``.

  Args:
    q, k, v: [B, T, Hq, E], [B, S, Hkv, E], [B, S, Hkv, F]; Hkv divides Hq (GQA).
    pattern: ``Dense(causal)``, ``SinkWindow(sink, window)`` or ``BlockSparse(...)`` (heads bound from shapes).
    scale: logit scale, default 1/sqrt(E).
    q_offset: absolute position of query 0 (chunked prefill); patterns use absolute positions.
    implementation: one of ``IMPLEMENTATIONS`` or None for the first of ``AUTOMATIC_ORDER`` that supports the call.
    return_lse: also return the natural-log logsumexp [B, T, Hq] (float32; -inf on rows with no visible key).
    blocks: Pallas tile sizes (default ``BlockSizes.for_pattern``).

  Returns:
    o [B, T, Hq, F] in q's dtype, or (o, lse) with ``return_lse``.
  """
  pattern = simplify(bind_heads(pattern, q.shape[2], k.shape[2]), q_offset + q.shape[1])
  call = AttentionCall(q, k, v, pattern, scale, q_offset, return_lse, blocks)
  o, lse = _BY_NAME[choose(call, implementation)].attend(call)
  return (o, lse) if return_lse else o
