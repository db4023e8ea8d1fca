"""Miras axis 2, the attentional bias: the per-token inner loss ℓ(y, v) on the memory's output y = M(W; k).

"It's All Connected" (Behrouz et al., arXiv 2504.13173, §5.1, Eq. 8–17). Each bias gives the per-token ``loss``
and its closed-form output gradient ``grad`` = ∂ℓ/∂y (the memory turns it into ∇_W ℓ by backpropagation); tests
check ``grad`` against ``jax.grad(loss)``. r = y − v. Shapes: y, v [..., d]; δ [...] (one scalar per token and
head) or None; ``loss`` returns [...], ``grad`` [..., d].

  * :class:`Dot` (Hebbian, Eq. 8): −2⟨y, v⟩;
  * :class:`L2` (delta rule, Eq. 9): ‖r‖²;
  * :class:`Lp` (Moneta, Eq. 10–11): Σ_j (r_j² + ε)^{p/2}, the smoothed ‖r‖_p^p (|x| ≈ sqrt(x² + ε), §5.4; its
    exact gradient p·r·(r² + ε)^{p/2 − 1} replaces Sign(r)|r|^{p−1});
  * :class:`YaadHuber` (Yaad, Eq. 16): ‖r‖² where ‖r‖ ≤ δ, else δ·Σ_j sqrt(r_j² + ε) (δ times the smoothed ℓ1); a
    mixture, not one continuous loss: the step jumps at ‖r‖ = δ (spec §2.1);
  * :class:`HuberCoord` (Eq. 13–14): Σ_j H_δ(r_j), H_δ(a) = a²/2 if |a| ≤ δ else δ(|a| − δ/2);
  * :class:`HuberNorm` (Eq. 15): H_δ(‖r‖) (per-token gradient clipping);
  * :class:`Robust` (Eq. 17): ½‖r‖² + δ‖r‖ + ½δ², the worst case over value perturbations of norm ≤ δ.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _norm(r: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(r * r, axis=-1))


@dataclasses.dataclass(frozen=True)
class Dot:
  needs_delta = False

  def loss(self, y, v, delta=None):
    return -2.0 * jnp.sum(y * v, axis=-1)

  def grad(self, y, v, delta=None):
    return -2.0 * v + 0.0 * y


@dataclasses.dataclass(frozen=True)
class L2:
  needs_delta = False

  def loss(self, y, v, delta=None):
    return jnp.sum(jnp.square(y - v), axis=-1)

  def grad(self, y, v, delta=None):
    return 2.0 * (y - v)


@dataclasses.dataclass(frozen=True)
class Lp:
  p: float = 3.0
  eps: float = 1e-6
  needs_delta = False

  def loss(self, y, v, delta=None):
    return jnp.sum((jnp.square(y - v) + self.eps) ** (0.5 * self.p), axis=-1)

  def grad(self, y, v, delta=None):
    r = y - v
    power = 0.5 * self.p - 1.0
    # p = 3 (Moneta's) as a square root: exact, and the form Mosaic GPU kernels lower (they take no pow)
    scale = jnp.sqrt(r * r + self.eps) if power == 0.5 else (r * r + self.eps) ** power
    return self.p * r * scale


@dataclasses.dataclass(frozen=True)
class YaadHuber:
  eps: float = 1e-6
  needs_delta = True

  def loss(self, y, v, delta):
    r = y - v
    l1 = jnp.sum(jnp.sqrt(r * r + self.eps), axis=-1)
    return jnp.where(_norm(r) <= delta, jnp.sum(r * r, axis=-1), delta * l1)

  def grad(self, y, v, delta):
    r = y - v
    inside = (_norm(r) <= delta)[..., None]
    return jnp.where(inside, 2.0 * r, delta[..., None] * r * jax.lax.rsqrt(r * r + self.eps))


@dataclasses.dataclass(frozen=True)
class HuberCoord:
  needs_delta = True

  def loss(self, y, v, delta):
    a, d = jnp.abs(y - v), delta[..., None]
    return jnp.sum(jnp.where(a <= d, 0.5 * a * a, d * (a - 0.5 * d)), axis=-1)

  def grad(self, y, v, delta):
    r, d = y - v, delta[..., None]
    return jnp.where(jnp.abs(r) <= d, r, d * jnp.sign(r))


@dataclasses.dataclass(frozen=True)
class HuberNorm:
  needs_delta = True

  def loss(self, y, v, delta):
    n = _norm(y - v)
    return jnp.where(n <= delta, 0.5 * n * n, delta * (n - 0.5 * delta))

  def grad(self, y, v, delta):
    r = y - v
    n = _norm(r)[..., None]
    return jnp.where(n <= delta[..., None], r, delta[..., None] * r / jnp.maximum(n, 1e-30))


@dataclasses.dataclass(frozen=True)
class Robust:
  needs_delta = True

  def loss(self, y, v, delta):
    n = _norm(y - v)
    return 0.5 * n * n + delta * n + 0.5 * delta * delta

  def grad(self, y, v, delta):
    r = y - v
    return r + delta[..., None] * r / jnp.maximum(_norm(r)[..., None], 1e-30)


Bias = Dot | L2 | Lp | YaadHuber | HuberCoord | HuberNorm | Robust
