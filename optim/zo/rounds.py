"""One ZO-SPSA round: projected gradients from forward passes only, their codes, and the update every worker applies.

MeZO-SPSA (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, Def. 1–2 and
Alg. 1) with the Just One Byte exchange (Zelikman et al., arXiv 2306.10015). In round t, worker w estimates, for
each of its S samples j, the directional derivative along z = z(t, w, j) (:mod:`optim.zo.directions`)

  g[w, j] = (L(θ + εz; B_w) − L(θ − εz; B_w)) / (2ε)                        (central difference, batch B_w)

encodes it (:mod:`optim.zo.codec`) and sends only the code. Every worker then applies the decoded values ĝ of the
active workers A in the canonical order (w ascending, then j):

  θ ← θ − lr·λ·θ   (weight decay λ on ``wd_mask`` leaves)
  for w in A, j < S:  θ ← θ + c[w, j] · z(t, w, j),   c[w, j] = −lr · κ_N · ĝ[w, j],   N = |A|·S

with κ_N = 1/N (``normalize='mean'``: one worker with S samples is MeZO's n-SPSA) or 1/√N (``'sqrt'``, the
reference ``apply_all_grads``). ε never enters the update, so a round is replayed from (t, lr, active ids, codes)
alone (:mod:`optim.zo.ledger`).

Memory: θ is never modified to evaluate L(θ ± εz); the perturbed leaves are temporaries that XLA computes next to
the layer that reads them, so "restoring" θ is exact by construction (MeZO's in-place θ += εz, −2εz, +εz is not
bit-exact in floating point: MeZO issue #42). The update regenerates each leaf's z where it is added, so no
direction, gradient or optimizer state is ever stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optim.zo.codec import get_codec
from optim.zo.directions import direction, direction_scale, leaf_draw, leaf_ids, sample_key
from optim.zo.perturb import call_perturbed

NORMALIZATIONS = ("mean", "sqrt")
# Every loop of a step draws z from a per-iteration key, but the counters threefry derives from a leaf's shape do
# not depend on the key, and XLA's loop-invariant code motion hoists them out of the loops: two uint32 arrays per
# distinct leaf shape would then stay alive through the whole step. (Measured on CPU, tiny preset: 1.9 → 0.8 MiB of
# temporaries in the update loop.)
STEP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
LOW_PRECISION_MESSAGE = ("ZO-SPSA needs float32 parameters: ε = 1e-3 is below the resolution of {dtype} near 1, "
                         "so θ ± εz rounds back to θ; pass allow_low_precision=True to run anyway")


class RoundSpec(NamedTuple):
  """The static settings of a round (hashable, so jitted functions close over them).

  Attributes:
    eps: ε, the perturbation scale.
    num_samples: S, directions per worker per round.
    distribution: ``gaussian``, ``rademacher`` or ``sphere``.
    codec: ``log8``, ``job9`` or ``f32``.
    normalize: ``mean`` (κ_N = 1/N) or ``sqrt`` (1/√N).
    weight_decay: λ, decoupled weight decay per round (times lr) on ``wd_mask`` leaves.
  """

  eps: float = 1e-3
  num_samples: int = 1
  distribution: str = "gaussian"
  codec: str = "log8"
  normalize: str = "mean"
  weight_decay: float = 0.0


def check_precision(params: Any, allow_low_precision: bool) -> None:
  """Raise ``ValueError`` if a floating leaf of ``params`` is narrower than float32 and that is not allowed."""
  if allow_low_precision:
    return
  for leaf in jax.tree.leaves(params):
    dtype = jnp.dtype(leaf.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
      raise ValueError(LOW_PRECISION_MESSAGE.format(dtype=dtype.name))


def perturbed(params: Any, ids: Any, key: jax.Array, scale: jax.Array, signed_eps: Any,
              distribution: str) -> Any:
  """θ + (±ε)·z as a new tree (θ untouched): leaf by leaf, ``p + signed_eps * (scale * draw)`` in float32, cast
  back to the leaf's dtype."""

  def leaf(p, i):
    z = scale * leaf_draw(key, i, p.shape, distribution)
    return (p.astype(jnp.float32) + signed_eps * z).astype(p.dtype)

  return jax.tree.map(leaf, params, ids)


