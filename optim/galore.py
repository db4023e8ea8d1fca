"""GaLore (gradient low-rank projection) as Optax transforms, paper-faithful, with what optax.contrib lacks.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv:2403.03507, Alg. 2.
For a projected weight W viewed as a matrix [m, n] (see :mod:`optim.galore_projection`), step t (0-based):

  G = ∇W;  if refresh due at t: P, Q = top-r singular vectors of float32 G (thin SVD)
  R = Pᵀ G [r, n] | G Q [m, r] | Pᵀ G Q [r, r];  N = base_optimizer(R)  (Adam by default, in the subspace)
  ΔW = α · (P N | N Qᵀ | P N Qᵀ)                              (α = ``scale``, 0.25 in every paper run)

Refresh is due at t mod T == 0 (``update_proj_gap`` T = 200); with ``stagger_refresh`` leaf i of L refreshes at
(t − ⌊iT/L⌋) mod T == 0 (and all at t = 0) to flatten the SVD spike. Each projected leaf has its own base
optimizer state, so ``on_refresh='reset'`` can restart its moments *and* bias correction in the new subspace.

Optimizer state of a projected [m, n] leaf at rank r with Adam (``side='std'``, m <= n): projector m·r + moments
2·r·n entries, against AdamW's 2·m·n (paper §4.2). Differences from ``optax.contrib.galore``: the paper's
parameter selection (attention/MLP matrices only; embeddings, head and norms get full-rank Adam), α = 0.25,
a choice of side (optax always projects the larger side, = ``'reverse_std'``), refresh moment policies,
Natural GaLore, staggered refresh and a selectable SVD algorithm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from optim.galore_projection import (SIDES, SVD_ALGORITHMS, DimensionNumbersFn, LeafProjection,
                                     default_dimension_numbers, replicated, sharded_like)

ON_REFRESH = ("keep", "reset", "reproject")
SELECTIONS = ("paper", "all_2d")
# The paper projects the attention and MLP matrices (torchrun_main.py: module names containing "attn" or
# "mlp"); memlab blocks call their attention (or any sequence mixer) "mixer".
PAPER_KEYWORDS = ("attn", "attention", "mlp", "mixer")
GALORE_LABEL, FULL_RANK_LABEL = "galore", "full_rank"


class LowRankPreconditioner(Protocol):
  """What :func:`scale_by_galore` needs of a preconditioner of the low-rank gradient (Natural GaLore's
  :class:`optim.natural_galore.NaturalGaLore` is one): a history of past low-rank gradients and a solve."""

  history: int  # rows of the per-leaf history ring (0: none)
  on_refresh: str  # "reset" clears the history when the projector changes, "keep" keeps it

  def precondition(self, g: jax.Array, history: jax.Array | None, slot: jax.Array) -> jax.Array:
    """g float32 [k] (row ``slot`` of history [s, k]) -> the preconditioned gradient [k]."""
    ...


class ScaleByGaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`; every field but ``count`` mirrors the parameter tree.

  Attributes:
    count: int32 [], steps taken.
    left: per projected leaf with a left projector, P [m, r]; ``optax.MaskedNode()`` elsewhere.
    right: per projected leaf with a right projector, Q [n, r]; ``MaskedNode()`` elsewhere.
    history: per projected leaf under Natural GaLore, float32 [s, k] past low-rank gradients; else ``MaskedNode()``.
    base_state: per leaf, the base optimizer's state over its low-rank gradient (or full gradient when the leaf
      is not projected).
  """

  count: jax.Array
  left: optax.Params
  right: optax.Params
  history: optax.Params
  base_state: optax.Params


