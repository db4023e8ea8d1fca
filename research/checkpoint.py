"""Checkpointing of training runs on orbax's ``CheckpointManager``.

Each checkpoint holds one pytree ``state`` (params, optimizer state, ...) and a JSON ``meta`` dict (step, data
position, seed, ...). Saves are asynchronous and atomic: orbax writes into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest valid one, and the
half-written folder is removed on the next start. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Save/restore ``(state pytree, meta dict)`` pairs under ``directory``, one sub-folder per step."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest completely written step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving ``state`` and ``meta`` as ``step`` (returns before the write finishes when async)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of ``step``; ``abstract_state`` gives the tree, shapes, dtypes and shardings to restore."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    """Block until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree``, the target :meth:`Checkpointer.restore` needs."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
