"""Public entry point of the Miras memories: ``miras_memory`` (whole sequences, from a state, in chunks).

"It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization" (Behrouz et al., arXiv 2504.13173). Semantics and shapes are those of
:func:`reference.frozen_gradient_loop`: q, k, v [b, t, h, d]; gates [b, t, h, g]; state {layer: [b, h, out, in]}
float32; returns (o [b, t, h, d] float32, state at the last chunk boundary, momentum or None).

``implementation`` picks how the sequence is processed:
  * ``"xla_flat"`` / ``"xla_flat_bf16"``: the chunk step of ``xla_chunked`` laid out for a GPU (all heads at once,
    the state-independent work hoisted out of the scan; :mod:`flat`), for MLP memories without momentum or lag
    token: 1.3× faster fwd+bwd and 1.45× forward than ``xla_chunked`` for Moneta (per-head gates) on an H200;
  * ``"xla_split"`` / ``"xla_split_bf16"``: ``xla_flat`` with the scan over chunks reduced to the keys (the state's
    recurrence), every chunk's per-token reads then taken at once from its start state (``miras_flat(split=True)``):
    98 instead of 129 kernels per chunk fwd+bwd, a Moneta layer (per-head gates, bf16, remat) 8% faster than
    ``xla_flat_bf16`` on an H200 (38.7 vs 42.2 ms at 8 × 4096), with 1.6× its temporary memory (the start states);
  * ``"pallas_tiles"`` / ``"pallas_tiles_bf16"``: ``xla_split`` with the keys' recurrence as Pallas kernels, three
    per chunk forward and three backward (two whose programs each own one tile of the hidden axis of one head,
    one row-wise between them), which also return the inputs' cotangents, and with per-head gates every chunk's
    reads as one kernel per direction (:mod:`pallas_tiles`, :mod:`pallas_reads`; same limits as
    ``pallas_triton``). The fastest Moneta layer measured on an H100 (bf16, remat, 8 × 4096, fwd+bwd, same run):
    per-head gates 31.7 vs 47.3 ms for ``xla_split_bf16`` (30.4 ms since, 0.25× the GDN layer), channel gates
    73.3 vs 79.2 ms for ``xla_flat_bf16`` (docs/benchmarks.md);
  * ``"pallas_mosaic_bf16"``: ``pallas_tiles_bf16`` with the keys' forward as one Pallas Mosaic GPU kernel that walks
    every chunk of a head (:mod:`mosaic_keys`; Hopper GPUs, per-head gates, c = d = 64, E ≤ 256, biases without
    δ), the backward ``pallas_tiles``'. 27.8 vs 30.3 ms fwd+bwd for ``pallas_tiles_bf16`` on an H100 (bf16, remat,
    8 × 4096, same run; its keys' forward 2.5 vs 4.5 ms);
  * ``"pallas_mosaic_chain_bf16"``: ``pallas_mosaic_bf16`` with the keys' backward cut into what does not take the
    state's cotangent (all chunks at once, XLA) and the chain that does, one Pallas Mosaic GPU kernel
    (:mod:`keys_chain`, :mod:`mosaic_chain`; the same limits). The fastest Moneta layer measured: 21.8 vs 25.5 ms
    fwd+bwd for ``pallas_mosaic_bf16`` on an H100 (0.33× the GDN layer, same run; its keys' backward 11.7 vs 15.4
    ms), with 1.3 GiB more XLA temporaries (6.2 GiB). Its first and last passes are Pallas Triton kernels too
    (:mod:`pallas_chain_inputs`, :mod:`pallas_chain_outputs`) and bf16 q, k, v stay bf16 through the chunks: 14.4
    ms against GDN's 7.3 (0.51×; 14.5 / 7.25 in another call) at the twenty-third session's end, 4.7 GiB of
    temporaries;
  * ``"xla_chunked"``: closed-form chunk gradients, dual-form reads, ``lax.scan`` over chunks (any backend), every
    matmul in full float32;
  * ``"xla_chunked_bf16"``: the same with bfloat16 matmul operands and float32 accumulation (tensor cores on GPU;
    states, gates and cumulative products stay float32); chosen explicitly, by measurement (benchmarks/miras.py);
  * ``"pallas_triton"`` / ``"pallas_triton_bf16"``: the whole chunk loop of a head in one Pallas (Triton) kernel
    per direction, walking the hidden axis in tiles, with a hand-written backward (:mod:`pallas_triton`); GPU only,
    for MLP memories (per-head or channel gates) with no momentum, lag token, inner clip or chunk-end map (Moneta),
    c, d, E powers of two ≥ 16. On an H100 (Moneta layer, bf16, remat, 8 × 4096): with channel gates 10% slower
    than ``xla_flat_bf16`` (87.5 vs 79.1 ms fwd+bwd) in two thirds of its temporary memory (3.9 vs 6.0 GiB); with
    per-head gates 20% slower than ``xla_split_bf16`` (53.3 vs 44.4 ms); its forward is the fastest measured;
  * ``"reference"``: the token loop with one ``jax.grad`` per token (any backend; slow).
``None`` takes the first that applies, in that order (so never those listed after the reference).
An explicitly requested implementation that cannot run raises a ValueError saying why.
"""