def path_name(path: tuple[Any, ...]) -> str:
  """Key path -> ``'blocks/0/mixer/q_proj/kernel'``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [path_name(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def _plans(paths: list[str], leaves: list[Any], dimension_numbers: DimensionNumbersFn, side: str, rank: int,
           gap: int, stagger: bool) -> list[LeafProjection | None]:
  dims = [dimension_numbers(p, leaf) for p, leaf in zip(paths, leaves, strict=True)]
  projected = [i for i, d in enumerate(dims) if d is not None]
  plans: list[LeafProjection | None] = [None] * len(leaves)
  for j, i in enumerate(projected):
    offset = (j * gap) // len(projected) if stagger else 0
    plans[i] = LeafProjection.build(tuple(leaves[i].shape), dims[i], side, rank, offset)
  return plans


def _or_none(x: Any) -> Any:
  return None if isinstance(x, optax.MaskedNode) else x


def _or_masked(x: Any) -> Any:
  return optax.MaskedNode() if x is None else x


def _reproject(state: Any, plan: LeafProjection, old: tuple, new: tuple) -> Any:
  """Rotate every moment of a base state into the new subspace; leaves under a ``nu`` field are second moments."""

  def rotate(path, x):
    if not hasattr(x, "shape") or tuple(x.shape) != plan.low_rank_shape:
      return x
    squared = any(getattr(k, "name", None) == "nu" for k in path)
    return plan.rotate(x, old, new, squared)

  return jax.tree_util.tree_map_with_path(rotate, state)


def scale_by_galore(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, side: str = "std",
                    base_optimizer: optax.GradientTransformation | None = None, on_refresh: str = "keep",
                    natural: LowRankPreconditioner | None = None, dimension_numbers: DimensionNumbersFn | None = None,
                    projector_dtype: Any = None, stagger_refresh: bool = False,
                    svd_algorithm: str | None = "auto") -> optax.GradientTransformation:
  """GaLore's update direction: project, run ``base_optimizer`` in the subspace, project back, scale by α.

  Leaves without dimension numbers (by default every leaf that is not 2-D) get ``base_optimizer`` on their full
  gradient, unscaled. Use :func:`galore` for the paper's parameter selection, weight decay and learning rate.

  Args:
    rank: r; clipped to min(m, n) per leaf.
    update_proj_gap: T, steps between projector refreshes (static int).
    scale: α applied to projected leaves' updates.
    side: ``'std'`` (paper: projector on the smaller side), ``'reverse_std'`` (larger side, as optax),
      ``'left'``, ``'right'`` or ``'full'`` (both sides); see :func:`optim.galore_projection.resolve_side`.
    base_optimizer: a transform that needs no params (it sees low-rank shapes); default
      ``optax.scale_by_adam(eps=1e-8)``.
    on_refresh: what happens to a leaf's base state when its projector is refreshed: ``'keep'`` (both papers
      and references), ``'reset'`` (re-initialise it, bias correction included) or ``'reproject'`` (rotate the
      moments into the new basis; second moments through squared coefficients) [deviation].
    natural: :class:`optim.natural_galore.NaturalGaLore` to precondition the low-rank gradient with the
      empirical Fisher before ``base_optimizer``; ``None`` for plain GaLore.
    dimension_numbers: ``fn(path, leaf) -> optax.contrib.GaLoreDimensionNumbers | None`` mapping a leaf to a
      matrix (reduction axes -> rows, output axes -> columns); ``None`` leaves it unprojected. Default: 2-D
      leaves as (0, 1).
    projector_dtype: dtype of stored projectors; ``None`` = the leaf's dtype. The SVD runs in float32.
    stagger_refresh: spread leaf refreshes over the T steps instead of all at t mod T == 0.
    svd_algorithm: ``'auto'`` (polar on GPU, JAX's default elsewhere), ``None`` (JAX's default), ``'qr'``,
      ``'jacobi'``, ``'polar'`` or ``'divide_and_conquer'``; all compute the exact thin SVD.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByGaLoreState`.

  References:
    Zhao et al., arXiv:2403.03507, Alg. 2.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int (got {rank!r})")
  if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
    raise ValueError(f"update_proj_gap must be a positive int (got {update_proj_gap!r})")
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES} (got {side!r})")
  if on_refresh not in ON_REFRESH:
    raise ValueError(f"on_refresh must be one of {ON_REFRESH} (got {on_refresh!r})")
  if svd_algorithm not in SVD_ALGORITHMS:
    raise ValueError(f"svd_algorithm must be one of {tuple(SVD_ALGORITHMS)} (got {svd_algorithm!r})")
  base = optax.scale_by_adam(eps=1e-8) if base_optimizer is None else base_optimizer
  dims_fn = default_dimension_numbers if dimension_numbers is None else dimension_numbers
  history = 0 if natural is None else natural.history
  plan_leaves = functools.partial(_plans, dimension_numbers=dims_fn, side=side, rank=rank, gap=update_proj_gap,
                                  stagger=stagger_refresh)

  def init_fn(params):
    paths, leaves, treedef = _flatten(params)
    left, right, hist, base_states = [], [], [], []
    for leaf, plan in zip(leaves, plan_leaves(paths, leaves), strict=True):
      if plan is None:
        left.append(optax.MaskedNode())
        right.append(optax.MaskedNode())
        hist.append(optax.MaskedNode())
        base_states.append(base.init(leaf))
        continue
      dtype = projector_dtype or leaf.dtype
      left.append(jnp.zeros((plan.m, plan.rank), dtype) if plan.uses_left else optax.MaskedNode())
      right.append(jnp.zeros((plan.n, plan.rank), dtype) if plan.uses_right else optax.MaskedNode())
      size = plan.low_rank_shape[0] * plan.low_rank_shape[1]
      hist.append(jnp.zeros((history, size), jnp.float32) if history else optax.MaskedNode())
      base_states.append(base.init(jnp.zeros(plan.low_rank_shape, leaf.dtype)))
    unflatten = functools.partial(jax.tree.unflatten, treedef)
    return ScaleByGaLoreState(jnp.zeros([], jnp.int32), unflatten(left), unflatten(right), unflatten(hist),
                              unflatten(base_states))

  def update_leaf(plan, g, left, right, hist, base_state, count):
    g2 = plan.to_matrix(g)
    # The low-rank state is kept replicated, so both branches of the refresh `cond` agree on sharding types.
    old = jax.tree.map(replicated, (_or_none(left), _or_none(right)))
    hist = jax.tree.map(replicated, _or_none(hist))
    base_state = jax.tree.map(replicated, base_state)
    dtype = projector_dtype or (left if old[0] is not None else right).dtype

    def refresh():
      new = plan.projectors(g2, dtype, svd_algorithm)
      state = base_state
      if on_refresh == "reset":
        fresh = base.init(jnp.zeros(plan.low_rank_shape, g.dtype))
        state = jax.tree.map(lambda f, c: f.astype(c.dtype), fresh, base_state)
      elif on_refresh == "reproject":
        state = _reproject(base_state, plan, old, new)
      h = jnp.zeros_like(hist) if hist is not None and natural.on_refresh == "reset" else hist
      return new, state, h

    due = (count == 0) | ((count - plan.refresh_offset) % update_proj_gap == 0)
    (new_left, new_right), base_state, hist = jax.lax.cond(due, refresh, lambda: (old, base_state, hist))
    low_rank = plan.project(g2, new_left, new_right).astype(g.dtype)
    if natural is not None:
      flat = low_rank.reshape(-1).astype(jnp.float32)
      slot = count % max(history, 1)
      if hist is not None:
        hist = hist.at[slot].set(flat)
      low_rank = natural.precondition(flat, hist, slot).reshape(low_rank.shape).astype(g.dtype)
    direction, base_state = base.update(low_rank, base_state, None)
    update = (scale * plan.from_matrix(plan.project_back(direction, new_left, new_right))).astype(g.dtype)
    update = sharded_like(update, g)
    return update, _or_masked(new_left), _or_masked(new_right), _or_masked(hist), base_state

  def update_fn(updates, state, params=None):
    del params  # the base optimizer works on low-rank shapes; weight decay is applied by `galore` in full space
    paths, grads, treedef = _flatten(updates)
    per_leaf = [treedef.flatten_up_to(tree) for tree in (state.left, state.right, state.history,
                                                         state.base_state)]
    results = []
    for g, plan, left, right, hist, base_state in zip(grads, plan_leaves(paths, grads), *per_leaf, strict=True):
      if plan is None:
        update, base_state = base.update(g, base_state, None)
        results.append((update, left, right, hist, base_state))
      else:
        results.append(update_leaf(plan, g, left, right, hist, base_state, state.count))
    count = optax.safe_int32_increment(state.count)
    if not results:  # every leaf masked out (e.g. under optax.partition): nothing to update
      return updates, state._replace(count=count)
    out, left, right, hist, base_states = (jax.tree.unflatten(treedef, column) for column in zip(*results, strict=True))
    return out, ScaleByGaLoreState(count, left, right, hist, base_states)

  return optax.GradientTransformation(init_fn, update_fn)


def galore_labels(params: optax.Params, select: str | Callable[[str, Any], bool] = "paper",
                  keywords: tuple[str, ...] = PAPER_KEYWORDS,
                  dimension_numbers: DimensionNumbersFn | None = None) -> optax.Params:
  """``'galore'`` / ``'full_rank'`` per leaf: which leaves :func:`galore` projects.

  ``select='paper'``: matrices (leaves with dimension numbers) whose key path contains one of ``keywords``;
  ``'all_2d'``: every matrix (as optax.contrib.galore); or ``fn(path, leaf) -> bool`` among the matrices.
  Raises ``ValueError`` if ``'paper'`` selects nothing (a model whose names do not match ``keywords``).
  """
  dims_fn = default_dimension_numbers if dimension_numbers is None else dimension_numbers
  if not (callable(select) or select in SELECTIONS):
    raise ValueError(f"select must be one of {SELECTIONS} or a callable (got {select!r})")

  def label(path, leaf):
    name = path_name(path)
    if dims_fn(name, leaf) is None:
      return FULL_RANK_LABEL
    if select == "all_2d":
      chosen = True
    elif select == "paper":
      chosen = any(k in name for k in keywords)
    else:
      chosen = select(name, leaf)
    return GALORE_LABEL if chosen else FULL_RANK_LABEL

  labels = jax.tree_util.tree_map_with_path(label, params)
  if select == "paper" and GALORE_LABEL not in jax.tree.leaves(labels):
    raise ValueError(f"select='paper' found no matrix whose path contains one of {keywords}; pass keywords=... "
                     "or select='all_2d' / a callable")
  return labels


def galore(learning_rate: optax.ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
           scale: float = 0.25, side: str = "std", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 0.0, wd_mask: Any = None, select: str | Callable[[str, Any], bool] = "paper",
           keywords: tuple[str, ...] = PAPER_KEYWORDS, base_optimizer: optax.GradientTransformation | None = None,
           full_rank_optimizer: optax.GradientTransformation | None = None, on_refresh: str = "keep",
           natural: LowRankPreconditioner | None = None, dimension_numbers: DimensionNumbersFn | None = None,
           projector_dtype: Any = None, stagger_refresh: bool = False,
           svd_algorithm: str | None = "auto") -> optax.GradientTransformation:
  """GaLore-AdamW as in the paper's runs: selected matrices get GaLore, every other leaf full-rank Adam.

  = chain(partition({selected: scale_by_galore, rest: scale_by_adam}), add_decayed_weights, scale_by_lr): the
  same learning rate for both groups and α only on projected leaves, so projected weights effectively move at
  α·lr (App. C.1: "actual learning rate of 0.0025" for lr 0.01); decoupled weight decay −lr·λ·W acts in full
  space, unprojected and unscaled by α.

  Args:
    learning_rate: scalar or ``optax.Schedule``.
    rank, update_proj_gap, scale, side, on_refresh, natural, dimension_numbers, projector_dtype,
      stagger_refresh, svd_algorithm: see :func:`scale_by_galore`.
    b1, b2, eps: Adam's, for the default ``base_optimizer`` and ``full_rank_optimizer``.
    weight_decay: λ of decoupled weight decay.
    wd_mask: optax mask (tree or ``fn(params)``) of the leaves that get weight decay; ``None`` = all.
    select, keywords: which matrices are projected, see :func:`galore_labels`.
    base_optimizer: optimizer in the low-rank space (no params); default ``scale_by_adam(b1, b2, eps)``.
    full_rank_optimizer: optimizer of the unselected leaves; default ``scale_by_adam(b1, b2, eps)``.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> params = {"mlp": {"kernel": jnp.zeros((8, 16))}, "norm": jnp.ones((16,))}
    >>> tx = galore(1e-2, rank=4)
    >>> state = tx.init(params)

  References:
    Zhao et al., arXiv:2403.03507 (Alg. 2, App. C.1).
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  projected = scale_by_galore(rank, update_proj_gap, scale, side, base_optimizer or adam, on_refresh, natural,
                              dimension_numbers, projector_dtype, stagger_refresh, svd_algorithm)
  labels = functools.partial(galore_labels, select=select, keywords=keywords, dimension_numbers=dimension_numbers)
  return optax.chain(
      optax.partition({GALORE_LABEL: projected, FULL_RANK_LABEL: full_rank_optimizer or adam}, labels),
      optax.add_decayed_weights(weight_decay, wd_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
