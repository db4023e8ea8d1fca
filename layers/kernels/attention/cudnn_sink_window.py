"""Sink + sliding-window attention on cuDNN: a cuDNN window pass merged with a small sink pass, exact both ways.

LongGen (Ge, Lin, Zhang, Han, Peng, "A Little Goes a Long Way: Efficient Long Context Training and Inference with
Partial Contexts", arXiv 2410.01485) lets query i see S sink tokens and a window of W. Its keys split into two
disjoint segments (attention spec §4.4):

  window  [i-W+1, i]            cuDNN flash attention, causal, ``sliding_window_length = W``;
  sink    {j < S : j <= i-W}    empty for i < W; one [T-W, S] logits block per head, plain einsums.

Forward: the segments merge through their logsumexps, o = Σ exp(lse_seg - lse)·o_seg and
lse = logaddexp(lse_window, lse_sink) (spec §2.4). Backward (FlashAttention-2, arXiv 2307.08691): a segment's share
of the gradient is the flash backward run with the MERGED o and lse: P = exp(s - lse) on the segment's keys and
dS = P∘(dO·Vᵀ - rowsum(dO∘o)). cuDNN's backward kernel takes o and its softmax statistics as operands, so handing it
the merged ones yields the window segment's exact gradient at cuDNN speed; the sink segment's gradient is five
small einsums. Nothing is approximated: the result is masked dense attention up to rounding.

Giving cuDNN an external logsumexp needs ``jax._src.cudnn.fused_attention_stablehlo`` (JAX's public
``dot_product_attention`` keeps its residuals to itself); ``cudnn_problem()`` says when this JAX's private API does
not fit, and ``api.attention`` then takes the Pallas kernel. The window backend is pluggable: ``"xla"`` runs the
same merge over the blockwise XLA path (``blockwise.attention_backward``), which is how CPU tests check the algebra.

Shapes: q [B, T, Hq, E], k, v [B, T, Hkv, E] with Hkv | Hq -> o [B, T, Hq, E] in q's dtype.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from layers.kernels.attention import blockwise
from layers.kernels.attention.patterns import SinkWindow

_CUDNN_NAMES = ("dot_product_attention", "_dot_product_attention_bwd_p_wrapper", "_dot_product_attention_bwd_rule",
                "MaskType", "AttentionLayout")


def _cudnn_module():
  from jax._src.cudnn import fused_attention_stablehlo  # private; checked by cudnn_problem()
  return fused_attention_stablehlo


def cudnn_problem() -> str | None:
  """Why this JAX cannot run the cuDNN window backend (private API drift), or None."""
  try:
    fa = _cudnn_module()
  except ImportError as e:
    return f"cannot import JAX's cuDNN attention module ({e})"
  missing = [name for name in _CUDNN_NAMES if not hasattr(fa, name)]
  if missing:
    return f"JAX's cuDNN attention module lacks {missing}"
  if "return_residual" not in inspect.signature(fa.dot_product_attention).parameters:
    return "JAX's cuDNN dot_product_attention cannot return its logsumexp"
  return None


def _cudnn_window_forward(q, k, v, window, scale):
  fa = _cudnn_module()
  o, stats = fa.dot_product_attention(q, k, v, scale=scale, mask_type=fa.MaskType.CAUSAL,
                                      sliding_window_length=window, return_residual=True)
  return o, jnp.swapaxes(stats, 1, 2).astype(jnp.float32)  # cuDNN's statistics are [B, Hq, T]


def _cudnn_window_backward(q, k, v, o, lse, do, window, scale):
  fa = _cudnn_module()
  unused = jnp.zeros(0, q.dtype)  # bias, sequence lengths, offsets and page tables, as the public wrapper passes
  params = dict(scale=scale, seed=42, dropout_rate=0.0, variadic_args=(False, False), mask_type=fa.MaskType.CAUSAL,
                layout=fa.AttentionLayout.BTNH.value, sliding_window_length=window)
  if "score_mod" in inspect.signature(fa._dot_product_attention_bwd_rule).parameters:
    params["score_mod"] = None  # JAX >= 0.12 threads a flex-attention hook through the primitive
  grads = fa._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, unused, unused, unused, unused, unused, unused, unused, jnp.swapaxes(lse, 1, 2), o, do, **params)
  return tuple(grads[:3])


def _xla_window_forward(q, k, v, window, scale):
  return blockwise.blockwise_attention(q, k, v, SinkWindow(0, window), scale=scale)


def _xla_window_backward(q, k, v, o, lse, do, window, scale):
  return blockwise.attention_backward(q, k, v, o, lse, do, SinkWindow(0, window), scale=scale)


class _WindowBackend(NamedTuple):
  forward: Callable   # (q, k, v, window, scale) -> (o, lse [B, T, Hq] float32)
  backward: Callable  # (q, k, v, o, lse, do, window, scale) -> (dq, dk, dv), o and lse of the merged attention


WINDOW_BACKENDS = {"cudnn": _WindowBackend(_cudnn_window_forward, _cudnn_window_backward),
                   "xla": _WindowBackend(_xla_window_forward, _xla_window_backward)}


def _groups(x, hkv):
  """[B, T, Hq, ...] -> [B, T, Hkv, G, ...]."""
  return x.reshape(*x.shape[:2], hkv, x.shape[2] // hkv, *x.shape[3:])


def _sink_logits(q_tail, k_sink, scale):
  """Logits [B, T-W, Hkv, G, S] (float32) of queries W, W+1, ... on the sink keys; -inf where j > i - W."""
  s = jnp.einsum("bthge,bshe->bthgs", _groups(q_tail, k_sink.shape[2]), k_sink,
                 preferred_element_type=jnp.float32) * scale
  visible = jnp.arange(k_sink.shape[1])[None, :] <= jnp.arange(q_tail.shape[1])[:, None]  # row r is query W + r
  return jnp.where(visible[None, :, None, None, :], s, -jnp.inf)


def _has_sink_segment(t: int, sink: int, window: int) -> bool:
  return sink > 0 and t > window


def _forward(q, k, v, sink, window, scale, backend):
  o, lse = WINDOW_BACKENDS[backend].forward(q, k, v, window, scale)
  if not _has_sink_segment(q.shape[1], sink, window):
    return o, lse
  hkv, sink = k.shape[2], min(sink, k.shape[1])
  s = _sink_logits(q[:, window:], k[:, :sink], scale)
  lse_win = lse[:, window:]
  lse_tail = jnp.logaddexp(lse_win, jax.nn.logsumexp(s, axis=-1).reshape(lse_win.shape))
  p = jnp.exp(s - _groups(lse_tail, hkv)[..., None])
  o_sink = jnp.einsum("bthgs,bshf->bthgf", p.astype(v.dtype), v[:, :sink], preferred_element_type=jnp.float32)
  o_tail = (jnp.exp(lse_win - lse_tail)[..., None] * o[:, window:].astype(jnp.float32)
            + o_sink.reshape(o_sink.shape[:2] + (-1, o_sink.shape[-1])))
  return (jnp.concatenate([o[:, :window], o_tail.astype(o.dtype)], axis=1),
          jnp.concatenate([lse[:, :window], lse_tail], axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attend(q, k, v, sink, window, scale, backend):
  return _forward(q, k, v, sink, window, scale, backend)[0]


def _attend_fwd(q, k, v, sink, window, scale, backend):
  o, lse = _forward(q, k, v, sink, window, scale, backend)
  return o, (q, k, v, o, lse)


def _attend_bwd(sink, window, scale, backend, residuals, do):
  q, k, v, o, lse = residuals
  dq, dk, dv = WINDOW_BACKENDS[backend].backward(q, k, v, o, lse, do, window, scale)
  if not _has_sink_segment(q.shape[1], sink, window):
    return dq, dk, dv
  hkv, sink = k.shape[2], min(sink, k.shape[1])
  q_tail, k_sink, v_sink = q[:, window:], k[:, :sink], v[:, :sink]
  do_tail = _groups(do[:, window:], hkv)
  p = jnp.exp(_sink_logits(q_tail, k_sink, scale) - _groups(lse[:, window:], hkv)[..., None])
  delta = jnp.sum(do_tail.astype(jnp.float32) * _groups(o[:, window:], hkv).astype(jnp.float32), axis=-1)
  dp = jnp.einsum("bthgf,bshf->bthgs", do_tail, v_sink, preferred_element_type=jnp.float32)
  ds = (p * (dp - delta[..., None])).astype(q.dtype)
  dq_tail = scale * jnp.einsum("bthgs,bshe->bthge", ds, k_sink, preferred_element_type=jnp.float32)
  dk_sink = scale * jnp.einsum("bthgs,bthge->bshe", ds, _groups(q_tail, hkv), preferred_element_type=jnp.float32)
  dv_sink = jnp.einsum("bthgs,bthgf->bshf", p.astype(do.dtype), do_tail, preferred_element_type=jnp.float32)
  add = lambda x, rows, d: x.at[:, rows].add(d.astype(x.dtype))
  return (add(dq, slice(window, None), dq_tail.reshape(q_tail.shape)), add(dk, slice(0, sink), dk_sink),
          add(dv, slice(0, sink), dv_sink))


_attend.defvjp(_attend_fwd, _attend_bwd)


def sink_window_attention(q, k, v, pattern: SinkWindow, *, scale: float | None = None, backend: str = "cudnn"):
  """Causal attention to ``pattern.sink`` sink tokens and a ``pattern.window`` window (module docstring).

  Args:
    q, k, v: [B, T, Hq, E], [B, T, Hkv, E], [B, T, Hkv, E]; queries and keys at positions 0..T-1.
    pattern: the SinkWindow pattern.
    scale: logit scale, default 1/sqrt(E).
    backend: ``"cudnn"`` (GPU, bf16/f16) or ``"xla"`` (the blockwise path; any backend, used by CPU tests).

  Returns:
    o [B, T, Hq, E] in q's dtype; differentiable in q, k, v.
  """
  if backend not in WINDOW_BACKENDS:
    raise ValueError(f"backend must be one of {tuple(WINDOW_BACKENDS)} (got {backend!r})")
  if q.shape[1] != k.shape[1] or q.shape[2] % k.shape[2]:
    raise ValueError(f"needs T = S and KV heads dividing query heads (q {q.shape}, k {k.shape})")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _attend(q, k, v, pattern.sink, pattern.window, scale, backend)
