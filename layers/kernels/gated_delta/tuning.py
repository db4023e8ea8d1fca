"""Triton launch settings of the gated-delta Pallas kernels, passed down as a static (hashable) argument.

``gated_delta_rule(..., tuning=Tuning(...))`` retraces the kernels with other settings; no global state, no cache
clearing. A/B timings of the fields on H100/H200 are in docs/benchmarks.md (``benchmarks/linear_attention.py
--tunings``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch settings, read when a kernel is traced.

  ``scan_forward_stages`` > 1 lets Triton prefetch the next chunk's tiles while the current one is multiplied;
  ``wy_backward_kernel`` runs the WY backward as ``pallas_triton.wy_backward`` (else as batched XLA einsums), and
  ``wy_backward_warps`` spreads its [C, K] float32 accumulators over more registers.
  """

  scan_forward_stages: int = 2
  scan_backward_stages: int = 1
  wy_backward_kernel: bool = True
  wy_backward_warps: int = 8
