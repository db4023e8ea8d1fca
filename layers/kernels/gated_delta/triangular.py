"""(I + A)⁻¹ of strictly lower-triangular A by recursive doubling, shared by the XLA and Pallas WY paths.

Used by :mod:`wy` (batched einsums) and :mod:`pallas_triton` (inside one kernel per chunk, with Triton's dot).
See :mod:`wy` for why recursive doubling replaced a Neumann series.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def unit_lower_inverse(a: jax.Array, matmul=None) -> jax.Array:
  """(I + A)⁻¹ for strictly lower-triangular A [..., c, c] (c a power of two), float32.

  Recursive doubling: with T the inverse of I + A's diagonal blocks of size b, the blocks of size 2b have inverse
  T - T A_b T, where A_b keeps A's entries below the b-blocks inside each 2b-block ([[T1, 0], [-T2 A21 T1, T2]]).
  log2(c) steps of two matmuls; only blocks of the bounded inverse are ever formed. ``matmul`` defaults to a
  float32-accumulating ``jnp.matmul``; the Pallas kernel passes Triton's dot and runs the same steps per chunk.
  """
  matmul = matmul or functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  c = a.shape[-1]
  a = a.astype(jnp.float32)
  rows, cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0), jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  inv = jnp.where(rows == cols, 1.0, 0.0)
  block = 1
  while block < c:
    off = jnp.where((rows // (2 * block) == cols // (2 * block)) & (rows // block > cols // block), a, 0.0)
    inv = inv - matmul(matmul(inv, off), inv)
    block *= 2
  return inv