from __future__ import annotations

import functools

import jax

from layers.kernels.miras import chunked, flat, mosaic_keys, pallas_tiles, pallas_triton, reference
from layers.miras.spec import Gates, MemorySpec

IMPLEMENTATIONS = ("xla_flat", "xla_chunked", "xla_flat_bf16", "xla_chunked_bf16", "reference", "xla_split",
                   "xla_split_bf16", "pallas_triton", "pallas_triton_bf16", "pallas_tiles", "pallas_tiles_bf16",
                   "pallas_mosaic_bf16", "pallas_mosaic_chain_bf16")


def _unsupported(implementation: str, spec: MemorySpec, gates: Gates, chunk_size: int, head_dim: int) -> str | None:
  """Why ``implementation`` cannot run this memory, or None if it can."""
  if spec.momentum and gates.eta.shape[-1] != 1:
    return "momentum needs per-head gates (eta [..., 1])"
  if implementation.startswith(("xla_flat", "xla_split")):
    return flat.unsupported(spec)
  if implementation.startswith("pallas"):
    if jax.default_backend() != "gpu":
      return "its kernels need a GPU (Triton); elsewhere they run only in Pallas interpret mode (the tests)"
    if implementation.startswith("pallas_mosaic"):
      return mosaic_keys.unsupported(spec, chunk_size, head_dim, gates.eta.shape[-1] == 1)
    return pallas_triton.unsupported(spec, chunk_size, head_dim)
  return None


def miras_memory(q: jax.Array, k: jax.Array, v: jax.Array, gates: Gates, *, spec: MemorySpec, initial_state: dict,
                 initial_momentum: dict | None = None, ln=None, chunk_size: int = 64, lengths: jax.Array | None = None,
                 remat: bool = False, implementation: str | None = None):
  """A Miras memory over whole sequences (see the module docstring).

  Args:
    q, k, v: [b, t, h, d] (normally q, k L2-normalised per head).
    gates: per-token η, log α, δ, log μ (:class:`layers.miras.spec.Gates`).
    spec: the memory's architecture, bias, retention and algorithm (static).
    initial_state: {layer: [b, h, out, in]} float32; initial_momentum likewise (momentum only).
    ln: (γ, β) [h, d] for the MLP memory's LayerNorm, or None.
    chunk_size: tokens per chunk (semantic: gradients within a chunk are taken at its start).
    lengths: int [b] or None; tokens at or past ``lengths[b]`` are padding (decoding buffers).
    remat: recompute the chunk body in the backward pass (the XLA paths; the Pallas kernels always do).
    implementation: one of ``IMPLEMENTATIONS`` or None (first applicable).
  """
  if implementation is None:
    implementation = next(i for i in IMPLEMENTATIONS if _unsupported(i, spec, gates, chunk_size, q.shape[-1]) is None)
  elif implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  elif (why := _unsupported(implementation, spec, gates, chunk_size, q.shape[-1])) is not None:
    raise ValueError(f"miras implementation {implementation!r} cannot run: {why}")
  kwargs = dict(spec=spec, initial_state=initial_state, initial_momentum=initial_momentum, ln=ln,
                chunk_size=chunk_size, lengths=lengths)
  if implementation == "reference":
    return reference.miras_reference(q, k, v, gates, **kwargs)
  matmul = "bfloat16" if implementation.endswith("_bf16") else "float32"
  run = {"xla_flat": flat.miras_flat, "xla_split": functools.partial(flat.miras_flat, split=True),
         "xla_chunked": chunked.miras_chunked, "pallas_triton": pallas_triton.miras_pallas,
         "pallas_tiles": pallas_tiles.miras_tiles,
         "pallas_mosaic": functools.partial(pallas_tiles.miras_tiles,
                                            tiling=pallas_tiles.Tiling(keys_forward="mosaic")),
         "pallas_mosaic_chain": functools.partial(
             pallas_tiles.miras_tiles, tiling=pallas_tiles.Tiling(keys_forward="mosaic", keys_backward="chain_mosaic"))}
  return run[implementation.removesuffix("_bf16")](q, k, v, gates, remat=remat, matmul=matmul, **kwargs)
