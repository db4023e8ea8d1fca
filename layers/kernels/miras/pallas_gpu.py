"""Miras chunk stages as fused GPU kernels (Pallas, Triton backend), forward and backward.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.4). The XLA path (:mod:`chunked`) runs a chunk of the
MLP memory as ~200 small kernels, and at the 340M layer shape on an H200 their launch and loop overhead, not their
FLOPs, sets the time (docs/benchmarks.md). :func:`fused` turns one *stage* of :func:`chunked.chunk_step`
(gradients, reads, close: the same functions the XLA path calls) into

  * a forward kernel that evaluates the stage for one head, its operands and results in registers, and
  * a backward kernel that recomputes the stage and pulls the cotangents back through it with ``jax.vjp``
    *inside* the kernel,

joined by ``jax.custom_vjp``. The stage is written for one head; ``jax.vmap`` over batch rows and heads turns each
``pallas_call`` into one launch with a [b, h] grid (Pallas' batching rule). A chunk is three launches forward and
three backward. Because the kernels evaluate the very stage functions (and their exact derivatives), they equal the
XLA path up to float rounding by construction; tests check that in Pallas interpret mode on CPU and, on a GPU, with
Triton (values and ``jax.grad``).

Why three stages and not one: the whole chunk's backward at d_h = 64 (state 2 × 64 × 256) asks Triton for 368 KiB
of shared memory on an H200 (232 KiB available); each stage alone is a third of that program.

Supported (:func:`unsupported` says why not otherwise): per-head gates (g = 1), no momentum, no lag token (Decay,
ℓq, elastic-net retention; any bias; linear or MLP memory), chunk size, head width and every state dimension powers
of two ≥ 16 (Triton tiles).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from layers.kernels.jax_compat import pallas_triton_rules_problem
from layers.miras.spec import MemorySpec

NUM_WARPS = 8


def _is_pow2_at_least_16(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


def unsupported(spec: MemorySpec, *, head_dim: int, gate_width: int, chunk_size: int) -> str | None:
  """Why the fused kernels cannot run this memory, or None if they can."""
  if spec.momentum:
    return "momentum (its per-token coefficient vectors are not Triton matmul tiles)"
  if spec.retention.lag:
    return "a lag-token retention (Memora's exact softmax step)"
  if gate_width != 1:
    return "channel gates (per-head gates only)"
  sizes = [("chunk_size", chunk_size)] + [(f"state {name} {dims}", n)
                                          for name, dims in spec.memory.shapes(head_dim).items() for n in dims]
  for what, n in sizes:
    if not _is_pow2_at_least_16(n):
      return f"{what}: {n} is not a power of two >= 16"
  return None


def _to_kernel(x: jax.Array) -> jax.Array:
  return x.astype(jnp.int32) if x.dtype == jnp.bool_ else x  # Triton refs hold no booleans


def _call(body: Callable, operands: list, out_avals: list, name: str, interpret: bool) -> list:
  """``body`` (flat operand values -> flat results) as one single-program kernel over whole operands."""
  def kernel(*refs):
    values = [r[...] for r in refs[:len(operands)]]
    values = [v != 0 if x.dtype == jnp.bool_ else v for v, x in zip(values, operands, strict=True)]
    for ref, out in zip(refs[len(operands):], body(values), strict=True):
      ref[...] = out.astype(ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name=name,
  )(*(_to_kernel(x) for x in operands))


def _differentiable(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def fused(fn: Callable, *, interpret: bool = False) -> Callable:
  """``fn`` (pytrees of one head's arrays -> pytree of arrays) as a forward kernel and a ``jax.vjp`` backward
  kernel; ``interpret`` runs both in the Pallas interpreter (CPU tests)."""
  if not interpret and (problem := pallas_triton_rules_problem()) is not None:
    raise RuntimeError(f"fused Miras kernels unavailable: {problem}")

  name = "miras" + getattr(getattr(fn, "func", fn), "__name__", "_stage")  # e.g. miras_gradients

  def flat_fn(treedef):
    return lambda values: jax.tree.leaves(fn(*jax.tree.unflatten(treedef, values)))

  @jax.custom_vjp
  def call(*args):
    leaves, treedef = jax.tree.flatten(args)
    out_avals, out_tree = jax.tree.flatten(jax.eval_shape(fn, *args))
    return jax.tree.unflatten(out_tree, _call(flat_fn(treedef), leaves, out_avals, name, interpret))

  def call_fwd(*args):
    return call(*args), args

  def call_bwd(args, cotangents):
    leaves, treedef = jax.tree.flatten(args)
    diff = [i for i, x in enumerate(leaves) if _differentiable(x)]
    cot_leaves = jax.tree.leaves(cotangents)

    def body(values):
      primals, cots = values[:len(leaves)], values[len(leaves):]

      def of_differentiable(*xs):
        full = list(primals)
        for i, x in zip(diff, xs, strict=True):
          full[i] = x
        return flat_fn(treedef)(full)

      _, pull = jax.vjp(of_differentiable, *(primals[i] for i in diff))
      return pull(cots)

    grads = iter(_call(body, leaves + cot_leaves, [leaves[i] for i in diff], name + "_bwd", interpret))
    out = [next(grads) if i in diff else np.zeros(x.shape, jax.dtypes.float0) for i, x in enumerate(leaves)]
    return tuple(jax.tree.unflatten(treedef, out))

  call.defvjp(call_fwd, call_bwd)
  return call