def perturbed_loss(loss_fn: Callable[[Any], Any], params: Any, ids: Any, key: jax.Array, scale: jax.Array,
                   signed_eps: Any, distribution: str) -> Any:
  """``loss_fn(perturbed(params, ...))`` with each perturbed leaf built where the forward pass reads it
  (:func:`optim.zo.perturb.call_perturbed`): the same values, the memory of inference plus about one leaf."""
  id_list = jax.tree.leaves(ids)

  def leaf(index, p, token):
    k, s = token
    z = s * leaf_draw(k, id_list[index], p.shape, distribution)
    return (p.astype(jnp.float32) + signed_eps * z).astype(p.dtype)

  return call_perturbed(loss_fn, params, leaf, (key, scale))


def projected_gradients(loss_fn: Callable[[Any], tuple[jax.Array, Any]], params: Any, root: jax.Array,
                        step: Any, worker: Any, spec: RoundSpec) -> tuple[jax.Array, Any]:
  """(g float32 [S], aux): the central differences of ``loss_fn`` along the worker's S directions.

  ``loss_fn(params) -> (scalar loss, aux pytree)``; ``aux`` is returned averaged over the 2S evaluations, which run
  in one ``lax.scan`` so the forward pass and each leaf's draw are compiled once."""
  ids = leaf_ids(params)

  def evaluation(_, e):
    # Evaluation e is sample j = e // 2 at +ε (e even) or −ε (e odd): one forward pass and one draw per leaf in
    # the compiled loop. The key depends on e, so no loop transformation can share z across evaluations (which
    # would keep every leaf's z alive).
    key = sample_key(root, step, worker, e // 2)
    scale = direction_scale(key, ids, params, spec.distribution)
    signed_eps = jnp.where(e % 2 == 0, jnp.float32(spec.eps), -jnp.float32(spec.eps))
    loss, aux = perturbed_loss(loss_fn, params, ids, key, scale, signed_eps, spec.distribution)
    return None, (loss.astype(jnp.float32), aux)

  _, (losses, aux) = jax.lax.scan(evaluation, None, jnp.arange(2 * spec.num_samples, dtype=jnp.int32))
  g = (losses[0::2] - losses[1::2]) / jnp.float32(2 * spec.eps)
  return g, jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)


def update_coefficients(values: jax.Array, active: jax.Array, lr: jax.Array, normalize: str) -> jax.Array:
  """c float32 [W, S] = −lr·κ_N·ĝ for active workers' rows, 0 for the others (N = active workers × S)."""
  n = jnp.sum(active.astype(jnp.float32)) * values.shape[1]
  kappa = 1.0 / jnp.maximum(n, 1.0) if normalize == "mean" else jax.lax.rsqrt(jnp.maximum(n, 1.0))
  return jnp.where(active[:, None], -(lr * kappa) * values, 0.0)


def decay(params: Any, lr: jax.Array, weight_decay: float, wd_mask: Any) -> Any:
  """θ − (lr·λ)·θ on the leaves ``wd_mask`` (a tree of bools like ``params``) selects."""
  if not weight_decay:
    return params
  rate = lr * weight_decay
  return jax.tree.map(lambda p, m: (p - rate * p).astype(p.dtype) if m else p, params, wd_mask)


def apply_round(params: Any, values: jax.Array, active: jax.Array, lr: jax.Array, root: jax.Array, step: Any,
                spec: RoundSpec, wd_mask: Any = None) -> Any:
  """The round's update (module docstring): every active (w, j) in ascending order, each leaf's z regenerated
  where it is added.

  Args:
    params: θ (donate it: the loop updates it in place).
    values: float32 [W, S], the decoded ĝ of every worker (rows of inactive workers are ignored).
    active: bool [W]; lr: float32 []; root: the run's root key; step: t (int32 []).
    spec: the round's settings; wd_mask: bools like ``params`` (default: every leaf with ndim ≥ 2).
  """
  num_workers, num_samples = values.shape
  ids = leaf_ids(params)
  coefficients = update_coefficients(values, active, lr, spec.normalize)
  mask = wd_mask if wd_mask is not None else jax.tree.map(lambda p: np.ndim(p) >= 2, params)
  params = decay(params, lr, spec.weight_decay, mask)

  def entry(e, theta):
    w, j = e // num_samples, e % num_samples
    key = sample_key(root, step, w, j)

    def add(theta):
      scale = direction_scale(key, ids, theta, spec.distribution)
      c = coefficients[w, j]
      leaves, treedef = jax.tree.flatten(theta)
      updated, previous = [], ()
      for p, i in zip(leaves, jax.tree.leaves(ids)):
        # Each leaf's z is drawn after the previous leaf is updated, so one z exists at a time.
        p, k, _ = jax.lax.optimization_barrier((p, key, previous))
        updated.append((p + c * (scale * leaf_draw(k, i, p.shape, spec.distribution))).astype(p.dtype))
        previous = updated[-1]
      return jax.tree.unflatten(treedef, updated)

    return jax.lax.cond(active[w], add, lambda theta: theta, theta)

  return jax.lax.fori_loop(0, num_workers * num_samples, entry, params)


