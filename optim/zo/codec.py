"""Codecs for the projected gradients workers exchange: ``log8`` (one byte), ``job9`` (the paper's 9 bits) and ``f32``.

Just One Byte (Zelikman et al., arXiv 2306.10015, ``app.py``) sends ``code = clip(round(16 ln|g|), -127, 127)`` and
the sign: 9 bits, decoded as ``sign · e^{code/16}`` (and then, in the reference, applies the *unquantised* value).
Here everyone, the sender included, applies the decoded value, so all copies of the parameters stay identical
([deviation] from the reference). Codes are uint8 arrays ``[..., num_bytes]``:

* ``log8`` (default): one byte = sign bit · 128 + (c + 64) with c = clip(round(8 ln|g|), -63, 63), decoded as
  ±e^{c/8}. |g| in [e^{-63/8}, e^{63/8}] ≈ [3.8e-4, 2.6e3] round-trips within a relative error of e^{1/16} − 1
  ≈ 6.5%; magnitudes outside that range clip to its ends. Byte 0x00 is exactly zero (g = 0); byte 0x80 ("negative
  zero") marks a non-finite g: it decodes to zero and is counted.
* ``job9``: the reference's 9-bit code in two bytes (little-endian 16-bit value sign · 256 + (c + 128)), c =
  clip(round(16 ln|g|), -127, 127), relative error ≤ e^{1/32} − 1 ≈ 3.2%; value 0 is zero, 256 non-finite.
* ``f32``: the float's four bytes, exact; a non-finite value decodes to zero and is counted.

Decoding reads a table of float32 constants computed once in float64 by numpy, so a code means the same float on
every backend (an ``exp`` on the device could differ in the last bit between CPU and GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Codec(NamedTuple):
  """One wire format for projected gradients.

  Attributes:
    name: ``log8``, ``job9`` or ``f32``.
    num_bytes: bytes per value on the wire.
    relative_error: bound on |decode(encode(g)) − g| / |g| for |g| in [low, high].
    low, high: the magnitudes represented without clipping (0 and inf for ``f32``).
    encode: float32 [...] -> uint8 [..., num_bytes].
    decode: uint8 [..., num_bytes] -> (float32 [...], bool [...] true where the sender's value was not finite).
  """

  name: str
  num_bytes: int
  relative_error: float
  low: float
  high: float
  encode: Callable[[jax.Array], jax.Array]
  decode: Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _log_code(g: jax.Array, steps_per_nat: int, limit: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(c int32, negative bool, finite bool): c = clip(round(steps · ln|g|), -limit, limit), or -(limit + 1) for 0."""
  g = jnp.asarray(g, jnp.float32)
  finite, magnitude = jnp.isfinite(g), jnp.abs(g)
  safe = jnp.where(finite & (magnitude > 0), magnitude, 1.0)
  c = jnp.clip(jnp.round(steps_per_nat * jnp.log(safe)), -limit, limit).astype(jnp.int32)
  c = jnp.where(magnitude > 0, c, -(limit + 1))
  return c, (g < 0) & finite, finite


def _magnitudes(steps_per_nat: int, limit: int) -> np.ndarray:
  """float32 [2·(limit + 1)]: entry c + limit + 1 is e^{c/steps} (entry 0, c = -(limit + 1), is zero)."""
  table = np.exp(np.arange(-(limit + 1), limit + 1, dtype=np.float64) / steps_per_nat).astype(np.float32)
  table[0] = 0.0
  return table


_LOG8_TABLE = _magnitudes(8, 63)
_JOB9_TABLE = _magnitudes(16, 127)


def _log8_encode(g: jax.Array) -> jax.Array:
  c, negative, finite = _log_code(g, 8, 63)
  byte = negative.astype(jnp.int32) * 128 + (c + 64)
  return jnp.where(finite, byte, 0x80).astype(jnp.uint8)[..., None]


def _log8_decode(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
  byte = codes[..., 0].astype(jnp.int32)
  magnitude = jnp.asarray(_LOG8_TABLE)[byte & 0x7F]
  return jnp.where(byte >= 0x80, -magnitude, magnitude), byte == 0x80


def _job9_encode(g: jax.Array) -> jax.Array:
  c, negative, finite = _log_code(g, 16, 127)
  value = jnp.where(finite, negative.astype(jnp.int32) * 256 + (c + 128), 256)
  return jnp.stack([value & 0xFF, value >> 8], axis=-1).astype(jnp.uint8)


def _job9_decode(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
  value = codes[..., 0].astype(jnp.int32) + 256 * codes[..., 1].astype(jnp.int32)
  magnitude = jnp.asarray(_JOB9_TABLE)[value & 0xFF]
  return jnp.where(value >= 256, -magnitude, magnitude), value == 256


def _f32_encode(g: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.asarray(g, jnp.float32), jnp.uint8)


def _f32_decode(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
  value = jax.lax.bitcast_convert_type(codes, jnp.float32)
  bad = ~jnp.isfinite(value)
  return jnp.where(bad, 0.0, value), bad


CODECS = {
    "log8": Codec("log8", 1, math.expm1(1 / 16), math.exp(-63 / 8), math.exp(63 / 8), _log8_encode, _log8_decode),
    "job9": Codec("job9", 2, math.expm1(1 / 32), math.exp(-127 / 16), math.exp(127 / 16), _job9_encode,
                  _job9_decode),
    "f32": Codec("f32", 4, 0.0, 0.0, math.inf, _f32_encode, _f32_decode),
}


def get_codec(name: str) -> Codec:
  """The codec called ``name``; ``ValueError`` listing the codecs otherwise."""
  try:
    return CODECS[name]
  except KeyError:
    raise ValueError(f"codec must be one of {', '.join(CODECS)} (got {name!r})") from None
