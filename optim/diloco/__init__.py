"""(Streaming) DiLoCo: low-communication training of M model replicas, as pieces and as the ``diloco`` regime.

"DiLoCo: Distributed Low-Communication Training of Language Models" (arXiv:2311.08105) and "Streaming DiLoCo with
overlapping communication: Towards a Distributed Free Lunch" (arXiv:2501.18512). Modules: ``wire`` (formats of Δ on
the wire and ``quantized_mean``), ``fragments`` (fragments and their staggered schedule), ``streaming`` (the
per-replica algorithm), ``regime`` (``--regime diloco`` in the training loop). Multi-host launch: ``docs/diloco.md``.
"""

from optim.diloco.fragments import FragmentPlan, SyncSchedule
from optim.diloco.regime import DiLoCoConfig, DiLoCoRegime
from optim.diloco.streaming import DiLoCo, DiLoCoState, fingerprint, outer_sgd, replicas_agree
from optim.diloco.wire import FORMATS, WireFormat, get_format, quantized_mean

__all__ = ["FORMATS", "DiLoCo", "DiLoCoConfig", "DiLoCoRegime", "DiLoCoState", "FragmentPlan", "SyncSchedule",
           "WireFormat", "fingerprint", "get_format", "outer_sgd", "quantized_mean", "replicas_agree"]
