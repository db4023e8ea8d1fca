"""Gated delta rule kernels: token recurrence (reference), chunked WY form (XLA / Pallas-Triton), decode step."""

from layers.kernels.gated_delta.api import (
    IMPLEMENTATIONS,
    gated_delta_rule,
    gated_delta_step,
)

__all__ = ["IMPLEMENTATIONS", "gated_delta_rule", "gated_delta_step"]
