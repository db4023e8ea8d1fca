"""One log line when a kernel falls back to an implementation slower than the one a user would expect.

The automatic order of a kernel ``api`` skips what cannot run a call; when that lands on a slow path (the O(T·S)
attention reference, the XLA gated delta rule on a GPU) the run goes on, and says so once per distinct reason on the
``memlab`` logger, instead of training on the slow path without a word.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("memlab")


@functools.cache
def slower_fallback(op: str, chosen: str, reasons: str) -> None:
  """Log ``op runs the slower <chosen> implementation: <reasons>`` (once per distinct message)."""
  log.warning("%s runs the slower %r implementation: %s", op, chosen, reasons)
