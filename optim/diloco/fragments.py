"""Streaming DiLoCo's fragments (which parameters sync together) and their staggered sync schedule.

"Streaming DiLoCo with overlapping communication: Towards a Distributed Free Lunch" (Douillard et al.,
arXiv:2501.18512), §2.2-2.3: the model's layers are split into P fragments, and fragment p is synchronised every H
inner steps, offset so that one fragment syncs every H/P steps (peak bandwidth / P, same total). Layer ℓ of L goes
to fragment ℓ mod P (``strided``, the paper's better choice) or ⌊ℓP/L⌋ (``sequential``); parameters outside the
layers (embedding, final norm) go to fragment 0, as in MaxText.

Schedule (steps counted from 1; "after step s" = once the inner update of step s is done), with Δh = H/P and the
overlap τ (0 <= τ < Δh), event k = 0, 1, ... handles fragment k mod P:

* **capture** after step (k+1)·Δh − τ: Δ_p = θ_global,p − θ_local,p is frozen into the in-flight buffer;
* **reduce** during step (k+1)·Δh − τ + 1 when τ >= 1 (the collective runs beside that step's inner compute), or
  with the merge when τ = 0;
* **merge** after step (k+1)·Δh: outer step on fragment p with the mean Δ, local fragment ← α·local + (1−α)·global.

So every fragment is merged exactly once per H steps and at most one is in flight (the next capture comes after the
merge because τ < Δh). P = 1, τ = 0 is vanilla DiLoCo ("DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105). A fragment travels as rows f32 [R_p, W]: each leaf flattened and zero-padded to whole
rows of ``row_size`` W, R_p padded to a multiple of the replica count (the two-stage mean splits rows evenly).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PATTERNS = ("strided", "sequential")


@dataclasses.dataclass(frozen=True)
class SyncSchedule:
  """When fragments are captured, reduced and merged (module docstring).

  Attributes:
    sync_every: H, inner steps between two syncs of the same fragment.
    fragments: P, fragments synced in turn; H must be divisible by P.
    overlap: τ, inner steps between a fragment's capture and its merge; 0 <= τ < H/P.
  """

  sync_every: int
  fragments: int = 1
  overlap: int = 0

  def __post_init__(self):
    if self.sync_every < 1 or self.fragments < 1:
      raise ValueError(f"sync_every and fragments must be >= 1 (got {self.sync_every}, {self.fragments})")
    if self.sync_every % self.fragments:
      raise ValueError(f"sync_every ({self.sync_every}) must be divisible by fragments ({self.fragments}): a "
                       f"fragment syncs every sync_every/fragments steps, never rounded")
    if not 0 <= self.overlap < self.period:
      raise ValueError(f"overlap must be in [0, sync_every/fragments = {self.period}) (got {self.overlap})")

  @property
  def period(self) -> int:
    """Δh = H/P, steps between two consecutive merges (of different fragments)."""
    return self.sync_every // self.fragments

  def _event(self, step, lead: int):
    """The fragment whose merge falls on step + lead, or −1 (python ints or traced int32 scalars)."""
    t = step + lead
    fragment = (t // self.period - 1) % self.fragments
    hit = (t % self.period == 0) & (t >= self.period)
    return jnp.where(hit, fragment, -1) if isinstance(step, jax.Array) else (int(fragment) if hit else -1)

  def merged(self, step):
    """The fragment merged after ``step``, or −1."""
    return self._event(step, 0)

  def captured(self, step):
    """The fragment whose Δ is captured after ``step``, or −1."""
    return self._event(step, self.overlap)

  def reduced(self, step):
    """The fragment whose mean is computed (sent) during ``step``, or −1."""
    return self._event(step, max(self.overlap - 1, 0))


@dataclasses.dataclass(frozen=True)
class LeafSlot:
  """Where one parameter leaf sits in its fragment's rows.

  Attributes:
    index: position among ``jax.tree.leaves(params)``.
    shape, dtype: the leaf's.
    row: first row in the fragment; rows: whole rows it takes (its size rounded up to ``row_size``).
  """

  index: int
  shape: tuple[int, ...]
  dtype: Any
  row: int
  rows: int

  @property
  def size(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class FragmentPlan:
  """The leaves of each fragment and their row layout.

  Attributes:
    slots: per fragment, its leaves in tree order.
    rows: per fragment, its row count R_p (a multiple of the replica count).
    row_size: W, elements per row.
  """

  slots: tuple[tuple[LeafSlot, ...], ...]
  rows: tuple[int, ...]
  row_size: int

  @classmethod
  def build(cls, params: Any, fragments: int, *, pattern: str = "strided", row_size: int = 128, replicas: int = 1,
            layers_key: str = "blocks") -> FragmentPlan:
    """The plan for ``params`` (arrays or ShapeDtypeStructs) whose layer i sits under ``params[layers_key][i]``."""
    if pattern not in PATTERNS:
      raise ValueError(f"fragment pattern must be one of {', '.join(PATTERNS)} (got {pattern!r})")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    layer_of = [_layer_index(path, layers_key) for path, _ in flat]
    num_layers = 1 + max((layer for layer in layer_of if layer is not None), default=-1)
    if fragments > max(num_layers, 1):
      raise ValueError(f"fragments ({fragments}) must be <= the model's layers ({num_layers})")

    def fragment(layer):
      if layer is None:
        return 0
      return layer % fragments if pattern == "strided" else layer * fragments // num_layers

    slots, rows = [], []
    for p in range(fragments):
      row, mine = 0, []
      for i, (_, leaf) in enumerate(flat):
        if fragment(layer_of[i]) == p:
          leaf_rows = -(-math.prod(leaf.shape) // row_size)
          mine.append(LeafSlot(i, tuple(leaf.shape), jnp.dtype(leaf.dtype), row, leaf_rows))
          row += leaf_rows
      slots.append(tuple(mine))
      rows.append(-(-row // replicas) * replicas)
    return cls(tuple(slots), tuple(rows), row_size)

  @property
  def fragments(self) -> int:
    return len(self.slots)

  @property
  def max_rows(self) -> int:
    return max(self.rows)

  def sizes(self) -> tuple[int, ...]:
    """Parameters per fragment (unpadded)."""
    return tuple(sum(s.size for s in slots) for slots in self.slots)

  def select(self, p: int, leaves: list[Any]) -> list[Any]:
    """The leaves of fragment ``p`` from a list of all leaves."""
    return [leaves[s.index] for s in self.slots[p]]

  def replace(self, p: int, leaves: list[Any], fragment_leaves: list[Any]) -> list[Any]:
    """``leaves`` with fragment ``p``'s replaced by ``fragment_leaves``."""
    out = list(leaves)
    for s, leaf in zip(self.slots[p], fragment_leaves, strict=True):
      out[s.index] = leaf
    return out

  def pack(self, p: int, fragment_leaves: list[jax.Array]) -> jax.Array:
    """Fragment ``p``'s leaves -> f32 [max_rows, W] (each leaf on whole rows, zero padded)."""
    width = self.row_size
    blocks = [jnp.pad(leaf.astype(jnp.float32).reshape(-1), (0, s.rows * width - s.size)).reshape(s.rows, width)
              for s, leaf in zip(self.slots[p], fragment_leaves, strict=True)]
    packed = jnp.concatenate(blocks, axis=0)
    return jnp.pad(packed, ((0, self.max_rows - packed.shape[0]), (0, 0)))

  def unpack(self, p: int, rows: jax.Array) -> list[jax.Array]:
    """Rows [>= R_p, W] of fragment ``p`` -> its leaves (shapes and dtypes of the params)."""
    return [rows[s.row:s.row + s.rows].reshape(-1)[:s.size].reshape(s.shape).astype(s.dtype)
            for s in self.slots[p]]


def _layer_index(path: tuple[Any, ...], layers_key: str) -> int | None:
  """ℓ for a key path through ``layers_key`` then ℓ (a dict key or a sequence index), else None."""
  names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
  for name, following in zip(names, names[1:]):
    if name == layers_key and isinstance(following, (int, np.integer)):
      return int(following)
  return None
