"""Random directions z regenerated from seeds, so that nothing but a key ever has to be stored or sent.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, Alg. 1) keeps the
direction of a step as a seed and regenerates it tensor by tensor; Just One Byte (Zelikman et al., "Just One Byte
(per gradient): A Note on Low-Bandwidth Decentralized Language Model Finetuning Using Shared Randomness",
arXiv 2306.10015) lets every worker regenerate every other worker's directions from shared seeds.

The direction of step t, worker w, sample j on the leaf with id ℓ is

  z(t, w, j, ℓ) = draw(fold_in(fold_in(fold_in(fold_in(root, t), w), j), ℓ), shape of the leaf)   in float32,

cast to the leaf's dtype where it is used. ``ℓ`` is the CRC-32 of the leaf's key path (``"['blocks'][0]['mlp']..."``),
not its position, so adding or reordering leaves leaves every other leaf's direction unchanged; two paths with the
same CRC are refused. ``draw`` is ``gaussian`` (z ~ N(0, I)), ``rademacher`` (±1) or ``sphere`` (z uniform on the
sphere of radius √d, d = parameters in the whole tree: the Gaussian draw times √d / ‖g‖, where the norm is over
every leaf, so a sphere direction costs two passes of the generator).

Values depend on the JAX/XLA version, the PRNG implementation (threefry2x32) and ``jax_threefry_partitionable``
(flipping it changes every draw); bit-identity across workers holds on one backend with one setting.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")


def leaf_ids(tree: Any) -> Any:
  """The tree with every leaf replaced by its id, the CRC-32 of its key path (a Python int in [0, 2³²)).

  Raises ``ValueError`` naming both paths if two leaves share an id."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  ids, seen = [], {}
  for path, _ in flat:
    name = jax.tree_util.keystr(path)
    leaf_id = zlib.crc32(name.encode())
    if leaf_id in seen:
      raise ValueError(f"leaves {seen[leaf_id]} and {name} share the direction id {leaf_id:#010x}; rename one")
    seen[leaf_id] = name
    ids.append(leaf_id)
  return jax.tree.unflatten(treedef, ids)


def sample_key(root: jax.Array, step: Any, worker: Any, sample: Any) -> jax.Array:
  """The key of (step t, worker w, sample j) under ``root``; each argument may be traced (int32 scalars)."""
  key = jax.random.fold_in(root, jnp.asarray(step, jnp.uint32))
  key = jax.random.fold_in(key, jnp.asarray(worker, jnp.uint32))
  return jax.random.fold_in(key, jnp.asarray(sample, jnp.uint32))


def leaf_draw(key: jax.Array, leaf_id: int, shape: tuple[int, ...], distribution: str) -> jax.Array:
  """float32 [shape]: the unscaled draw of one leaf (a sphere direction is Gaussian here, scaled by the caller)."""
  key = jax.random.fold_in(key, np.uint32(leaf_id))
  if distribution == "rademacher":
    return jax.random.rademacher(key, shape, jnp.float32)
  if distribution in ("gaussian", "sphere"):
    return jax.random.normal(key, shape, jnp.float32)
  raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)} (got {distribution!r})")


def direction_scale(key: jax.Array, ids: Any, params: Any, distribution: str) -> jax.Array:
  """float32 []: the factor that turns the leaves' draws into the direction (√d / ‖g‖ for ``sphere``, else 1).

  Args:
    key: :func:`sample_key` of the direction.
    ids: :func:`leaf_ids` of the parameter tree; params: the tree (arrays or ShapeDtypeStructs, for shapes).
  """
  if distribution != "sphere":
    return jnp.ones((), jnp.float32)
  shapes = [np.shape(p) for p in jax.tree.leaves(params)]
  squares = sum(jnp.sum(jnp.square(leaf_draw(key, i, s, distribution))) for i, s in zip(jax.tree.leaves(ids), shapes))
  d = sum(int(np.prod(s)) for s in shapes)
  return jnp.sqrt(jnp.float32(d)) * jax.lax.rsqrt(squares)


def direction(params: Any, root: jax.Array, step: Any, worker: Any, sample: Any, distribution: str) -> Any:
  """The whole direction z(t, w, j) as a tree like ``params`` (float32 leaves): the obviously-correct reference
  the fused paths (:mod:`optim.zo.rounds`) must match; it materialises every leaf at once."""
  ids = leaf_ids(params)
  key = sample_key(root, step, worker, sample)
  scale = direction_scale(key, ids, params, distribution)
  return jax.tree.map(lambda p, i: scale * leaf_draw(key, i, np.shape(p), distribution), params, ids)
