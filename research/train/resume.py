"""What a run folder allows: resuming the same run, or nothing.

A run may be resumed with a config that differs from the saved one only in fields declared ``resumable`` (logging
and checkpoint periods, kernel choices such as MoM's dispatch, the non-finite skip budget: they do not change what the
run computes). Any other change — the step count and the rest of the schedule included — is refused with one line
naming the old and new values, unless the user accepts it explicitly (``--accept-change steps``), which is allowed
for run settings that leave the model and its state's shapes alone.

The config is checked against the folder's ``config.json`` and against the config stored in the checkpoint itself, so
a deleted or edited ``config.json`` cannot restore weights into another model. Folders written before plugins owned
their configs have no ``plugins`` entry; they are refused with the command that converts them.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax

from research.config import flatten, resumable_paths, to_json
from research.train.config import TrainConfig, TrainError

CONVERT_COMMAND = "python -m experiments.convert_run"
# Top-level fields that shape the model or the training state: a resumed run can never change them.
STRUCTURAL = ("model", "optimizer", "regime", "plugins")
# Changes to these keep the state's shapes but alter the learning-rate schedule from the resumed step on.
SCHEDULE = ("steps", "warmup_steps", "learning_rate")


def is_legacy(saved: dict[str, Any]) -> bool:
  """A ``config.json`` from before plugin configs (flat ``attn_*``, ``mom_*``, ``galore_*`` ... fields)."""
  return "plugins" not in saved


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
  """(key, saved value, value in ``cfg``) for every flattened key of a saved config (``to_json`` form) that ``cfg``
  changes, resumable fields aside (a key missing on one side counts as None)."""
  saved = flatten(saved)
  current = flatten(json.loads(json.dumps(to_json(cfg))))  # tuples -> lists, as saved
  resumable = resumable_paths(cfg)
  return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
          if k not in resumable and saved.get(k) != current.get(k)]


def check_accepted(accept: Collection[str]) -> None:
  """Refuse ``--accept-change`` keys that a resumed run cannot change."""
  for key in accept:
    if key.split(".")[0] in STRUCTURAL or key not in TrainConfig.__dataclass_fields__:
      raise TrainError(f"--accept-change {key}: only run settings that leave the model and its state unchanged can "
                       f"change on resume (not {', '.join(STRUCTURAL)}); e.g. steps, warmup_steps, learning_rate")


def refused_changes(saved: dict[str, Any], cfg: TrainConfig, accept: Collection[str], where: str
                    ) -> list[tuple[str, Any, Any]]:
  """The accepted changes between ``saved`` and ``cfg``; raise :class:`TrainError` naming any other."""
  if is_legacy(saved):
    raise TrainError(f"{where} holds a run written before plugins owned their configs; convert its config.json "
                     f"with `{CONVERT_COMMAND} {where}` and run again")
  changed = config_changes(saved, cfg)
  if refused := [c for c in changed if c[0] not in accept]:
    shown = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, old, new in refused)
    hint = " or --accept-change KEY" if all(k.split(".")[0] not in STRUCTURAL for k, _, _ in refused) else ""
    raise TrainError(f"{where} holds a run with a different config ({shown}); use a fresh --workdir, the saved "
                     f"settings{hint}")
  return changed


def describe_accepted(changed: list[tuple[str, Any, Any]], step: int) -> str:
  """One line saying what the accepted changes do to a run resumed at ``step``."""
  parts = []
  for key, old, new in changed:
    effect = "the learning-rate schedule differs" if key in SCHEDULE else "the run continues with the new value"
    parts.append(f"{key} {old!r} -> {new!r} ({effect} from step {step} on)")
  return "accepted changes: " + "; ".join(parts)


def check_workdir_config(workdir: Path, cfg: TrainConfig, accept: Collection[str] = ()) -> list:
  """Compare ``cfg`` with the folder's ``config.json`` (if any); returns the accepted changes."""
  path = workdir / "config.json"
  if not path.exists():
    return []
  return refused_changes(json.loads(path.read_text()), cfg, accept, str(workdir))


def write_config(workdir: Path, cfg: TrainConfig) -> None:
  """Save ``cfg`` as the run's ``config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(to_json(cfg), indent=2) + "\n")
