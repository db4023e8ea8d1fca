"""memmap at scale: a generated 100,000-buffer instance through the sweep-line instance, best fit and validator.

Issue 17's bound: best_fit in < 10 s and < 2 GB peak RSS (the N x N matrices this replaced took 3.6 GB at 20,000
buffers). The instance is program-like (``memmap.generators.random_instance`` with one buffer per time step and a
mean lifetime of 64 steps). Prints each stage's seconds, the overlapping pairs and the peak RSS of the process.

  PYTHONPATH=. python benchmarks/memmap_scale.py --n 100000
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from memmap.baselines.heuristics import greedy
from memmap.generators import random_instance
from memmap.instance import load_bound, overlap_pairs, validate


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=100_000)
  p.add_argument("--mean-life", type=float, default=64.0)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  t = time.perf_counter()
  inst = random_instance(args.n, np.random.default_rng(args.seed), horizon=args.n, mean_life=args.mean_life)
  print(f"instance: {inst.n} buffers in {time.perf_counter() - t:.2f} s; peak RSS {peak_rss_mb():.0f} MB")
  t = time.perf_counter()
  pairs = len(overlap_pairs(inst)[0])
  lb = load_bound(inst)
  print(f"sweep: {pairs} overlapping pairs, load bound {lb} in {time.perf_counter() - t:.2f} s")
  t = time.perf_counter()
  offsets = greedy(inst, "spatial", "best")
  fit_s = time.perf_counter() - t
  print(f"best_fit: {fit_s:.2f} s; peak RSS {peak_rss_mb():.0f} MB")
  t = time.perf_counter()
  height = validate(inst, offsets, capacity=np.iinfo(np.int64).max)
  print(f"validate: height {height} ({100 * (height / lb - 1):+.2f}% over L) in {time.perf_counter() - t:.2f} s")
  rss = peak_rss_mb()
  print(f"peak RSS {rss:.0f} MB; best_fit {fit_s:.2f} s; bounds (< 10 s, < 2048 MB): "
        f"{'met' if fit_s < 10 and rss < 2048 else 'NOT met'}")


if __name__ == "__main__":
  main()
