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
  """

  memory: Memory
  bias: Bias
  retention: Retention = Decay()
  momentum: bool = False
  read: str = "post"

  def __post_init__(self):
    if self.read not in READS:
      raise ValueError(f"read must be one of {READS} (got {self.read!r})")
    if self.momentum and type(self.retention) is not Decay:
      raise ValueError(f"momentum needs Decay retention (got {type(self.retention).__name__})")

  def token_loss(self, w: dict, k: jax.Array, v: jax.Array, delta: jax.Array | None, ln) -> jax.Array:
    """ℓ(W; k, v) for one token (k, v [d]; delta a scalar or None): the objective the inner loop descends."""
    return self.bias.loss(self.memory.apply(w, k, ln), v, delta)


def along(gate: jax.Array, axis: str) -> jax.Array:
  """A per-head gate [..., g] shaped to scale a weight [..., out, in] along ``axis`` ("in" or "out")."""
  return gate[..., None, :] if axis == "in" else gate[..., :, None]


def gates_along(memory: Memory, gate: jax.Array) -> dict:
  """{layer: gate broadcast along that layer's gated axis}."""
  return {name: along(gate, axis) for name, axis in memory.gate_axes.items()}


def zero_like_state(state: dict) -> dict:
  return {name: jnp.zeros_like(w) for name, w in state.items()}
