"""What a run folder's saved ``config.json`` allows: resuming the same run, or nothing.

A run may be resumed with a config that differs from the saved one only in fields declared ``resumable`` (logging
and checkpoint periods, the step count, kernel choices such as MoM's dispatch: they do not change what the run
computes up to its last step). Folders written before plugins owned their configs have no ``plugins`` entry; they
are refused with the command that converts them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from research.config import flatten, resumable_paths, to_json
from research.train.config import TrainConfig, TrainError

CONVERT_COMMAND = "python -m experiments.convert_run"


def is_legacy(saved: dict[str, Any]) -> bool:
  """A ``config.json`` from before plugin configs (flat ``attn_*``, ``mom_*``, ``galore_*`` ... fields)."""
  return "plugins" not in saved


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
  """(key, saved value, value in ``cfg``) for every flattened key of a saved ``config.json`` that ``cfg`` changes,
  resumable fields aside (a key missing on one side counts as None)."""
  saved = flatten(saved)
  current = flatten(json.loads(json.dumps(to_json(cfg))))  # tuples -> lists, as saved
  resumable = resumable_paths(cfg)
  return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
          if k not in resumable and saved.get(k) != current.get(k)]


def check_workdir_config(workdir: Path, cfg: TrainConfig) -> None:
  """Refuse to resume a run whose saved config differs from ``cfg`` in anything but resumable fields."""
  path = workdir / "config.json"
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  if is_legacy(saved):
    raise TrainError(f"{workdir} holds a run written before plugins owned their configs; convert its config.json "
                     f"with `{CONVERT_COMMAND} {workdir}` and run again")
  if changed := config_changes(saved, cfg):
    shown = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, old, new in changed)
    raise TrainError(f"workdir {workdir} holds a run with a different config ({shown}); "
                     "use a fresh --workdir or the saved settings")


def write_config(workdir: Path, cfg: TrainConfig) -> None:
  """Save ``cfg`` as the run's ``config.json``."""
  (workdir / "config.json").write_text(json.dumps(to_json(cfg), indent=2) + "\n")
