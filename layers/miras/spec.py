"""A Miras memory as the composition of its four axes, plus the per-token gates that drive it.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §3–§5): a memory is (1) an architecture
(:mod:`layers.miras.memory`), (2) an attentional bias (:mod:`layers.miras.bias`), (3) a retention rule
(:mod:`layers.miras.retention`) and (4) a learning algorithm: gradient descent, or gradient descent with momentum
as in Titans ("Titans: Learning to Memorize at Test Time", arXiv 2501.00663, Eq. 13–14):

    S_t = μ_t ⊙ S_{t−1} − η_t ⊙ ∇ℓ(W_{t−1}; k_t, v_t)          (momentum, "surprise")
    W_t = α_t ⊙ W_{t−1} + S_t                                   (with Decay retention only)

:class:`MemorySpec` is frozen and hashable: kernels take it as a static argument. Gates (:class:`Gates`) are
per token and head, either one scalar per head (last axis 1) or one value per channel (last axis d); a channel
gate acts on each weight's d-sized axis (``memory.gate_axes``: W2's input, W1's output, the linear memory's input).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from layers.miras.bias import Bias
from layers.miras.memory import Memory
from layers.miras.retention import Decay, Retention

READS = ("post", "pre")


class Gates(NamedTuple):
  """Per-token inner-loop gates, float32.

  Attributes:
    eta: inner learning rate η > 0, [b, t, h, g] (g = 1 per head or d per channel).
    log_alpha: log of the retention α ∈ (0, 1], [b, t, h, g].
    delta: Huber threshold δ > 0, [b, t, h], or None for biases without one.
    log_momentum: log of the momentum decay μ ∈ (0, 1), [b, t, h, g], or None without momentum.
  """

  eta: jax.Array
  log_alpha: jax.Array
  delta: jax.Array | None = None
  log_momentum: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """One Miras memory: architecture, attentional bias, retention, learning algorithm and read timing.

  Attributes:
    memory: architecture (``LinearMemory`` or ``MLPMemory``).
    bias: attentional bias (per-token loss).
    retention: retention rule (state → weights, chunk-end map).
    momentum: gradient descent with momentum (Titans); needs ``Decay`` retention.
    read: ``post``: token t reads W_t (after its own write, TNT/TTT convention); ``pre``: it reads W_{t−1}.
    inner_clip: None (the papers' rule) or τ > 0: every token's inner gradient ∇_W ℓ_t (all of the memory's weights
      together) is rescaled to norm at most τ before it enters the update, as titans-pytorch's ``max_grad_norm``
      (lucidrains/titans-pytorch #29). It bounds how far one token moves the memory, and with it how fast outer
      gradients can grow through a long sequence (docs/results.md, the T = 4096 stability table).
  """

  memory: Memory
  bias: Bias
  retention: Retention = Decay()
  momentum: bool = False
  read: str = "post"
  inner_clip: float | None = None

  def __post_init__(self):
    if self.read not in READS:
      raise ValueError(f"read must be one of {READS} (got {self.read!r})")
    if self.inner_clip is not None and not self.inner_clip > 0:
      raise ValueError(f"inner_clip must be None or > 0 (got {self.inner_clip!r})")
    if self.momentum and type(self.retention) is not Decay:
      raise ValueError(f"momentum needs Decay retention (got {type(self.retention).__name__})")

  @property
  def reads_closed_state(self) -> bool:
    """Whether a chunk's last token reads the state after the chunk-end map (post reads of a retention with
    ``boundary_read``: Moneta's ℓq normalisation, elastic net), not the chunk's linear sum."""
    return self.read == "post" and self.retention.boundary_read

  def token_loss(self, w: dict, k: jax.Array, v: jax.Array, delta: jax.Array | None, ln) -> jax.Array:
    """ℓ(W; k, v) for one token (k, v [d]; delta a scalar or None): the objective the inner loop descends."""
    return self.bias.loss(self.memory.apply(w, k, ln), v, delta)

  def _clip_scale(self, squared_norm: jax.Array) -> jax.Array:
    """min(1, τ / ‖∇ℓ‖) from ‖∇ℓ‖² (only with ``inner_clip``)."""
    # τ / sqrt(max(‖∇ℓ‖², τ²)): 1 below the clip, and a finite derivative everywhere (also at ‖∇ℓ‖ = 0, where a
    # padding token's gradient is exactly zero)
    return self.inner_clip * jax.lax.rsqrt(jnp.maximum(squared_norm, self.inner_clip ** 2))

  def clip_gradient(self, grad: dict) -> dict:
    """One token's gradient {layer: [out, in]}, rescaled to norm ≤ τ (unchanged without ``inner_clip``)."""
    if self.inner_clip is None:
      return grad
    scale = self._clip_scale(sum(jnp.sum(g * g) for g in grad.values()))
    return {name: g * scale for name, g in grad.items()}

  def clip_errors(self, acts: dict) -> dict:
    """Per-token (inputs a_i [c, in], errors e_i [c, out]) with ∇ℓ_i = Σ_layers e_i a_iᵀ rescaled to norm ≤ τ: the
    norm of a rank-1 e aᵀ is ‖e‖‖a‖, so the errors are scaled, never the outer products formed. An a or e may be a
    tuple of column blocks (the Pallas kernels tile the hidden axis); the result keeps its form."""
    if self.inner_clip is None:
      return acts
    parts = lambda x: x if isinstance(x, tuple) else (x,)
    squared_norm = lambda x: sum(jnp.sum(b * b, axis=-1) for b in parts(x))
    scale = self._clip_scale(sum(squared_norm(a) * squared_norm(e) for a, e in acts.values()))[..., None]
    scaled = lambda e: tuple(b * scale for b in e) if isinstance(e, tuple) else e * scale
    return {name: (a, scaled(e)) for name, (a, e) in acts.items()}


def along(gate: jax.Array, axis: str) -> jax.Array:
  """A per-head gate [..., g] shaped to scale a weight [..., out, in] along ``axis`` ("in" or "out")."""
  return gate[..., None, :] if axis == "in" else gate[..., :, None]


def gates_along(memory: Memory, gate: jax.Array) -> dict:
  """{layer: gate broadcast along that layer's gated axis}."""
  return {name: along(gate, axis) for name, axis in memory.gate_axes.items()}


def zero_like_state(state: dict) -> dict:
  return {name: jnp.zeros_like(w) for name, w in state.items()}
