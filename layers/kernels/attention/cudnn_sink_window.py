"""Sink + sliding-window attention on cuDNN: a cuDNN window pass merged with a small sink pass, exact both ways.

LongGen (Ge, Lin, Zhang, Han, Peng, "A Little Goes a Long Way: Efficient Long Context Training and Inference with
Partial Contexts", arXiv 2410.01485) lets query i see S sink tokens and a window of W. Its keys split into two
disjoint segments (attention spec §4.4):

  window  [i-W+1, i]            cuDNN flash attention, causal, ``sliding_window_length = W``;
  sink    {j < S : j <= i-W}    empty for i < W; one [T, S] logits block per head, plain einsums.

Forward: the segments merge through their logsumexps, o = Σ exp(lse_seg - lse)·o_seg and
lse = logaddexp(lse_window, lse_sink) (spec §2.4). Backward (FlashAttention-2, arXiv 2307.08691): a segment's share
of the gradient is the flash backward run with the MERGED o and lse: P = exp(s - lse) on the segment's keys and
dS = P∘(dO·Vᵀ - rowsum(dO∘o)). cuDNN's backward kernel takes o and its softmax statistics as operands, so handing it
the merged ones yields the window segment's exact gradient at cuDNN speed; the sink segment's gradient is five
small einsums. Nothing is approximated: the result is masked dense attention up to rounding.

Giving cuDNN an external logsumexp needs private JAX API, reached only through ``layers.kernels.jax_compat`` (which
admits the JAX versions the GPU parity test passed on); elsewhere ``api.attention`` takes the Pallas kernel. The
window backend is pluggable: ``"xla"`` runs the same merge over the blockwise XLA path
(``blockwise.attention_backward``), which is how CPU tests check the algebra.

Shapes: q [B, T, Hq, E], k, v [B, T, Hkv, E] with Hkv | Hq -> o [B, T, Hq, E] in q's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.kernels import jax_compat
from layers.kernels.attention import blockwise
from layers.kernels.attention.patterns import SinkWindow


def _cudnn_window_forward(q, k, v, window, scale):
  return jax_compat.cudnn_window_forward(q, k, v, window=window, scale=scale)


def _cudnn_window_backward(q, k, v, o, lse, do, window, scale):
  return jax_compat.cudnn_window_backward(q, k, v, o, lse, do, window=window, scale=scale)


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


def _sink_logits(q, k_sink, window, scale):
  """Logits [B, T, Hkv, G, S] (float32) of every query on the sink keys; -inf where key j > i - W (all of them for
  the first W queries), so the sink segment never overlaps the window."""
  s = jnp.einsum("bthge,bshe->bthgs", _groups(q, k_sink.shape[2]), k_sink, preferred_element_type=jnp.float32)
  visible = jnp.arange(k_sink.shape[1])[None, :] <= jnp.arange(q.shape[1])[:, None] - window
  return jnp.where(visible[None, :, None, None, :], s * scale, -jnp.inf)


def _einsum_like(spec, a, b, like):
  """einsum with float32 accumulation, rounded to ``like``'s dtype (bf16 halves the HBM traffic of [B, T, H, E])."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(like.dtype)


def _has_sink_segment(t: int, sink: int, window: int) -> bool:
  return sink > 0 and t > window


def _forward(q, k, v, sink, window, scale, backend):
  o, lse_win = WINDOW_BACKENDS[backend].forward(q, k, v, window, scale)
  if not _has_sink_segment(q.shape[1], sink, window):
    return o, lse_win
  hkv, sink = k.shape[2], min(sink, k.shape[1])
  s = _sink_logits(q, k[:, :sink], window, scale)
  lse = jnp.logaddexp(lse_win, jax.nn.logsumexp(s, axis=-1).reshape(lse_win.shape))
  p = jnp.exp(s - _groups(lse, hkv)[..., None])
  o_sink = _einsum_like("bthgs,bshf->bthgf", p.astype(v.dtype), v[:, :sink], o).reshape(o.shape)
  return (jnp.exp(lse_win - lse)[..., None] * o.astype(jnp.float32) + o_sink).astype(o.dtype), lse


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
  k_sink, v_sink, do_g = k[:, :sink], v[:, :sink], _groups(do, hkv)
  p = jnp.exp(_sink_logits(q, k_sink, window, scale) - _groups(lse, hkv)[..., None])
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  dp = jnp.einsum("bthgf,bshf->bthgs", do_g, v_sink, preferred_element_type=jnp.float32)
  ds = (p * (dp - _groups(delta, hkv)[..., None])).astype(q.dtype)
  dq = dq + scale * _einsum_like("bthgs,bshe->bthge", ds, k_sink, dq).reshape(dq.shape)
  dk_sink = scale * jnp.einsum("bthgs,bthge->bshe", ds, _groups(q, hkv), preferred_element_type=jnp.float32)
  dv_sink = jnp.einsum("bthgs,bthgf->bshf", p.astype(do.dtype), do_g, preferred_element_type=jnp.float32)
  return dq, dk.at[:, :sink].add(dk_sink.astype(dk.dtype)), dv.at[:, :sink].add(dv_sink.astype(dv.dtype))


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
