"""One run per workdir: an advisory lock that names the process holding it.

``RunLock(workdir)`` takes ``fcntl.flock`` on ``<workdir>/run.lock`` and writes the holder (pid, host, start time)
into it. The kernel releases a flock when its process dies, however it dies, so a lock file left by a killed run is
simply taken over (with one line saying whose it was); a live holder makes the second run stop with one line naming
it. In a multi-process run only process 0 takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


class RunLock:
  """Context manager holding ``<workdir>/run.lock`` for one run (module docstring)."""

  def __init__(self, workdir: str | os.PathLike, *, log: Callable[[str], None] = print):
    self.path = Path(workdir) / "run.lock"
    self._log = log
    self._file = None

  def __enter__(self) -> RunLock:
    self._file = self.path.open("a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder()
      self._file.close()
      raise WorkdirBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it to finish or use "
                        "another --workdir") from None
    previous = self._holder()
    if previous != "unknown":
      self._log(f"took over the lock of a run that is no longer running ({previous})")
    self._file.seek(0)
    self._file.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
              self._file)
    self._file.flush()
    return self

  def _holder(self) -> str:
    self._file.seek(0)
    try:
      info = json.loads(self._file.read() or "{}")
      return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
      return "unknown"

  def __exit__(self, *exc) -> None:
    self._file.seek(0)
    self._file.truncate()  # released cleanly: nothing to take over next time
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
