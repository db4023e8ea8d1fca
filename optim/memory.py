"""Optimizer-state memory accounting for any Optax state, per parameter and per parameter group.

Each state leaf is attributed to the parameter whose key path it contains (the longest such path), so the same
code reads ``optax.adamw``'s ``mu``/``nu`` trees, ``optax.contrib.galore``'s projector and low-rank moments and
:mod:`optim.galore`'s per-leaf states. Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees from
``jax.eval_shape(tx.init, abstract_params)``, so a 1B-parameter configuration is counted without allocating it.
Whole-step memory comes from XLA's buffer assignment (:func:`step_memory`, via :mod:`research.memory`).

GaLore's expected counts (Zhao et al., arXiv:2403.03507, §4.2): a projected [m, n] matrix, m <= n, rank r,
``side='std'`` holds m·r projector + 2·r·n moment entries, against Adam's 2·m·n.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from optim.galore import PAPER_KEYWORDS, path_name
from research.memory import compiled_memory

SCALARS = "scalars"


@dataclasses.dataclass(frozen=True)
class StateLeaf:
  """One optimizer-state array: the parameter it belongs to (``None`` if none), its role and its size.

  ``component`` is the state field nearest to the array (``mu``, ``nu``, ``left``, ``projector``, ``history``...).
  """

  param: str | None
  component: str
  shape: tuple[int, ...]
  dtype: str
  entries: int
  bytes: int


def _key_token(key: Any) -> tuple[str, Any]:
  for kind in ("key", "idx", "name"):
    if hasattr(key, kind):
      return kind, getattr(key, kind)
  return "other", str(key)


def state_leaves(opt_state: Any, params: Any) -> list[StateLeaf]:
  """Every array of ``opt_state`` (concrete or ``ShapeDtypeStruct``) with the parameter it belongs to."""
  param_paths = {tuple(_key_token(k) for k in path): path_name(path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  longest = max((len(p) for p in param_paths), default=0)
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    tokens = tuple(_key_token(k) for k in path)
    match, end = None, len(tokens)
    for length in range(min(longest, len(tokens)), -1, -1):
      hits = [s for s in range(len(tokens) - length + 1) if tokens[s:s + length] in param_paths]
      if hits:
        match, end = param_paths[tokens[hits[-1]:hits[-1] + length]], hits[-1] + length
        break
    names = [v for kind, v in tokens if kind == "name"]
    after = [v for kind, v in tokens[end:] if kind == "name"]
    component = (after or names or ["?"])[-1]
    shape = tuple(np.shape(leaf))
    entries = int(np.prod(shape, dtype=np.int64))
    dtype = np.dtype(leaf.dtype)
    out.append(StateLeaf(None if len(shape) == 0 else match, component, shape, dtype.name, entries,
                         entries * dtype.itemsize))
  return out


def galore_paper_group(param: str) -> str:
  """Group name of a parameter by the paper's selection: attention/MLP matrices vs everything else.

  Scalars (step counters, injected hyper-parameters) are grouped apart by :func:`state_bytes_by_group`.
  """
  return "attn/mlp" if any(k in param for k in PAPER_KEYWORDS) else "other"


def state_bytes_by_group(opt_state: Any, params: Any,
                         group: Callable[[str], str] = galore_paper_group) -> dict[str, dict[str, int]]:
  """{group: {component: bytes, ..., "total": bytes}} of an optimizer state.

  ``group(param_path)`` names each parameter's group; arrays attributed to no parameter (and all scalars) go to
  ``"scalars"``.
  """
  table: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
  for leaf in state_leaves(opt_state, params):
    name = SCALARS if leaf.param is None else group(leaf.param)
    table[name][leaf.component] += leaf.bytes
    table[name]["total"] += leaf.bytes
  return {k: dict(v) for k, v in table.items()}


def state_bytes_per_param(opt_state: Any, params: Any) -> dict[str, dict[str, int]]:
  """{param path: {component: entries}} for every parameter that has state (scalars excluded)."""
  table: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
  for leaf in state_leaves(opt_state, params):
    if leaf.param is not None:
      table[leaf.param][leaf.component] += leaf.entries
  return {k: dict(v) for k, v in table.items()}


def abstract_state(tx: Any, params: Any) -> Any:
  """``ShapeDtypeStruct`` tree of ``tx.init(params)``, computed without allocating (params may be abstract)."""
  return jax.eval_shape(tx.init, params)


def step_memory(step: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()) -> dict[str, int]:
  """XLA's memory analysis of ``jax.jit(step)`` compiled for ``args`` (arrays or ``ShapeDtypeStruct``s).

  Returns :func:`research.memory.compiled_memory`: argument/output/alias/temp bytes and ``peak_estimate_bytes``.
  """
  compiled = jax.jit(step, donate_argnums=donate_argnums).lower(*args).compile()
  return compiled_memory(compiled)