def apply_round_reference(params: Any, values: np.ndarray, active: np.ndarray, lr: float, root: jax.Array,
                          step: int, spec: RoundSpec, wd_mask: Any = None) -> Any:
  """:func:`apply_round` written plainly: whole directions from :func:`optim.zo.directions.direction`, a Python
  loop over the active entries, one jitted elementwise update per entry (the slow, obviously-correct path)."""
  values, active = np.asarray(values, np.float32), np.asarray(active, bool)
  coefficients = update_coefficients(jnp.asarray(values), jnp.asarray(active), jnp.float32(lr), spec.normalize)
  mask = wd_mask if wd_mask is not None else jax.tree.map(lambda p: np.ndim(p) >= 2, params)
  params = jax.jit(lambda p, rate: decay(p, rate, spec.weight_decay, mask))(params, jnp.float32(lr))
  add = jax.jit(lambda theta, c, z: jax.tree.map(lambda p, d: (p + c * d).astype(p.dtype), theta, z))
  for w in np.flatnonzero(active):
    for j in range(values.shape[1]):
      z = direction(params, root, step, int(w), j, spec.distribution)
      params = add(params, coefficients[w, j], z)
  return params


class RoundOutput(NamedTuple):
  """What a round hands to the host.

  Attributes:
    codes: uint8 [W, S, num_bytes], every worker's codes in canonical order.
    nonfinite: int32 [], codes of active workers that marked a non-finite value (decoded to zero).
    aux: the loss function's aux, averaged over this worker's evaluations.
  """

  codes: jax.Array
  nonfinite: jax.Array
  aux: Any


def zo_round(params: Any, loss_fn: Callable[[Any], tuple[jax.Array, Any]], root: jax.Array, step: jax.Array,
             worker: Any, lr: jax.Array, active: jax.Array, spec: RoundSpec,
             gather: Callable[[jax.Array], jax.Array], wd_mask: Any = None) -> tuple[Any, RoundOutput]:
  """Estimate → encode → exchange (``gather``: this worker's [S, b] codes -> everyone's [W, S, b]) → decode →
  apply. Returns (θ after the round, :class:`RoundOutput`)."""
  codec = get_codec(spec.codec)
  g, aux = projected_gradients(loss_fn, params, root, step, worker, spec)
  codes = gather(codec.encode(g))
  values, bad = codec.decode(codes)
  nonfinite = jnp.sum(bad & active[:, None]).astype(jnp.int32)
  params = apply_round(params, values, active, lr, root, step, spec, wd_mask)
  return params, RoundOutput(codes, nonfinite, aux)


def zo_step(loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]], schedule: Callable[[jax.Array], jax.Array],
            spec: RoundSpec, seed: int = 0, wd_mask: Any = None) -> Callable:
  """The donated, jitted step of one worker: ``step(state, batch) -> (state, RoundOutput)``.

  Args:
    loss_fn: ``(params, batch) -> (scalar loss, aux)``, evaluated forward only.
    schedule: round t -> learning rate.
    spec: the round's settings; seed: the root key's seed; wd_mask: as :func:`apply_round`.

  ``state`` is ``{"params": θ, "round": int32 t}`` and is donated: θ is updated in place, and the step's peak is
  that of one forward pass plus about one perturbed leaf (:func:`perturbed_loss`).
  """
  root = jax.random.key(seed)

  def step(state, batch):
    t = state["round"]
    lr = jnp.asarray(schedule(t), jnp.float32)
    params, out = zo_round(state["params"], lambda p: loss_fn(p, batch), root, t, 0, lr, jnp.ones(1, bool), spec,
                           lambda codes: codes[None], wd_mask)
    return {"params": params, "round": t + 1}, out

  return jax.jit(step, donate_argnums=0, compiler_options=STEP_COMPILER_OPTIONS)
