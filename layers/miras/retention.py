"""Miras axis 3, retention: how the memory's state S keeps (or forgets) what it held, and how it maps to weights.

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.2 and §5.3, Eq. 8, 18–25). Every rule here is a linear
accumulation S ← α ⊙ S − η ⊙ ∇ followed by a per-rule map; per token (the exact recurrence):

  * :class:`Decay` (ℓ2 local + ℓ2 global; Yaad, Titans): W = S;
  * :class:`LqNorm` (Moneta, Eq. 24–25, printed form): S = A, W = A / ‖A‖_q^{q−2}, the norm over each weight tensor of
    a head (spec §9). q = 2 gives W = A; ‖W‖_q = ‖A‖_q^{3−q};
  * :class:`SoftmaxKL` (Memora, KL retention on the simplex, Eq. 21/27): W_t = Softmax(α_t log W_{t−1} − η_t ∇),
    softmax over each output row of each weight (c = 1), W clamped ≥ ``clamp`` before the log;
  * :class:`ElasticNet` (Eq. 22, with λ = α_t, ζ = η_t): W_t = S_γ(α_t W_{t−1} − η_t ∇), S_γ the soft threshold.

Chunked training (spec §5.2) keeps the accumulation linear inside a chunk, with every gradient taken at the weights
``gradient_point(S₀)`` of the chunk start, and applies the map at chunk ends only:

  * Moneta reads W_t = s₀·A_t inside the chunk, s₀ = ‖A₀‖_q^{−(q−2)} frozen at the chunk start (``read_scale``);
    the chunk's last token reads the normalised weights of the new state;
  * ElasticNet thresholds at chunk ends (``close``);
  * Memora's exact softmax step is taken by a *lag token*, the last token of each chunk (``lag``), from the linear
    state after the chunk's other tokens, with its own gradient at that state. Eq. 30 puts the lag token first in
    the chunk; putting it last is the same scheme with the chunk grid shifted by one token, and keeps every chunk
    boundary state — the carried and cached memory — on the simplex.

With chunk size 1 every token is a chunk end, so all rules reduce to their exact recurrences. State and weights are
dicts {layer name: [out, in]} for one head; gates arrive already broadcast along each layer's gated axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _blocks(w) -> tuple:
  """A layer's weight as a tuple of blocks (one block unless it is already a tuple)."""
  return w if isinstance(w, tuple) else (w,)


def _tree_map(fn, *trees: dict) -> dict:
  return {name: fn(*(t[name] for t in trees)) for name in trees[0]}


@dataclasses.dataclass(frozen=True)
class Decay:
  """W_t = α_t ⊙ W_{t−1} − η_t ⊙ ∇ℓ(W_{t−1}) (multiplicative decay, "forget gate")."""

  lag = False
  boundary_read = False

  def gradient_point(self, s: dict) -> dict:
    return s

  scaled = False  # whether read_scale depends on the state

  def read_scale(self, s: dict) -> dict:
    """Each layer's s₀ with W = s₀·S; a layer may be a tuple of blocks (the Pallas kernels tile the hidden axis)."""
    return {name: self.scale_from(sum(self.scale_terms(a) for a in _blocks(w))) for name, w in s.items()}

  def scale_terms(self, block: jax.Array) -> jax.Array:
    """One block's share of the sum that sets a layer's s₀ (kernels that walk a state block by block add them)."""
    return jnp.sum(self.scale_term_rows(block))

  def scale_term_rows(self, block: jax.Array) -> jax.Array:
    """:meth:`scale_terms` before the sum over the block's rows, [rows] (kernels that sum the rows themselves)."""
    return jnp.zeros(block.shape[:-1], block.dtype)

  def scale_from(self, total: jax.Array) -> jax.Array:
    """s₀ from the summed :meth:`scale_terms` of a layer's blocks."""
    return jnp.ones_like(total)

  def close(self, s: dict) -> dict:
    return s

  @property
  def maps_chunk_end(self) -> bool:
    """Whether :meth:`close` is more than the identity (elastic net's threshold), so the closed state is not the
    chunk's linear sum."""
    return type(self).close is not Decay.close


@dataclasses.dataclass(frozen=True)
class LqNorm(Decay):
  """A_t = α_t ⊙ A_{t−1} − η_t ⊙ ∇ℓ(W_{t−1}); W_t = A_t / ‖A_t‖_q^{q−2} (per weight tensor)."""

  q: float = 4.0
  boundary_read = True

  scaled = True

  def scale_term_rows(self, block: jax.Array) -> jax.Array:
    # s₀ = ‖A‖_q^{−(q−2)} = (Σ|a|^q)^{−(q−2)/q}; an integer q is a product of multiplies, not exp(q·log|a|) per entry
    a = jnp.abs(block)
    return jnp.sum(jax.lax.integer_pow(a, int(self.q)) if float(self.q).is_integer() else a ** self.q, axis=-1)

  def scale_from(self, total: jax.Array) -> jax.Array:
    return jnp.exp(-(self.q - 2.0) / self.q * jnp.log(total))

  def gradient_point(self, s: dict) -> dict:
    return _tree_map(lambda a, c: a * c, s, self.read_scale(s))


@dataclasses.dataclass(frozen=True)
class ElasticNet(Decay):
  """W_t = S_γ(α_t ⊙ W_{t−1} − η_t ⊙ ∇ℓ(W_{t−1})), S_γ(z) = sign(z)·max(|z| − γ, 0)."""

  threshold: float = 1e-4
  boundary_read = True

  def close(self, s: dict) -> dict:
    return {name: jnp.sign(w) * jnp.maximum(jnp.abs(w) - self.threshold, 0.0) for name, w in s.items()}


@dataclasses.dataclass(frozen=True)
class SoftmaxKL(Decay):
  """W_t = Softmax_rows(α_t ⊙ log max(W_{t−1}, clamp) − η_t ⊙ ∇ℓ(W_{t−1})); rows of W lie on the simplex."""

  clamp: float = 1e-6
  lag = True
  boundary_read = True

  def lag_step(self, s: dict, grad: dict, alpha: dict, eta: dict) -> dict:
    """The exact step from ``s`` with its gradient ``grad`` at ``s``; alpha/eta broadcast per layer."""
    logits = _tree_map(lambda w, g, a, e: a * jnp.log(jnp.maximum(w, self.clamp)) - e * g, s, grad, alpha, eta)
    return {name: jax.nn.softmax(z, axis=-1) for name, z in logits.items()}


Retention = Decay | LqNorm | ElasticNet | SoftmaxKL


def exact_step(retention: Retention, s: dict, grad: dict, alpha: dict, eta: dict) -> dict:
  """One token of the exact recurrence (chunk size 1), ``grad`` taken at ``retention.gradient_point(s)``."""
  if retention.lag:
    return retention.lag_step(s, grad, alpha, eta)
  return retention.close(_tree_map(lambda w, g, a, e: a * w - e * g, s, grad, alpha, eta))
