"""memlab layers: sequence mixers that register themselves in ``research.models.registry`` on import."""

from layers import gated_deltanet, mom  # noqa: E402,F401  (registers "gdn" and "mom")
from layers import longgen  # noqa: E402,F401  (registers "swa", "sink_window", "block_sparse", "longgen", ...)
