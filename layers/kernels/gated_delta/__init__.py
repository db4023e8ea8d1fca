"""Gated delta rule kernels: token recurrence (reference), chunked WY form (XLA / Pallas-Triton), decode step."""

from layers.kernels.gated_delta.api import (
    IMPLEMENTATIONS,
    SUPPORTED_CHUNK_SIZES,
    gated_delta_rule,
    gated_delta_step,
)
from layers.kernels.gated_delta.tuning import Tuning

__all__ = ["IMPLEMENTATIONS", "SUPPORTED_CHUNK_SIZES", "Tuning", "gated_delta_rule", "gated_delta_step"]
