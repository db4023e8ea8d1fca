"""Per-step metrics on their way from the device to ``metrics.jsonl``: buffered, checked, written exactly once.

The jitted step returns its metrics as device arrays; they are pulled to the host together (at log steps and before
every checkpoint, so a checkpoint never holds a state whose metrics were not seen), checked for non-finite values,
handed to the regime's ``record`` hook and written one row per step. A resumed run first truncates the file at the
restored step (``research.metrics.MetricWriter``), so every trained step appears once, in order, across restarts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from research.metrics import MetricWriter, ProgressLine
from research.train.config import TrainError
from research.train.regime import Regime


class NonFiniteError(TrainError):
  """Training produced a non-finite loss or gradient (and no skip budget was left)."""


def _is_float_scalar(value: Any) -> bool:
  return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.floating)


class StepRecords:
  """The metrics of steps not yet written (module docstring).

  Args:
    regime: the run's regime (its ``record`` hook sees every step's metrics).
    writer: the run's metric writer; progress: its progress line.
    workdir: the run folder (for the regime's own records).
    skip_budget: non-finite updates the regime may have skipped before the run stops.
  """

  def __init__(self, regime: Regime, writer: MetricWriter, progress: ProgressLine, workdir: Path, skip_budget: int):
    self.regime, self.writer, self.progress, self.workdir = regime, writer, progress, workdir
    self.skip_budget, self.skipped = skip_budget, 0
    self._pending: list[dict[str, jax.Array]] = []
    self._since_log: list[dict[str, float]] = []

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self._pending.append(metrics)

  def flush(self, step: int) -> None:
    """Pull, check and write the metrics of every step up to ``step`` (the step just trained)."""
    if not self._pending:
      return
    first = step - len(self._pending) + 1
    host = jax.device_get(self._pending)
    self._pending = []
    for offset, values in enumerate(host):
      self._check(first + offset, values)
    rows = [{k: v for k, v in row.items() if not _is_float_scalar(v) or math.isfinite(float(v))}
            for row in self.regime.record(first, host, self.workdir)]  # a skipped step keeps no NaN in the file
    for offset, values in enumerate(rows):
      self.writer.write(first + offset, "train", values)
    self._since_log += rows

  def _check(self, step: int, values: dict[str, Any]) -> None:
    if values.get("skipped", 0.0) > 0:
      self.skipped += 1
      if self.skipped > self.skip_budget:
        raise NonFiniteError(f"non-finite loss or gradient at step {step}: {self.skipped} updates skipped, more than "
                             f"--skip-nonfinite {self.skip_budget}")
      return
    bad = {k: float(v) for k, v in values.items() if _is_float_scalar(v) and not math.isfinite(float(v))}
    if bad:
      shown = ", ".join(f"{k} {v}" for k, v in bad.items())
      raise NonFiniteError(f"non-finite training metrics at step {step} ({shown})")

  def log_line(self, step: int) -> None:
    """Print the progress line: the mean of each metric since the previous line, and the throughput."""
    if not self._since_log:
      return
    keys = [k for k in self._since_log[-1] if _is_float_scalar(self._since_log[-1][k])]
    mean = {k: float(np.mean([r[k] for r in self._since_log if k in r])) for k in keys}
    self._since_log = []
    shown = {"loss": mean.pop("loss"), **mean} if "loss" in mean else mean
    tokens_per_s = self.progress.update(step, shown)
    self.writer.write(step, "speed", {"tokens_per_s": tokens_per_s})
