"""Wire formats for DiLoCo's outer gradients and their two-stage mean over the replicas, ``quantized_mean``.

Streaming DiLoCo sends the pseudo-gradient Δ in low precision and keeps everything else in float32 ("Streaming
DiLoCo with overlapping communication: Towards a Distributed Free Lunch", Douillard et al., arXiv:2501.18512, §2.4:
4-bit floats on the wire, accumulation and outer step in float32). A fragment's Δ travels as rows x: f32 [R, W]
(``W = row_size`` consecutive elements of one parameter). A scaled format stores per row the float32 scale
s = max|x| and a code per element for x / s on a grid whose largest magnitude is 1; decoding is code value · s, so
a row's largest element decodes to exactly ±s and a decoded row is a fixed point of encode ∘ decode.

| format | element | grid of x / s (magnitudes) | bytes per row | worst error per element, ``h`` · s |
|---|---|---|---|---|
| ``fp32`` | float32 | (exact) | 4W | 0 |
| ``bf16`` | bfloat16, no scale | (round to nearest even) | 2W | 2⁻⁸·|x| <= 2⁻⁸·max|x| |
| ``int8`` | int8 | k/127, k = 0..127 | W + 4 | s/254 |
| ``fp8_e4m3`` | float8_e4m3fn | e4m3 values / 448 | W + 4 | s/28 (half the gap below 448) |
| ``e2m1`` | 4 bits (``jnp.float4_e2m1fn``) | {0, .5, 1, 1.5, 2, 3, 4, 6} / 6 | W/2 + 4 | s/6 (half the gap 4..6) |
| ``e3m0`` | 4 bits: sign + 3-bit exponent | {0} ∪ {2⁻ᵏ, k = 0..6} | W/2 + 4 | s/4 (half the gap 1/2..1) |

``quantized_mean`` (as torchft's ``allreduce_quantized``) averages over a mesh axis of M replicas in two stages,
each a plain collective of the encoded bytes: every replica encodes its rows and ``all_to_all`` hands replica j the
j-th block of R/M rows from everyone; replica j decodes them, sums in float32 in replica order 0..M−1, divides by M,
re-encodes the mean and ``all_gather`` returns every block to everyone, who decode. Every replica therefore ends
with the same bits. Each stage sends (M−1)/M of the encoded payload per replica, as a ring all-reduce does.
Error bound per element of row r (both stages round to nearest): the first stage moves the mean by at most
h·mean_i s_i,r and the second re-rounds a row whose largest magnitude is at most s̄_r + h·mean_i s_i,r, so
|qmean − mean| <= h·((1 + h)·mean_i s_i,r + s̄_r) + ε, with s_i,r the max |x| of replica i's row, s̄_r that of the
exact mean row, and ε a few float32 roundings of the largest magnitude.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Magnitude grids of the 4-bit formats, x / s scaled so the largest is 1 (ascending).
_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32) / 6
_E3M0 = np.array([0] + [2.0 ** -k for k in range(6, -1, -1)], np.float32)


@dataclasses.dataclass(frozen=True)
class WireFormat:
  """How a row of float32 values is sent.

  Attributes:
    name: the format's name (module table).
    bits: bits per element on the wire.
    scaled: a float32 scale (the row's max |x|) travels with each row.
    half_gap: h, the worst rounding error per element as a fraction of the row's scale (or of max|x| unscaled).
  """

  name: str
  bits: int
  scaled: bool
  half_gap: float

  def row_bytes(self, row_size: int) -> int:
    """Bytes one row of ``row_size`` elements takes on the wire."""
    return row_size * self.bits // 8 + (4 if self.scaled else 0)

  def encode(self, rows: jax.Array) -> tuple[jax.Array, ...]:
    """rows: f32 [R, W] -> the arrays sent, each with leading dim R (codes, then the f32 scales [R] if scaled)."""
    if self.name == "fp32":
      return (rows.astype(jnp.float32),)
    if self.name == "bf16":
      return (rows.astype(jnp.bfloat16),)
    scale = jnp.max(jnp.abs(rows), axis=1)
    safe = jnp.where(scale > 0, scale, 1.0)
    unit = rows / safe[:, None]  # in [-1, 1]; the row's largest element is exactly ±1
    return _encode_unit(self.name, unit), scale

  def decode(self, payload: tuple[jax.Array, ...]) -> jax.Array:
    """The arrays of :meth:`encode` -> f32 [R, W]."""
    if not self.scaled:
      return payload[0].astype(jnp.float32)
    codes, scale = payload
    return _decode_unit(self.name, codes) * scale[:, None]


def _encode_unit(name: str, unit: jax.Array) -> jax.Array:
  """unit: f32 [R, W] in [-1, 1] -> codes (int8 / float8 [R, W], or two 4-bit codes per uint8 [R, W/2])."""
  if name == "int8":
    return jnp.round(unit * 127).astype(jnp.int8)
  if name == "fp8_e4m3":
    return (unit * 448).astype(jnp.float8_e4m3fn)
  if name == "e2m1":  # round to nearest even in float4_e2m1fn, then the grid index of the rounded magnitude
    rounded = jnp.abs((unit * 6).astype(jnp.float4_e2m1fn).astype(jnp.float32)) / 6
    index = _grid_index(rounded, _E2M1)
  else:  # e3m0: nearest power of two 2^-k (k <= 6) or 0; ties round toward zero
    index = _grid_index(jnp.abs(unit), _E3M0)
  # bit 3: sign, bits 0-2: magnitude index; zero is always +0, so a decoded row encodes to the same codes
  codes = (index | jnp.where((unit < 0) & (index > 0), 8, 0)).astype(jnp.uint8)
  return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _grid_index(magnitude: jax.Array, grid: np.ndarray) -> jax.Array:
  """Index of the grid value nearest to each magnitude (ties toward the smaller); int32, same shape."""
  midpoints = (grid[1:] + grid[:-1]) / 2
  return jnp.sum(magnitude[..., None] > jnp.asarray(midpoints), axis=-1).astype(jnp.int32)


def _decode_unit(name: str, codes: jax.Array) -> jax.Array:
  # Multiplying by a float32 constant (never dividing, which XLA may turn into a multiply by the rounded
  # reciprocal) keeps the decoded grid the same on every backend and on the host.
  if name == "int8":
    return codes.astype(jnp.float32) * np.float32(1 / 127)
  if name == "fp8_e4m3":
    return codes.astype(jnp.float32) * np.float32(1 / 448)
  nibbles = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)
  grid = jnp.asarray(_E2M1 if name == "e2m1" else _E3M0)
  magnitude = grid[(nibbles & 7).astype(jnp.int32)]
  return jnp.where(nibbles >= 8, -magnitude, magnitude)


FORMATS: dict[str, WireFormat] = {f.name: f for f in (
    WireFormat("fp32", 32, False, 0.0),
    WireFormat("bf16", 16, False, 2.0 ** -8),
    WireFormat("int8", 8, True, 1 / 254),
    WireFormat("fp8_e4m3", 8, True, 16 / 448),
    WireFormat("e2m1", 4, True, 1 / 6),
    WireFormat("e3m0", 4, True, 1 / 4),
)}


def get_format(name: str) -> WireFormat:
  """The wire format called ``name``; ``KeyError`` listing the formats otherwise."""
  try:
    return FORMATS[name]
  except KeyError:
    raise KeyError(f"unknown wire format {name!r}; formats: {', '.join(FORMATS)}") from None


def quantized_mean(rows: jax.Array, fmt: WireFormat, axis_name: str, axis_size: int) -> jax.Array:
  """The mean over the ``axis_name`` replicas of rows f32 [R, W] (R divisible by ``axis_size``), sent in ``fmt``.

  Call inside ``shard_map`` manual over ``axis_name``; the result is bit-identical on every replica (module
  docstring: two stages, float32 accumulation in replica order, error bound).
  """
  num_rows = rows.shape[0]
  if num_rows % axis_size:
    raise ValueError(f"quantized_mean needs rows ({num_rows}) divisible by the replicas ({axis_size})")
  block = num_rows // axis_size
  sent = [x.reshape(axis_size, block, *x.shape[1:]) for x in fmt.encode(rows)]
  received = [jax.lax.all_to_all(x, axis_name, 0, 0) for x in sent]  # [i] = my block from replica i
  parts = fmt.decode(tuple(x.reshape(num_rows, *x.shape[2:]) for x in received)).reshape(axis_size, block, -1)
  total = parts[0]
  for i in range(1, axis_size):  # a fixed order, so the sum does not depend on the collective's implementation
    total = total + parts[i]
  mean_block = total / axis_size
  gathered = [jax.lax.all_gather(x, axis_name, axis=0, tiled=True) for x in fmt.encode(mean_block)]
  return fmt.decode(tuple(gathered))


def wire_bytes(rows: int, row_size: int, fmt: WireFormat, replicas: int) -> int:
  """Bytes one replica sends in :func:`quantized_mean` of [rows, row_size]: (M−1)/M of the payload per stage."""
  block_bytes = rows // replicas * fmt.row_bytes(row_size)
  return 2 * (replicas - 1) * block_bytes


def bound(rows_by_replica: Any, fmt: WireFormat) -> np.ndarray:
  """The per-element error bound of :func:`quantized_mean` (module docstring) for host arrays [M, R, W]: [R, 1]."""
  rows_by_replica = np.asarray(rows_by_replica, np.float32)
  mean = rows_by_replica.mean(axis=0)
  scales = np.abs(rows_by_replica).max(axis=2)  # [M, R]
  slack = 8 * np.finfo(np.float32).eps * np.abs(rows_by_replica).max(axis=(0, 2))
  h = fmt.half_gap
  return (h * ((1 + h) * scales.mean(axis=0) + np.abs(mean).max(axis=1)) + slack)[:, None]
