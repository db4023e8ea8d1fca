"""memlab layers: sequence mixers that register themselves with ``research.models.registry`` on import.

``attn``, ``swa``, ``sink_window``, ``block_sparse`` (``layers.attention``), ``longgen``, ``longgen_block``
(``layers.longgen``), ``gdn`` (``layers.gated_deltanet``) and ``mom`` (``layers.mom``); each owns its config.
"""

from layers import attention, gated_deltanet, longgen, mom  # noqa: F401  (each registers its mixers)
from layers.miras import mixers  # noqa: F401  (moneta, yaad, memora, titans)
