"""Placement pictures: each buffer a time x address rectangle (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memmap.instance import SLOW, Instance


def plot_placement(inst: Instance, offsets: np.ndarray, path: str | Path, title: str = "") -> None:
  """Draws placed buffers as rectangles, the capacity as a red line; slow-memory buffers are not drawn."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.collections import PatchCollection
  from matplotlib.patches import Rectangle

  placed = np.flatnonzero(offsets != SLOW)
  fig, ax = plt.subplots(figsize=(9, 5))
  rects = [Rectangle((inst.lower[i], offsets[i]), inst.upper[i] - inst.lower[i], inst.size[i]) for i in placed]
  colors = matplotlib.colormaps["tab20"](np.arange(len(rects)) % 20)
  ax.add_collection(PatchCollection(rects, facecolor=colors, edgecolor="black", linewidth=0.3))
  top = max(int((offsets[placed] + inst.size[placed]).max()) if placed.size else 0, inst.capacity)
  ax.axhline(inst.capacity, color="red", linewidth=1, label=f"capacity {inst.capacity}")
  ax.set_xlim(int(inst.lower.min()), int(inst.upper.max()))
  ax.set_ylim(0, top * 1.02)
  ax.set_xlabel("time")
  ax.set_ylabel("address (bytes)")
  ax.set_title(title or f"{len(placed)}/{inst.n} buffers placed")
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
