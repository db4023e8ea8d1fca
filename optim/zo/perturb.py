"""Evaluate ``f(θ + δ(θ))`` with each perturbed leaf made where it is read, so that only a leaf or two exist at once.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, §2) gets the
memory of inference by perturbing θ in place, which is not bit-exact to undo in floating point (MeZO issue #42).
Perturbing functionally, ``f(jax.tree.map(perturb, θ))``, is exact but hands XLA a whole perturbed copy of θ: its
scheduler may (and on CPU does) compute every perturbed leaf before the first layer runs.

:func:`call_perturbed` instead traces ``f`` to a jaxpr over the leaves of θ and evaluates it equation by equation.
A value computed from leaves alone (a leaf, its cast or transpose) stays *lazy*: it is rebuilt at each equation
that combines it with anything else (an activation), from the raw leaves passed through
``lax.optimization_barrier`` together with that equation's other inputs and the perturbation's key. The barrier
makes the perturbed leaf depend on the activation it meets (and on the output of the previous equation that read
a perturbed leaf, so two are never built side by side), so XLA cannot compute it earlier; rebuilding it per use
(the same bits every time) keeps a leaf read twice (a tied embedding) from living across the whole forward pass.
Peak memory is then that of the forward pass plus the largest perturbed leaf (or the leaves one equation reads).

Nested calls (``pjit``, ``custom_jvp``, ...) are bound as single equations, so the granularity is the outer
jaxpr's equations; a leaf never read by ``f`` is never perturbed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.extend import core

_DROP_VAR = getattr(core, "DropVar", ())  # outputs nobody reads (a write to them is harmless where it is missing)


class _Lazy(NamedTuple):
  """A value computed from parameter leaves only: the equation (None for a leaf itself) and its inputs."""

  eqn: Any
  inputs: tuple[Any, ...]
  leaf: int | None = None


def call_perturbed(fn: Callable[[Any], Any], params: Any, perturb_leaf: Callable[[int, jax.Array, Any], jax.Array],
                   token: Any) -> Any:
  """``fn(params')`` where ``params'`` leaf i is ``perturb_leaf(i, params leaf i, token)``, built where read.

  Args:
    fn: a function of the parameter tree (its other inputs closed over).
    params: the parameter tree (arrays or tracers).
    perturb_leaf: ``(leaf index in jax.tree.leaves order, raw leaf, token) -> perturbed leaf`` (same shape/dtype).
    token: a pytree (e.g. the direction's key and scale) that goes through the barrier with each leaf, so the
      perturbation computed from it is not shared between uses either.
  """
  leaves, treedef = jax.tree.flatten(params)
  closed, out_shape = jax.make_jaxpr(lambda *xs: fn(jax.tree.unflatten(treedef, xs)), return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts))
  env.update({v: _Lazy(None, (), i) for i, v in enumerate(jaxpr.invars)})

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  def force(value, anchor):
    """The concrete value of ``value`` (lazy or not); lazy leaves pass the barrier with ``anchor`` first."""
    if not isinstance(value, _Lazy):
      return value
    if value.eqn is None:
      raw, tok = leaves[value.leaf], token
      if anchor:
        raw, tok, _ = jax.lax.optimization_barrier((raw, tok, anchor))
      return perturb_leaf(value.leaf, raw, tok)
    return _bind(value.eqn, [force(x, anchor) for x in value.inputs], multiple=True)[0]

  previous: list[Any] = []  # outputs of the last equation that read perturbed leaves
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    lazy = [isinstance(x, _Lazy) for x in inputs]
    if inputs and all(lazy) and not eqn.effects and len(eqn.outvars) == 1:  # leaves only: build it where used
      env[eqn.outvars[0]] = _Lazy(eqn, tuple(inputs))
      continue
    anchor = [x for x, is_lazy in zip(inputs, lazy) if not is_lazy and isinstance(x, jax.Array)] + previous
    outs = _bind(eqn, [force(x, anchor) for x in inputs], multiple=True)
    if any(lazy):  # the next perturbed leaf waits for this equation: one at a time, whatever the scheduler
      previous = [o for o in outs if isinstance(o, jax.Array)]
    for v, out in zip(eqn.outvars, outs):
      if not isinstance(v, _DROP_VAR):
        env[v] = out
  outs = [force(read(v), []) for v in jaxpr.outvars]
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _bind(eqn, inputs: list[Any], multiple: bool = False) -> Any:
  """``eqn``'s primitive applied to ``inputs`` (as ``jax.core.eval_jaxpr`` does)."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # jax < 0.12 returns (subfuns, params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *inputs, **params)
  if multiple:
    return out if eqn.primitive.multiple_results else [out]
  return out
