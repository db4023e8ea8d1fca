"""ZO-SPSA in the optax shape: ``scale_by_spsa`` (the objective as an extra argument) and ``mezo_sgd``.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, Def. 1–2): with n
directions z_j (:mod:`optim.zo.directions`) and g_j = (L(θ + εz_j) − L(θ − εz_j)) / (2ε),

  ĝ = (1/n) Σ_j g_j z_j,      E[ĝ] = ∇L for Gaussian z (up to O(ε²)),
  E‖ĝ‖² = (d + n + 1)/n · ‖∇L‖² (Gaussian), (d + n − 1)/n · ‖∇L‖² (sphere of radius √d; Lemma 2).

``scale_by_spsa`` ignores the incoming updates and returns ĝ as updates; ``mezo_sgd`` = chain(scale_by_spsa,
add_decayed_weights, scale_by_learning_rate), i.e. MeZO's ``zo_update`` θ ← θ − lr(ĝ + λθ). The objective comes in
as ``update(updates, state, params, obj_fn=f)`` (the name optax PR #1712 uses), like ``optax.contrib.sophia``.

This path is functional: ĝ is a tree as large as θ, so its peak is about 2|Θ| plus activations. The training
regime (:mod:`optim.zo.regime`) uses the fused round of :mod:`optim.zo.rounds` instead, whose peak is that of
inference. ``optax.MultiSteps`` cannot accumulate ZO steps (they ignore gradients): an update without ``obj_fn``
raises. Parameters narrower than float32 raise unless ``allow_low_precision`` (ε is below bf16 resolution).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.zo.directions import DISTRIBUTIONS, direction
from optim.zo.rounds import RoundSpec, check_precision, projected_gradients


class SPSAState(NamedTuple):
  """State of :func:`scale_by_spsa`.

  Attributes:
    count: int32 [], steps taken (the t of the directions).
    projected_grads: float32 [n], the last step's g_j (what a worker would send).
  """

  count: jax.Array
  projected_grads: jax.Array


def scale_by_spsa(eps: float = 1e-3, num_samples: int = 1, distribution: str = "gaussian", seed: int = 0,
                  worker_id: int = 0, allow_low_precision: bool = False) -> optax.GradientTransformationExtraArgs:
  """The n-SPSA estimate ĝ = (1/n) Σ_j g_j z_j of the gradient of ``obj_fn`` at ``params`` (module docstring).

  Args:
    eps: ε, the perturbation scale.
    num_samples: n, directions per step.
    distribution: ``gaussian``, ``rademacher`` or ``sphere``.
    seed: the root key's seed; step t, ``worker_id`` and sample j select the direction.
    worker_id: this worker's id w in z(t, w, j).
    allow_low_precision: run on bf16/fp16 params although θ ± εz may round back to θ.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update(updates, state, params, obj_fn=f)`` ignores ``updates``
    and calls ``f(params) -> scalar`` 2n times.

  Example:
    >>> tx = scale_by_spsa(num_samples=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, obj_fn=loss)   # updates ≈ ∇loss(params)

  References:
    Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333.
    Spall, "Multivariate stochastic approximation using a simultaneous perturbation gradient approximation", 1992.
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)} (got {distribution!r})")
  if num_samples < 1 or (isinstance(eps, (int, float)) and eps <= 0):
    raise ValueError(f"num_samples must be >= 1 and eps > 0 (got {num_samples}, {eps})")
  spec = RoundSpec(eps=eps, num_samples=num_samples, distribution=distribution)

  def init_fn(params):
    check_precision(params, allow_low_precision)
    return SPSAState(count=jnp.zeros([], jnp.int32), projected_grads=jnp.zeros([num_samples], jnp.float32))

  def update_fn(updates, state, params=None, *, obj_fn: Callable[[Any], jax.Array] | None = None, **extra_args):
    del updates, extra_args
    if obj_fn is None or params is None:
      raise ValueError("scale_by_spsa needs the objective and the params: update(updates, state, params, "
                       "obj_fn=f); it ignores gradients, so optax.MultiSteps cannot accumulate it")
    check_precision(params, allow_low_precision)
    root = jax.random.key(seed)
    g, _ = projected_gradients(lambda p: (obj_fn(p), ()), params, root, state.count, worker_id, spec)

    def accumulate(j, total):
      z = direction(params, root, state.count, worker_id, j, distribution)
      return jax.tree.map(lambda t, d: t + (g[j] / num_samples) * d, total, z)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    estimate = jax.lax.fori_loop(0, num_samples, accumulate, zeros)
    estimate = jax.tree.map(lambda e, p: e.astype(p.dtype), estimate, params)
    return estimate, SPSAState(count=optax.safe_increment(state.count), projected_grads=g)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mezo_sgd(learning_rate: optax.ScalarOrSchedule, eps: float = 1e-3, num_samples: int = 1,
             weight_decay: float = 0.0, wd_mask: Any = None, distribution: str = "gaussian", seed: int = 0,
             worker_id: int = 0, allow_low_precision: bool = False) -> optax.GradientTransformationExtraArgs:
  """MeZO's SGD: θ ← θ − lr·(ĝ + λθ), ĝ from :func:`scale_by_spsa`.

  Args:
    learning_rate: lr, a float or schedule.
    eps, num_samples, distribution, seed, worker_id, allow_low_precision: as :func:`scale_by_spsa`.
    weight_decay: λ; wd_mask: where it applies (default: leaves with ndim ≥ 2, so not biases or norm weights, as
      MeZO's ``zo_update``).

  Returns:
    ``update(updates, state, params, obj_fn=f)`` as :func:`scale_by_spsa`.

  Example:
    >>> tx = mezo_sgd(1e-3, num_samples=16)
    >>> updates, state = tx.update(None, tx.init(params), params, obj_fn=loss)
    >>> params = optax.apply_updates(params, updates)

  References:
    Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, Alg. 1.
  """
  mask = wd_mask if wd_mask is not None else (lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  return optax.chain(
      scale_by_spsa(eps, num_samples, distribution, seed, worker_id, allow_low_precision),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))
