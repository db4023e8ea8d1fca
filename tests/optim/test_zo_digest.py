"""``param_sha256`` on the device equals the hashlib reference, bit for bit, and sees every bit."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim.zo.digest import digest_hex, sha256_rows, tree_digest, tree_digest_reference


def test_sha256_rows_is_standard_sha256():
  rng = np.random.default_rng(0)
  words = rng.integers(0, 2**32, size=(5, 48), dtype=np.uint32)  # 3 blocks per message
  got = np.asarray(jax.jit(sha256_rows)(jnp.asarray(words)))
  for row, digest in zip(words, got, strict=True):
    assert digest_hex(digest) == hashlib.sha256(row.astype(">u4").tobytes()).hexdigest()


def _tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(37, 5)).astype(np.float32), "b": rng.normal(size=(300,)).astype(np.float32),
          "n": {"steps": np.arange(7, dtype=np.int32), "scale": np.float32(rng.normal(size=()))}}


@pytest.mark.parametrize("chunk_bytes", [64, 256, 4096])
def test_device_digest_equals_hashlib_reference(chunk_bytes):
  tree = _tree(1)
  got = digest_hex(jax.jit(tree_digest, static_argnums=1)(tree, chunk_bytes))
  assert got == tree_digest_reference(tree, chunk_bytes)
  if chunk_bytes == 4096:  # one chunk per leaf, then one level above: sha256(sha256(leaf chunks) ...)
    leaves = [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]
    level = b"".join(hashlib.sha256(b + bytes(4096 - len(b))).digest() for b in leaves)
    assert got == hashlib.sha256(level + bytes(4096 - len(level))).hexdigest()


def test_one_flipped_bit_in_any_leaf_changes_the_digest():
  tree = _tree(2)
  base = tree_digest_reference(tree, 64)
  digest = jax.jit(tree_digest, static_argnums=1)
  for path in (("w",), ("b",), ("n", "steps")):
    flipped = jax.tree.map(np.copy, tree)
    leaf = flipped
    for key in path:
      leaf = leaf[key]
    leaf.view(np.uint32).reshape(-1)[-1] ^= 1  # the last word of the leaf, lowest bit
    assert digest_hex(digest(flipped, 64)) == tree_digest_reference(flipped, 64) != base


def test_two_byte_leaves_are_refused_on_the_device():
  with pytest.raises(ValueError, match="4-byte"):
    tree_digest({"w": jnp.ones((4,), jnp.bfloat16)})
