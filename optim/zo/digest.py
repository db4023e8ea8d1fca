"""``param_sha256``: a SHA-256 tree hash of the exact parameter bytes, computed on the device or with hashlib.

Workers compare their copies of θ every few rounds (Just One Byte, arXiv 2306.10015, hashes every 64 rounds). The
comparison must see every bit, and it runs inside the jitted step (each worker hashes its own copy, only 32 bytes
per worker are gathered), so the hash is built from SHA-256 (FIPS 180-4) in a form a device computes in parallel:

  level 0:  each leaf's bytes (C order, little-endian, in ``jax.tree.leaves`` order) cut into C-byte chunks, the
            last one zero-padded;  H₀ = SHA-256(chunk₁) ‖ SHA-256(chunk₂) ‖ ...
  level i+1: H_{i+1} = the same over the bytes of H_i, until 32 bytes remain: that is ``param_sha256``.

:func:`tree_digest_reference` computes it with ``hashlib`` from host arrays (the summary, the replay tool); the
device version :func:`tree_digest` runs the SHA-256 compression function on uint32 lanes, one lane per chunk, and
reads each leaf's chunk words straight from the leaf (a gather per 64-byte block), so it allocates about one
chunk-block per chunk, never a copy of θ. Only leaves with 4-byte dtypes (float32, int32, uint32) are hashed on
the device.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHUNK_BYTES = 4096
_K = np.array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2],
    dtype=np.uint32)
_H0 = np.array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19],
               dtype=np.uint32)


def _rotr(x: jax.Array, n: int) -> jax.Array:
  return (x >> np.uint32(n)) | (x << np.uint32(32 - n))


def compress(state: jax.Array, block: jax.Array) -> jax.Array:
  """SHA-256's compression function on lanes: state uint32 [n, 8], block uint32 [n, 16] (big-endian words).

  The 64 rounds run in a ``fori_loop`` over a rolling 16-word message schedule (unrolled, XLA's simplifier takes
  minutes on them)."""

  def round_(t, carry):
    (a, b, c, d, e, f, g, h), w = carry
    t1 = h + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + jnp.asarray(_K)[t] + w[0]
    t2 = (_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))
    s0 = _rotr(w[1], 7) ^ _rotr(w[1], 18) ^ (w[1] >> np.uint32(3))
    s1 = _rotr(w[14], 17) ^ _rotr(w[14], 19) ^ (w[14] >> np.uint32(10))
    w = jnp.concatenate([w[1:], (w[0] + s0 + w[9] + s1)[None]], axis=0)  # word t + 16 of the schedule
    return (t1 + t2, a, b, c, d + t1, e, f, g), w

  start = tuple(state[:, i] for i in range(8))
  final, _ = jax.lax.fori_loop(0, 64, round_, (start, block.T))
  return state + jnp.stack(final, axis=1)


def _finish(state: jax.Array, message_bytes: int) -> jax.Array:
  """Compress SHA-256's padding block of a message of ``message_bytes`` (a multiple of 64) into every lane."""
  bits = message_bytes * 8
  pad = np.zeros(16, np.uint32)
  pad[0], pad[14], pad[15] = 0x80000000, bits >> 32, bits & 0xFFFFFFFF
  return compress(state, jnp.broadcast_to(jnp.asarray(pad), (state.shape[0], 16)))


def sha256_rows(words: jax.Array) -> jax.Array:
  """uint32 [n, 8]: the standard SHA-256 of each row of ``words`` uint32 [n, 16·m] (big-endian message words)."""
  n, m = words.shape[0], words.shape[1] // 16
  blocks = words.reshape(n, m, 16)
  state = jax.lax.fori_loop(0, m, lambda b, s: compress(s, blocks[:, b]), jnp.broadcast_to(jnp.asarray(_H0), (n, 8)))
  return _finish(state, m * 64)


def _byteswap(x: jax.Array) -> jax.Array:
  return ((x & np.uint32(0xFF)) << np.uint32(24)) | ((x & np.uint32(0xFF00)) << np.uint32(8)) | \
         ((x >> np.uint32(8)) & np.uint32(0xFF00)) | (x >> np.uint32(24))


def _leaf_chunk_digests(leaves: list[jax.Array], chunk_bytes: int) -> jax.Array:
  """uint32 [Σ chunks, 8]: level 0 over ``leaves`` (4-byte dtypes), one lane per chunk, all leaves in one loop."""
  chunk_words = chunk_bytes // 4
  flats, starts = [], []
  for leaf in leaves:
    if jnp.dtype(leaf.dtype).itemsize != 4:
      raise ValueError(f"the device hash reads 4-byte leaves only (got {leaf.dtype})")
    flat = leaf.reshape(-1)  # gathered in its own dtype: converting the whole leaf first would copy it
    chunks = max(1, -(-flat.size // chunk_words))
    flats.append(flat)
    starts.append((np.arange(chunks, dtype=np.int32) * chunk_words)[:, None] + np.arange(16, dtype=np.int32))

  def block(b, state):
    rows = [jax.lax.bitcast_convert_type(jnp.take(flat, start + 16 * b, mode="fill", fill_value=0), jnp.uint32)
            for flat, start in zip(flats, starts)]
    return compress(state, _byteswap(jnp.concatenate(rows, axis=0)))

  lanes = sum(s.shape[0] for s in starts)
  state = jax.lax.fori_loop(0, chunk_words // 16, block, jnp.broadcast_to(jnp.asarray(_H0), (lanes, 8)))
  return _finish(state, chunk_bytes)


def tree_digest(params: Any, chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
  """uint32 [8]: ``param_sha256`` of ``params`` (module docstring) on the device; jittable."""
  if chunk_bytes % 64:
    raise ValueError(f"chunk_bytes must be a multiple of 64 (got {chunk_bytes})")
  digests = _leaf_chunk_digests(jax.tree.leaves(params), chunk_bytes)
  chunk_words = chunk_bytes // 4
  while digests.shape[0] > 1:
    flat = digests.reshape(-1)
    rows = -(-flat.size // chunk_words)
    digests = sha256_rows(jnp.pad(flat, (0, rows * chunk_words - flat.size)).reshape(rows, chunk_words))
  return digests[0]


def digest_hex(words: Any) -> str:
  """The 64 hex digits of a digest given as uint32 [8] (big-endian words)."""
  return "".join(f"{int(w):08x}" for w in np.asarray(words, np.uint32))


def _chunks(data: bytes, size: int) -> list[bytes]:
  pieces = [data[i:i + size] for i in range(0, max(len(data), 1), size)]
  return [p + bytes(size - len(p)) for p in pieces]


def tree_digest_reference(params: Any, chunk_bytes: int = CHUNK_BYTES) -> str:
  """``param_sha256`` of host (or device) arrays with ``hashlib``, as 64 hex digits."""
  level = b"".join(hashlib.sha256(chunk).digest() for leaf in jax.tree.leaves(params)
                   for chunk in _chunks(np.ascontiguousarray(np.asarray(leaf)).astype(
                       np.asarray(leaf).dtype.newbyteorder("<")).tobytes(), chunk_bytes))
  while len(level) > 32:
    level = b"".join(hashlib.sha256(chunk).digest() for chunk in _chunks(level, chunk_bytes))
  return level.hex()
