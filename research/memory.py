"""Memory accounting from XLA's own numbers: the compiled program's buffer sizes and the devices' allocator stats.

``compiled.memory_analysis()`` reports, for one compiled executable, the bytes of its arguments, outputs,
temporaries (XLA's buffer assignment) and generated code; donated arguments that alias outputs are counted once.
"""

from __future__ import annotations

from typing import Any

import jax

_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
           "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
           "host_temp_size_in_bytes")


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Byte counts of one compiled executable, plus ``peak_estimate_bytes`` = arguments + outputs − aliased +
  temporaries (the live-at-once upper bound XLA's buffer assignment implies)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError("this backend gives no memory analysis for compiled programs")
  report = {name: int(getattr(analysis, name, 0) or 0) for name in _FIELDS}
  report["peak_estimate_bytes"] = (report["argument_size_in_bytes"] + report["output_size_in_bytes"]
                                   - report["alias_size_in_bytes"] + report["temp_size_in_bytes"])
  return report


def device_memory() -> list[dict[str, Any]]:
  """Allocator statistics of each local device that reports them (GPU/TPU; the CPU backend reports none)."""
  stats = []
  for device in jax.local_devices():
    try:
      s = device.memory_stats()
    except Exception:  # backends without allocator stats raise rather than return None
      s = None
    if s:
      stats.append({"device": str(device), **{k: int(v) for k, v in s.items() if isinstance(v, (int, float))}})
  return stats


def _mib(n: int) -> str:
  return f"{n / 2**20:10.2f} MiB"


def format_memory_report(report: dict[str, Any]) -> str:
  """Human-readable table of :func:`memory_report`'s output."""
  program = report["compiled"]
  lines = [f"XLA memory analysis of {report['program']}:"]
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes", "peak_estimate_bytes"):
    lines.append(f"  {name.removesuffix('_in_bytes').removesuffix('_bytes'):<22}{_mib(program[name])}")
  for dev in report["devices"]:
    shown = [f"{k} {_mib(dev[k]).strip()}" for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in dev]
    lines.append(f"  {dev['device']}: " + ", ".join(shown))
  return "\n".join(lines)


def memory_report(compiled: jax.stages.Compiled, program: str) -> dict[str, Any]:
  """{"program", "compiled": :func:`compiled_memory`, "devices": :func:`device_memory`}."""
  return {"program": program, "compiled": compiled_memory(compiled), "devices": device_memory()}
