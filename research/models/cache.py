"""The variable type of decode-time state, so ``nnx.split(model, nnx.Param, DecodeCache)`` separates it.

Every mixer that supports incremental decoding keeps its state (KV caches, recurrent memory states, conv windows,
the next position) in ``DecodeCache`` variables — or subclasses of it — made by ``init_cache(batch_size,
max_length)``, and reads/updates them when called with ``use_cache=True``.
"""

from __future__ import annotations

from flax import nnx


class DecodeCache(nnx.Variable):
  """Decode-time state of one layer; never a parameter and never checkpointed with the params."""
