"""Every private JAX API memlab uses, behind one module that checks the JAX version it was tested on.

Only one feature needs private API today: cuDNN flash attention with an *external* logsumexp, which exact
sink + window attention needs (``attention/cudnn_sink_window.py``). JAX's public ``dot_product_attention`` keeps its
residuals to itself, so the forward asks ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` for
its softmax statistics and the backward binds the module's backward primitive with the merged (o, lse).

A primitive takes positional operands, so a JAX release that reorders them would bind wrongly instead of failing.
Hence two gates, checked once per process:

1. the JAX version must be one on which the GPU parity test
   (``tests/layers/test_attention_sink_merge.py::test_cudnn_sink_window_bf16_matches_reference``) has passed,
   i.e. a key of :data:`CUDNN_BACKWARD_SIGNATURES`;
2. the backward implementation's parameters must be exactly the ones recorded for that version; the operands are
   then bound by those recorded names, never by a guessed position.

On any other JAX, :func:`cudnn_attention_problem` says why, one warning is logged, and ``api.attention`` falls back
to the Pallas kernel. To admit a new JAX: run the GPU parity test on it, then add its signature below.

One developer tool reads private API too, and only it: :func:`triton_modules` hands out the Triton IR of every
Pallas-Triton kernel JAX lowers (``jax._src.pallas.triton.pallas_call_registration``), so the kernels can be
compiled for an H100 with the ``triton`` package on a machine without a GPU (``benchmarks/triton_compile.py``).
Nothing that runs a model uses it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("memlab")

_OPERANDS = ("query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "page_table_k",
             "page_table_v", "activation", "fwd_output", "grad_output")
_PARAMS = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout", "sliding_window_length")

# JAX version -> parameters of fused_attention_stablehlo._dot_product_attention_bwd_impl, in order, on the versions
# where the GPU parity test passed (jax 0.11.2: H100 and H200, 2026-11; see docs/benchmarks.md).
CUDNN_BACKWARD_SIGNATURES = {
    "0.11.2": _OPERANDS + _PARAMS,
}


def _cudnn_module():
  from jax._src.cudnn import fused_attention_stablehlo  # private: gated by cudnn_attention_problem()
  return fused_attention_stablehlo


@functools.cache
def cudnn_attention_problem() -> str | None:
  """Why this JAX cannot run cuDNN attention with an external logsumexp (None if it can); logged once."""
  problem = _problem()
  if problem is not None:
    log.warning("cuDNN sink+window attention disabled, the Pallas kernel runs instead: %s", problem)
  return problem


def _problem() -> str | None:
  expected = CUDNN_BACKWARD_SIGNATURES.get(jax.__version__)
  if expected is None:
    return (f"JAX {jax.__version__} is not a version its GPU parity test passed on "
            f"({', '.join(CUDNN_BACKWARD_SIGNATURES)}); see layers/kernels/jax_compat.py")
  try:
    fa = _cudnn_module()
  except ImportError as e:
    return f"cannot import JAX's cuDNN attention module ({e})"
  missing = [n for n in ("dot_product_attention", "_dot_product_attention_bwd_p_wrapper",
                         "_dot_product_attention_bwd_impl", "MaskType", "AttentionLayout") if not hasattr(fa, n)]
  if missing:
    return f"JAX's cuDNN attention module lacks {missing}"
  found = tuple(inspect.signature(fa._dot_product_attention_bwd_impl).parameters)
  if found != expected:
    return f"JAX {jax.__version__}'s cuDNN attention backward takes {found}, not the recorded {expected}"
  if "return_residual" not in inspect.signature(fa.dot_product_attention).parameters:
    return "JAX's cuDNN dot_product_attention cannot return its logsumexp"
  return None


def _require() -> None:
  if (problem := cudnn_attention_problem()) is not None:
    raise RuntimeError(f"cuDNN attention with an external logsumexp is unavailable: {problem}")


def cudnn_window_forward(q, k, v, *, window: int, scale: float):
  """Causal cuDNN attention over a left window of ``window`` keys: (o [B, T, Hq, E], lse [B, T, Hq] float32)."""
  _require()
  fa = _cudnn_module()
  o, stats = fa.dot_product_attention(q, k, v, scale=scale, mask_type=fa.MaskType.CAUSAL,
                                      sliding_window_length=window, return_residual=True)
  return o, jnp.swapaxes(stats, 1, 2).astype(jnp.float32)  # cuDNN's statistics are [B, Hq, T]


def cudnn_window_backward(q, k, v, o, lse, do, *, window: int, scale: float):
  """(dq, dk, dv) of causal cuDNN window attention given the output ``o`` and logsumexp ``lse`` [B, T, Hq] to use
  (the merged ones when the window is one segment of a larger attention)."""
  _require()
  fa = _cudnn_module()
  unused = jnp.zeros(0, q.dtype)  # bias, sequence lengths, offsets and page tables, as the public wrapper passes
  operands = {"query": q, "key": k, "value": v, "activation": jnp.swapaxes(lse, 1, 2), "fwd_output": o,
              "grad_output": do}
  params = {"scale": scale, "seed": 42, "dropout_rate": 0.0, "variadic_args": (False, False),
            "mask_type": fa.MaskType.CAUSAL, "layout": fa.AttentionLayout.BTNH.value,
            "sliding_window_length": window}
  signature = CUDNN_BACKWARD_SIGNATURES[jax.__version__]
  positional = [operands.get(name, unused) for name in signature if name in _OPERANDS]
  grads = fa._dot_product_attention_bwd_p_wrapper.bind(*positional, **{n: params[n] for n in signature
                                                                         if n in _PARAMS})
  return tuple(grads[:3])


@contextlib.contextmanager
def triton_modules():
  """While active, every Pallas-Triton kernel that JAX lowers appends its Triton IR (MLIR text, no locations) to the
  yielded list (lower for ``lowering_platforms=("cuda",)`` under an abstract GPU mesh to lower without a GPU)."""
  from jax._src.pallas.triton import pallas_call_registration as registration  # private: developer tool only

  lower = registration.lowering.lower_jaxpr_to_triton_module
  modules: list[str] = []

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
