"""Metric writers (JSONL always, TensorBoard when tensorboardX is installed), a progress line, and loss plots.

Only process 0 writes. Records are ``{"step": int, "split": "train"|"eval", <name>: float, ...}``, one per line
in ``<workdir>/metrics.jsonl``; a resumed run first drops records newer than its checkpoint so the file always
describes one continuous run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax


def _is_writer_process() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """Writes metric records to ``workdir/metrics.jsonl`` and, if tensorboardX is importable, to TensorBoard."""

  def __init__(self, workdir: str | Path, *, resume_step: int = 0):
    self.path = Path(workdir) / "metrics.jsonl"
    self._enabled = _is_writer_process()
    self._tb = None
    if not self._enabled:
      return
    self._truncate_after(resume_step)
    self._file = self.path.open("a")
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      return
    self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines() if _record_step(line) is not None
            and _record_step(line) <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), step)

  def close(self) -> None:
    if self._enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _record_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None  # a torn last line from a killed run


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  """All complete records of a ``metrics.jsonl`` file."""
  records = []
  for line in Path(path).read_text().splitlines():
    if _record_step(line) is not None:
      records.append(json.loads(line))
  return records


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
      f"{seconds // 60}:{seconds % 60:02d}"


class ProgressLine:
  """Prints ``step 120/300 | loss 2.91 | 41.2k tok/s | ETA 0:31`` lines (process 0 only)."""

  def __init__(self, total_steps: int, tokens_per_step: int, *, stream=None):
    # None: whatever sys.stdout is when a line is printed (a default bound at import would outlive a redirect)
    self.total_steps, self.tokens_per_step, self.stream = total_steps, tokens_per_step, stream
    self._last_time, self._last_step = None, None

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def update(self, step: int, values: dict[str, float]) -> float:
    """Print one line for ``step``; returns tokens/s since the previous call."""
    now = time.perf_counter()
    steps = step - self._last_step
    elapsed = max(now - self._last_time, 1e-9)
    tokens_per_s = steps * self.tokens_per_step / elapsed
    eta = (self.total_steps - step) * elapsed / steps if steps else float("inf")
    self._last_time, self._last_step = now, step
    if _is_writer_process():
      shown = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
      width = len(str(self.total_steps))
      print(f"step {step:>{width}}/{self.total_steps} | {shown} | {tokens_per_s / 1e3:.1f}k tok/s | "
            f"ETA {_format_duration(eta)}", file=self.stream or sys.stdout, flush=True)
    return tokens_per_s


def plot_losses(records: list[dict[str, Any]], path: str | Path, *, title: str,
                reference_loss: float | None = None) -> None:
  """PNG of train and eval loss against step; ``reference_loss`` (e.g. ln V of a uniform model) as a line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for split, style in (("train", "-"), ("eval", "o-")):
    points = [(r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r]
    if points:
      ax.plot(*zip(*points), style, label=f"{split} loss", markersize=4)
  if reference_loss is not None:
    ax.axhline(reference_loss, color="gray", linestyle="--", linewidth=1, label="uniform model")
  ax.set_xlabel("step")
  ax.set_ylabel("cross entropy (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
