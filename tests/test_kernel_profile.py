"""Reading a Mosaic GPU kernel's own profile (benchmarks/kernel_profile.region_table): the trace is written by Mosaic
GPU's profiler itself (its ``dump`` of a recorded buffer), so the format is the one a GPU run produces."""
import io
import json

import numpy as np
import pytest
from jax.experimental.mosaic.gpu import profiler

from benchmarks.kernel_profile import format_regions, region_table

WARPGROUP = 128  # threads


def _trace(ranges_by_warpgroup: list[list[tuple[str, int, int]]], blocks: int = 1) -> dict:
  """The trace Mosaic GPU's profiler dumps for ``blocks`` CTAs of len(ranges_by_warpgroup) warpgroups, each
  recording its (name, begin, end) ranges in µs (the profiler's clock counts ns)."""
  spec = profiler.ProfilerSpec(entries_per_warpgroup=64)
  warpgroups = len(ranges_by_warpgroup)
  buffer = np.zeros((blocks, warpgroups, spec.entries_per_warpgroup), np.uint32)
  for block in range(blocks):
    for wg, ranges in enumerate(ranges_by_warpgroup):
      events = sorted([(1000 * begin, 1, spec.intern_name(name)) for name, begin, _ in ranges]
                      + [(1000 * end, 0, spec.intern_name(name) | spec.EXIT) for name, _, end in ranges])
      buffer[block, wg, :3] = (1000, wg, 2 * len(events))
      buffer[block, wg, 3:3 + 2 * len(events)] = [x for time, _, tag in events for x in (tag, time + 100)]
  out = io.StringIO()
  spec.dump(buffer.reshape(-1), out, grid=(blocks,), block=(WARPGROUP * warpgroups,))
  return json.loads(out.getvalue())


def test_the_region_table_reads_a_mosaic_profile():
  steps = lambda slow: [("step", 0, 400 + slow), ("wait", 10, 110 + slow), ("step", 1000, 1300), ("wait", 1010, 1060)]
  table = region_table(_trace([steps(0), steps(200)], blocks=2))
  rows = {r["name"]: r for r in table["regions"]}
  print(format_regions(table, "synthetic"))
  assert table["threads"] == 4 and set(rows) == {"step", "wait"}
  assert rows["wait"]["count_per_thread"] == 2 and rows["wait"]["threads"] == 4
  # the profiler takes its own overhead (≤ 12 ns an event) off the times
  assert rows["wait"]["min_us_per_thread"] == pytest.approx(150, abs=0.1)
  assert rows["wait"]["max_us_per_thread"] == pytest.approx(350, abs=0.1)
  assert rows["wait"]["mean_us"] == pytest.approx((100 + 50 + 300 + 50) / 4, abs=0.1)
  assert rows["step"]["us_per_thread"] == pytest.approx((700 + 900) / 2, abs=0.1)
  assert rows["step"]["mean_us"] > rows["wait"]["mean_us"] and table["regions"][0]["name"] == "step"
  assert "step" in format_regions(table, "synthetic")


def test_an_unbalanced_or_empty_trace_is_named():
  event = lambda name, phase, time: {"name": name, "ph": phase, "ts": time, "tid": 1}
  trace = {"traceEvents": [event("a", "B", 0.0), event("b", "E", 1.0)]}
  with pytest.raises(ValueError, match="unbalanced"):
    region_table(trace)
  empty = region_table({"traceEvents": []})
  assert not empty["regions"] and "no ranges" in format_regions(empty, "kernel")
