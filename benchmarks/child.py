"""Rows of a benchmark run in a child process (a peer library beside a JAX process that has left it GPU memory)."""

from __future__ import annotations

import json
import os
import subprocess


def rows_from_child(cmd: list[str], child_json: str, op: str) -> list[dict]:
  """Run ``cmd`` (which writes {"rows": [...]} to ``child_json``) with XLA_PYTHON_CLIENT_PREALLOCATE=false; its
  rows, or one error row naming ``op`` if it fails. The child times with its own clock, so the whole child holds the
  timing lock (``--timing-lock``, :func:`benchmarks.linear_attention.alone_on_the_gpu`)."""
  from benchmarks.linear_attention import alone_on_the_gpu

  with alone_on_the_gpu():
    proc = subprocess.run(cmd, env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, check=False)
  if proc.returncode == 0 and os.path.exists(child_json):
    with open(child_json) as f:
      return json.load(f)["rows"]
  return [{"kind": "error", "op": op, "error": f"{op} child exited with {proc.returncode}"}]
