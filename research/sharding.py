"""Parameters and optimizer state laid out over a named mesh: logical axes -> mesh axes by one rule table.

Layers annotate each parameter with *logical* axis names and stay mesh-agnostic::

    dense(d_model, hidden, axes=("embed", "mlp"), ...)       # nnx.Param metadata ``logical_axes``

:data:`RULES` maps a logical name to a mesh axis (MaxText's convention: ``embed`` over ``fsdp``; heads, MLP width and
vocabulary over ``tensor``). A dimension is sharded only when its mesh axis has more than one device and divides it,
and no mesh axis is used twice in one array; everything else is replicated. Optimizer state follows its parameter:
a state leaf is matched to the parameter whose path its own contains (optax nests ``mu``, ``nu``, ... around the
parameter tree; GaLore keeps a base state per parameter), and each of its dimensions takes the parameter's mesh
axis where the sizes agree — so Adam's moments shard like their weights, while GaLore's projector [m, r] keeps the
weight's row axis and its low-rank moments [r, n] its column axis ("rules of their own" without naming GaLore).
Scalars (step counts) are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RULES: Mapping[str, str] = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
                            "vocab": "tensor"}
LOGICAL_AXES = "logical_axes"  # the nnx.Param metadata key


def logical_axes(model: nnx.Module) -> dict:
  """The model's params as a nested dict of their logical axes (a tuple per param; None where not annotated)."""
  axes = jax.tree.map(lambda v: v.get_metadata().get(LOGICAL_AXES), nnx.state(model, nnx.Param),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(axes)


def spec_for(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
             rules: Mapping[str, str] = RULES) -> P:
  """The PartitionSpec of an array with these logical ``axes`` (module docstring for what is sharded)."""
  if not axes:
    return P()
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match the array's shape {shape}")
  used, entries = set(), []
  for name, size in zip(axes, shape):
    axis = rules.get(name) if name else None
    if axis in mesh.shape and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 and axis not in used:
      used.add(axis)
      entries.append(axis)
    else:
      entries.append(None)
  return P(*entries)


def _key(k) -> Any:
  return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def _flat(tree: Any, is_leaf=None) -> dict[tuple, Any]:
  """{path as a tuple of plain keys: leaf}."""
  return {tuple(_key(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def param_specs(axes: Any, params: Any, mesh: Mesh) -> Any:
  """PartitionSpecs of ``params`` (arrays or ShapeDtypeStructs) from their logical ``axes`` (same tree)."""
  flat_axes = _flat(axes, is_leaf=lambda x: x is None or isinstance(x, tuple))
  return jax.tree_util.tree_map_with_path(
      lambda path, p: spec_for(flat_axes.get(tuple(_key(k) for k in path)), p.shape, mesh), params)


def follow_params(tree: Any, params: Any, specs: Any) -> Any:
  """PartitionSpecs for every array leaf of ``tree`` (an optimizer state): each follows the parameter whose path
  its own contains, dimension by dimension where the sizes agree (module docstring); unmatched leaves are replicated."""
  flat_params, flat_specs = _flat(params), _flat(specs, is_leaf=lambda s: isinstance(s, P))

  def spec(path, leaf):
    keys = tuple(_key(k) for k in path)
    runs = (keys[i:j] for i in range(len(keys)) for j in range(len(keys), i, -1))  # longest first at each start
    param_path = next((run for run in runs if run in flat_params), None)
    if param_path is None or len(leaf.shape) != len(flat_params[param_path].shape):
      return P()
    shape, entries = flat_params[param_path].shape, tuple(flat_specs[param_path])
    entries += (None,) * (len(shape) - len(entries))
    return P(*(e if a == b else None for e, a, b in zip(entries, leaf.shape, shape)))

  return jax.tree_util.tree_map_with_path(spec, tree)


def named(specs: Any, mesh: Mesh) -> Any:
  """NamedShardings on ``mesh`` for a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) laid out by ``shardings``."""
  return sum(leaf.dtype.itemsize * math.prod(s.shard_shape(leaf.shape))
             for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))
