"""Zeroth-order optimisation: MeZO-SPSA and the Just One Byte exchange (seeded directions, one-byte codes, ledger).

Modules by job: ``directions`` (z from seeds), ``codec`` (``log8``, ``job9``, ``f32``), ``rounds`` (estimate →
encode → exchange → apply, fused for inference memory), ``spsa`` (the optax forms ``scale_by_spsa``, ``mezo_sgd``),
``digest`` (``param_sha256`` on the device and with hashlib), ``ledger`` (append-only rounds), ``replay`` (initial
snapshot + ledger = the trained parameters), ``registry`` (``--optimizer mezo_sgd``) and ``regime``
(``--regime zo_spsa``). Importing the package registers the optimizer and the regime.
"""

from optim.zo import regime as _regime  # noqa: F401  (registers the "zo_spsa" regime)
from optim.zo import registry as _registry  # noqa: F401  (registers the "mezo_sgd" optimizer)
from optim.zo.spsa import SPSAState, mezo_sgd, scale_by_spsa

__all__ = ["SPSAState", "mezo_sgd", "scale_by_spsa"]
