"""Miras memory kernels: the token loops (reference), the chunkwise-parallel XLA form (chunked) and one api."""

from layers.kernels.miras.api import IMPLEMENTATIONS, miras_memory

__all__ = ["IMPLEMENTATIONS", "miras_memory"]
