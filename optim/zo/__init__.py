"""Zeroth-order optimisation: MeZO-SPSA and the Just One Byte exchange (seeded directions, one-byte codes, ledger).

Modules by job: ``directions`` (z from seeds), ``codec`` (``log8``, ``job9``, ``f32``), ``rounds`` (estimate →
encode → exchange → apply, fused for inference memory), ``spsa`` (the optax forms ``scale_by_spsa``, ``mezo_sgd``),
``digest`` (``param_sha256`` on the device and with hashlib), and the rest of the Just One Byte protocol
(ledger, replay, the training regime) in the modules that follow.
"""

from optim.zo.spsa import SPSAState, mezo_sgd, scale_by_spsa

__all__ = ["SPSAState", "mezo_sgd", "scale_by_spsa"]
