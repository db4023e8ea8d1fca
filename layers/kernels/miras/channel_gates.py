"""Per-channel dual-form products of a chunk without its [c, c, d] coefficient array: sub-blocks, factored.

"It's All Connected" (Behrouz et al., arXiv 2504.13173) with per-channel gates: a chunk's step coefficients are
C[t, s, i] = exp(lr_t,i − lb_s,i) η_s,i where s ≤ t (post reads; s < t for pre reads), lb the cumulative log-decay
and lr the reads' (lb, or lb − log α for pre reads). Two products of the chunk step need them:

  * the first layer's scores  S[t, s] = Σ_i x_ti y_si C[t, s, i]   [c, c]  (``Coefficients.scores``);
  * the second layer's mixing M[t, o] = Σ_s a_ts C[t, s, o] e_so    [c, d]  (``Coefficients.mix``).

Formed as written they cost a [c, c, d] array per chunk and head (an XLA reduction, slow to compile on the GPU). Here
the chunk is cut into blocks of ``block`` rows, as the secondary chunking of Gated Linear Attention (Yang et al.,
arXiv 2312.06635) does: for s before the block of t, C = exp(lr_t − R) · exp(R − lb_s) η_s with R the block's first
read decay, so both factors are ≤ 1 (lr and lb never increase; s < block start means lb_s ≥ R) and the product is
a matmul; within the block C is formed element-wise, [c / block, block, block, d]: a (c / block)-th of the full array.
Shapes: one head's chunk (vmap for more); gates [c, d]. Equal to the element-wise form (tests, float64).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

BLOCK = 16  # rows per sub-block (the chunk size's largest divisor up to this is used)

_HIGHEST = jax.lax.Precision.HIGHEST


def block_size(chunk: int) -> int:
  return math.gcd(chunk, BLOCK)


def coefficient_elements(chunk: int, d: int) -> int:
  """Elements of the coefficient arrays one product forms per head and chunk: [c / p, c, d] + [c / p, p, p, d]."""
  p = block_size(chunk)
  return (chunk // p) * chunk * d + chunk * p * d


def _factors(lr, lb, eta, block: int):
  """(row factors exp(lr_t − R_b) [nb, block, d] for the rows of block b, column factors exp(R_b − lb_s) η_s
  [nb, c, d] for every s before block b, zero from its start on)."""
  c, d = lr.shape
  nb = c // block
  start = lr[::block]  # R_b [nb, d]
  rows = jnp.exp(lr.reshape(nb, block, d) - start[:, None])
  before = (jnp.arange(c)[None, :] < (jnp.arange(nb) * block)[:, None])[..., None]  # [nb, c, 1]
  cols = jnp.exp(jnp.where(before, start[:, None] - lb[None], -jnp.inf)) * eta[None]
  return rows, cols


def _within(lr, lb, eta, block: int, post: bool):
  """C[t, s, i] for t and s in the same block: [nb, block, block, d] (zero where s > t, or s ≥ t for pre reads)."""
  c, d = lr.shape
  nb = c // block
  t = jnp.arange(block)
  mask = (t[:, None] >= t[None, :]) if post else (t[:, None] > t[None, :])
  lr_b, lb_b = lr.reshape(nb, block, d), lb.reshape(nb, block, d)
  diff = jnp.where(mask[None, ..., None], lr_b[:, :, None] - lb_b[:, None], -jnp.inf)
  return jnp.exp(diff) * eta.reshape(nb, 1, block, d)


def _block_diagonal(blocks: jax.Array) -> jax.Array:
  """[nb, p, p] blocks -> the [nb·p, nb·p] matrix with them on its diagonal."""
  nb, p, _ = blocks.shape
  eye = jnp.eye(nb, dtype=blocks.dtype)
  return jnp.einsum("ab,atp->atbp", eye, blocks).reshape(nb * p, nb * p)


class Coefficients(NamedTuple):
  """One head's chunk of per-channel step coefficients C[t, s, i] = exp(lr_ti − lb_si) η_si (s ≤ t for post reads,
  s < t for pre), held as the factors of its sub-blocks (formed once, shared by both products): ``rows`` exp(lr_t − R_b)
  [nb, p, d], ``cols`` exp(R_b − lb_s) η_s [nb, c, d] (zero from block b on), ``within`` [nb, p, p, d]."""

  rows: jax.Array
  cols: jax.Array
  within: jax.Array

  @classmethod
  def from_gates(cls, eta, log_alpha, log_b, *, post: bool, block: int | None = None) -> Coefficients:
    """From the chunk's η, log α and cumulative log-decay [c, d]; ``block`` rows per sub-block (``block_size``)."""
    block = block or block_size(eta.shape[0])
    lr = log_b if post else log_b - log_alpha
    return cls(*_factors(lr, log_b, eta, block), _within(lr, log_b, eta, block, post))

  def scores(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """S[t, s] = Σ_i x_ti y_si C[t, s, i]: x, y [c, d] -> [c, c] (float32 products)."""
    c, d = x.shape
    nb, p = self.rows.shape[:2]
    earlier = jnp.einsum("btd,bsd->bts", x.reshape(nb, p, d) * self.rows, y[None] * self.cols, precision=_HIGHEST)
    within = jnp.einsum("btd,bsd,btsd->bts", x.reshape(nb, p, d), y.reshape(nb, p, d), self.within,
                        precision=_HIGHEST)
    return earlier.reshape(c, c) + _block_diagonal(within)

  def mix(self, a: jax.Array, e: jax.Array) -> jax.Array:
    """M[t, o] = Σ_s a_ts C[t, s, o] e_so: a [c, c], e [c, d] -> [c, d] (float32 products)."""
    c, d = e.shape
    nb, p = self.rows.shape[:2]
    earlier = self.rows * jnp.einsum("bts,bsd->btd", a.reshape(nb, p, c), e[None] * self.cols, precision=_HIGHEST)
    a_within = jnp.moveaxis(jnp.diagonal(a.reshape(nb, p, nb, p), axis1=0, axis2=2), -1, 0)  # [nb, p, p]
    within = jnp.einsum("bts,btsd,bsd->btd", a_within, self.within, e.reshape(nb, p, d), precision=_HIGHEST)
    return (earlier + within).reshape(c, d)
