"""Checkpointing of training runs on orbax's ``CheckpointManager``, with integrity checks and damaged-step recovery.

Each checkpoint holds one pytree ``state`` (params, optimizer state, ...) and a JSON ``meta`` dict (step, data
position, seed, the run's config). Saves are asynchronous and atomic: orbax writes into a temporary folder and renames
it when complete, so a process killed mid-save leaves the previous checkpoint as the latest valid one, and the
half-written folder is removed on the next start. Only the newest ``keep`` checkpoints are kept.

Orbax records that a step was committed, not what its files held, so once a step is complete we write a manifest of
its files' SHA-256 (``memlab_sha256.json`` inside the step folder). :meth:`Checkpointer.restore_latest` verifies the
manifest, restores, and on any failure (a changed or missing file, an unreadable array) moves the step aside into
``<checkpoints>.damaged/`` (never deleted), says so in one line, and tries the next older step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

MANIFEST = "memlab_sha256.json"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (damaged, or written by a different run)."""


def _digest(path: Path) -> str:
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> dict[str, Path]:
  return {str(p.relative_to(step_dir)): p for p in sorted(step_dir.rglob("*"))
          if p.is_file() and not p.name.startswith(MANIFEST)}


def _shapes_by_path(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """{path of key names: (shape, dtype)} of a pytree of arrays / ShapeDtypeStructs / orbax ArrayMetadata."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {tuple(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
  """Save/restore ``(state pytree, meta dict)`` pairs under ``directory``, one sub-folder per step."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    self._unsealed: list[int] = []

  def latest_step(self) -> int | None:
    """The newest completely written step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving ``state`` and ``meta`` as ``step`` (returns before the write finishes when async)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._unsealed.append(step)
    # orbax finishes one save before it starts the next: every step but one still being written is complete.
    self._seal(keep_last=self._manager.is_saving_in_progress())

  def _seal(self, keep_last: bool = False) -> None:
    """Write the manifest of the complete steps saved since the last call (all but the newest if ``keep_last``)."""
    done, self._unsealed = (self._unsealed[:-1], self._unsealed[-1:]) if keep_last else (self._unsealed, [])
    for step in done:
      step_dir = self.directory / str(step)
      if step_dir.is_dir() and jax.process_index() == 0:
        manifest = {name: _digest(path) for name, path in _files(step_dir).items()}
        tmp = step_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=0))
        tmp.replace(step_dir / MANIFEST)

  def verify(self, step: int) -> None:
    """Raise :class:`CheckpointError` if ``step``'s files differ from its manifest (steps without one pass)."""
    step_dir = self.directory / str(step)
    path = step_dir / MANIFEST
    if not path.exists():
      return
    expected, found = json.loads(path.read_text()), _files(step_dir)
    if missing := sorted(set(expected) - set(found)):
      raise CheckpointError(f"files missing: {', '.join(missing[:3])}")
    if changed := [name for name, digest in expected.items() if _digest(found[name]) != digest]:
      raise CheckpointError(f"files changed since it was written: {', '.join(changed[:3])}")

  def state_mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How ``step``'s saved arrays differ in paths, shapes or dtypes from ``abstract_state``'s (None if they do not).

    Read from orbax's metadata, so a checkpoint of another model is told apart from a damaged one. Paths are
    compared by their key names: orbax stores a NamedTuple (an optax state) as a dict."""
    saved = _shapes_by_path(self._manager.item_metadata(step)["state"])
    wanted = _shapes_by_path(abstract_state)
    if saved.keys() != wanted.keys():
      first = lambda paths: "/".join(min(paths)) if paths else "-"
      return (f"{len(saved)} arrays where this run has {len(wanted)}; saved only: {first(saved.keys() - wanted.keys())}"
              f", this run only: {first(wanted.keys() - saved.keys())}")
    for path, (shape, dtype) in wanted.items():
      if saved[path] != (shape, dtype):
        return f"{'/'.join(path)} is {saved[path][1]}{list(saved[path][0])} where this run has {dtype}{list(shape)}"
    return None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of ``step``; ``abstract_state`` gives the tree, shapes, dtypes and shardings to restore."""
    self.verify(step)
    return self._read(step, abstract_state)

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def restore_latest(self, abstract_state: Any, *,
                     check_meta: Callable[[int, dict[str, Any]], None] = lambda s, m: None,
                     log: Callable[[str], None] = print) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest intact checkpoint, or None if there is none.

    A step whose files fail verification, or whose metadata or arrays cannot be read, is moved aside (see the module
    docstring) and reported in one line. A readable step of another shape (:meth:`state_mismatch`) raises
    :class:`CheckpointError`, as may ``check_meta(step, meta)`` to refuse a checkpoint of a different run: the
    checkpoint is not damaged, the run is wrong.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        self.verify(step)
        mismatch = self.state_mismatch(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on unreadable data
        self._damaged(step, e, log)
        continue
      if mismatch:
        raise CheckpointError(f"checkpoint {step} in {self.directory} holds another model's state ({mismatch})")
      try:
        state, meta = self._read(step, abstract_state)  # verified above
      except Exception as e:  # noqa: BLE001
        self._damaged(step, e, log)
        continue
      check_meta(step, meta)
      return step, state, meta
    return None

  def _damaged(self, step: int, error: Exception, log: Callable[[str], None]) -> None:
    moved = self._move_aside(step)
    log(f"checkpoint {step} is damaged ({' '.join(str(error).split())[:200]}); moved it to {moved} and tried the "
        "next older one")

  def _move_aside(self, step: int) -> Path:
    """Move ``step`` out of the checkpoint folder (process 0 moves; every process forgets it)."""
    target = self.directory.with_name(self.directory.name + ".damaged") / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Block until pending asynchronous saves are on disk (and sealed)."""
    self._manager.wait_until_finished()
    self._seal()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree``, the target :meth:`Checkpointer.restore` needs."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
