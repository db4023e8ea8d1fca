"""The attention oracle: FuseMax's numerically stable 3-pass cascade (C4) over the pattern's dense mask.

Every other implementation is tested against :func:`attention_reference`. It costs O(T·S) memory, so the automatic
order of ``api.attention`` ends here only when nothing faster applies (and warns).
"""

from __future__ import annotations

from layers.kernels.attention.call import Implementation
from layers.kernels.attention.fusemax import three_pass
from layers.kernels.attention.masks import traced_mask
from layers.kernels.attention.patterns import Pattern


def attention_reference(q, k, v, pattern: Pattern, scale=None, q_offset: int = 0):
  """C4 with the pattern's dense mask: the oracle. Returns (o [B, T, Hq, F], lse [B, T, Hq])."""
  return three_pass(q, k, v, traced_mask(pattern, q.shape[1], k.shape[1], k.shape[2], q_offset), scale)


IMPLEMENTATION = Implementation(
    "reference", unsupported=lambda call: None,
    attend=lambda c: attention_reference(c.q, c.k, c.v, c.pattern, scale=c.scale, q_offset=c.q_offset))
