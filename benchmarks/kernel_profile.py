"""Where a jitted function's device time goes: its GPU kernels, by name, from JAX's own profiler trace.

``kernel_table(fn, calls)`` runs ``fn()`` ``calls`` times under :func:`jax.profiler.trace` and reads the trace back
with :class:`jax.profiler.ProfileData`: every event on the device plane's stream lines is one kernel (or copy)
execution. It returns, per call, the number of kernels, their summed time, the time the device was busy (the union
of the kernel intervals) and the wall time of the calls, plus the kernels grouped by name, largest total first.
``busy / wall`` near 1 means the device is the bottleneck; far below 1, the launches (the host) are. Average µs per
kernel near the launch floor (a few µs) means a step is bound by how many kernels it has, not by their work.

XLA turns its command buffers (CUDA graphs) off while profiling unless ``--xla_enable_command_buffers_during_profiling``
is set, so a traced call may launch slower than an untraced one: compare its wall time with an untimed median.
On a backend without device planes (the CPU) the table is empty and ``note`` says so.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections import defaultdict


def _merged_length(intervals: list[tuple[float, float]]) -> float:
  """Total length of the union of [start, end) intervals."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if s > end:
      total, end = total + (e - s), e
    elif e > end:
      total, end = total + (e - end), e
  return total


def kernel_table(fn, calls: int = 3, top: int | None = 30) -> dict:
  """Profile ``calls`` runs of ``fn()`` (already compiled and warm); see the module docstring for the fields.
  ``top`` kernel names are kept, largest total first (None: all)."""
  import jax
  from jax.profiler import ProfileData

  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(calls):
        jax.block_until_ready(fn())
    paths = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      return {"note": "the profiler wrote no trace", "kernels": []}
    profile = ProfileData.from_file(paths[0])
  by_name: dict[str, list[float]] = defaultdict(list)
  intervals = []
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        by_name[event.name].append(event.duration_ns / 1e3)
        intervals.append((event.start_ns, event.end_ns))
  if not intervals:
    return {"note": "no device kernels in the trace (CPU backend, or the profiler cannot read this device)",
            "kernels": []}
  span_us = (max(e for _, e in intervals) - min(s for s, _ in intervals)) / 1e3
  kernels = sorted(({"name": name[:160], "count_per_call": len(d) / calls, "us_per_call": sum(d) / calls,
                     "mean_us": sum(d) / len(d)} for name, d in by_name.items()),
                   key=lambda k: -k["us_per_call"])
  n = sum(len(d) for d in by_name.values())
  return {"calls": calls, "kernels_per_call": n / calls, "kernel_us_per_call": sum(map(sum, by_name.values())) / calls,
          "busy_us_per_call": _merged_length(intervals) / 1e3 / calls, "span_us_per_call": span_us / calls,
          "mean_kernel_us": sum(map(sum, by_name.values())) / n, "kernels": kernels[:top],
          "distinct_kernels": len(by_name)}


def format_table(profile: dict, title: str) -> str:
  """The profile as text: a header line and one row per kernel name."""
  if not profile.get("kernels"):
    return f"{title}: {profile.get('note', 'empty profile')}"
  head = (f"{title}: {profile['kernels_per_call']:.0f} kernels/call ({profile['distinct_kernels']} distinct), "
          f"kernel time {profile['kernel_us_per_call'] / 1e3:.2f} ms, busy {profile['busy_us_per_call'] / 1e3:.2f} ms, "
          f"span {profile['span_us_per_call'] / 1e3:.2f} ms per call, mean kernel {profile['mean_kernel_us']:.1f} µs")
  rows = [f"  {k['us_per_call'] / 1e3:8.3f} ms  {k['count_per_call']:7.0f}×  {k['mean_us']:8.1f} µs  {k['name']}"
          for k in profile["kernels"]]
  return "\n".join([head, *rows])


def region_table(trace: dict) -> dict:
  """Where a Mosaic GPU kernel's time goes inside it: the ``jax.named_scope`` ranges its profiler recorded (a Chrome
  trace of begin/end events, one thread per warpgroup and CTA, as ``plgpu.CompilerParams(profile_dir=...)`` writes
  it), grouped by name. Per range name: how often each thread entered it, the mean µs of one entry (µs a loop step
  for a range entered once a step), and the mean, least and largest total µs of a thread. Ranges nest; a name's time
  includes its inner ranges'."""
  open_ranges: dict[int, list[dict]] = defaultdict(list)
  spans: dict[int, list[float]] = {}
  durations: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
  for event in trace["traceEvents"]:
    thread, time = event["tid"], event["ts"]
    first, last = spans.get(thread, (time, time))
    spans[thread] = [min(first, time), max(last, time)]
    if event["ph"] == "B":
      open_ranges[thread].append(event)
    elif event["ph"] == "E":
      begin = open_ranges[thread].pop()
      if begin["name"] != event["name"]:
        raise ValueError(f"unbalanced trace: {begin['name']!r} closed by {event['name']!r} on thread {thread}")
      durations[event["name"]][thread].append(time - begin["ts"])
  if not spans:
    return {"note": "the trace holds no ranges", "regions": []}
  threads = len(spans)
  regions = []
  for name, by_thread in durations.items():
    totals = [sum(d) for d in by_thread.values()]
    count = sum(map(len, by_thread.values()))
    regions.append({"name": name, "threads": len(by_thread), "count_per_thread": count / len(by_thread),
                    "mean_us": sum(totals) / count, "us_per_thread": sum(totals) / len(by_thread),
                    "min_us_per_thread": min(totals), "max_us_per_thread": max(totals)})
  span = sum(last - first for first, last in spans.values()) / threads
  return {"threads": threads, "span_us_per_thread": span,
          "regions": sorted(regions, key=lambda r: -r["us_per_thread"])}


def format_regions(table: dict, title: str) -> str:
  """:func:`region_table` as text: a header line and one row per range name."""
  if not table.get("regions"):
    return f"{title}: {table.get('note', 'empty trace')}"
  head = f"{title}: {table['threads']} threads, {table['span_us_per_thread']:.2f} µs recorded per thread"
  rows = [f"  {r['mean_us']:8.3f} µs × {r['count_per_thread']:5.0f} = {r['us_per_thread']:8.2f} µs a thread "
          f"({r['min_us_per_thread']:.2f}–{r['max_us_per_thread']:.2f})  {r['name']}" for r in table["regions"]]
  return "\n".join([head, *rows])
