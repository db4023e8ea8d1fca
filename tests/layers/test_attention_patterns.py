"""Patterns, block maps and exact visible-pair counts (attention spec §3.3, §3.4, §7 oracles 10, 12-15)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layers.kernels.attention import masks
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow

BS = lambda **kw: BlockSparse(**{"block": 4, "local_blocks": 2, "stride": 3, "num_q_heads": 4, "num_kv_heads": 2,
                                 **kw})
PATTERNS = [Dense(True), Dense(False), SinkWindow(0, 5), SinkWindow(3, 5), SinkWindow(8, 1), BS(), BS(offset=2),
            BS(homo_head=True), BS(num_dense_heads=1), BS(step=1, stride=2), BlockSparse(1, 1, 2)]


def test_sink_window_mask_definition():
  m = masks.dense_mask(SinkWindow(2, 3), 8, 8)[0]
  for i, j in itertools.product(range(8), range(8)):
    assert m[i, j] == (j <= i and (j < 2 or i - j < 3)), (i, j)


def test_block_sparse_mask_matches_dkernel_rule():
  p = BS(offset=1)
  m = masks.dense_mask(p, 40, 40, 2)
  step = max(1, p.stride // p.num_q_heads)
  for h, i, j in itertools.product(range(2), range(40), range(40)):
    qb, kb = i // p.block, j // p.block
    want = j <= i and (qb - kb < p.local_blocks or (kb + h * step + p.offset) % p.stride == 0)
    assert m[h, i, j] == want, (h, i, j)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_row_counts_closed_form(pattern):
  n = 61
  dense = masks.dense_mask(pattern, n, n, 2)
  for h in range(dense.shape[0]):
    np.testing.assert_array_equal(masks.row_counts(pattern, n, h), dense[h].sum(-1))
  assert masks.visible_pairs(pattern, n, 2) == int(dense.sum()) * (2 // dense.shape[0])


def test_sink_window_total_closed_form():
  n, s, w = 1000, 7, 100
  total = w * (w + 1) // 2 + (n - w) * w + s * (s + 1) // 2 + (n - w - s) * s
  assert masks.visible_pairs(SinkWindow(s, w), n) == total


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("tile", [1, 2])
def test_block_classes_match_dense_mask(pattern, tile):
  b = pattern.block * tile if isinstance(pattern, BlockSparse) else 4 * tile
  n, kv_length = 40, 35  # keys at or beyond kv_length are padding
  cls = masks.block_classes(pattern, n, n, b, b, 2, kv_length=kv_length)
  dense = masks.dense_mask(pattern, n, n, 2, kv_length=kv_length)
  tiles = dense.reshape(dense.shape[0], n // b, b, n // b, b)
  np.testing.assert_array_equal(cls != masks.EMPTY, tiles.any(axis=(2, 4)))
  np.testing.assert_array_equal(cls == masks.FULL, tiles.all(axis=(2, 4)))


def _enumerate(ranges):
  visited, full = [], []
  for first, count, stride, masked in ranges:
    blocks = [int(first) + n * stride for n in range(int(count))]
    visited += blocks
    if not masked:
      full += blocks
  return visited, full


@pytest.mark.parametrize("pattern", PATTERNS + [SinkWindow(5, 11), SinkWindow(12, 9)], ids=repr)
@pytest.mark.parametrize("bq,bk", [(4, 4), (8, 4), (4, 8)])
def test_kernel_ranges_cover_visible_tiles_once(pattern, bq, bk):
  if isinstance(pattern, BlockSparse):
    bq = bk = pattern.block
  n, kv_length = 48, 45
  hp = 2 if pattern.head_dependent else 1
  cls = masks.block_classes(pattern, n, n, bq, bk, 2, kv_length=kv_length)
  nq, nk = n // bq, n // bk
  dense = masks.dense_mask(pattern, n, n, 2, kv_length=kv_length)
  for h in range(hp):
    for qb in range(nq):
      visited, full = _enumerate(pattern.key_block_ranges(qb * bq, qb * bq + bq - 1, h, bk, nk, kv_length))
      assert sorted(visited) == sorted(set(visited)), "a key block is visited twice"
      assert set(visited) >= set(np.flatnonzero(cls[h, qb])), (h, qb)
      for kb in full:  # every real row of the tile sees every key of a block claimed FULL
        rows = slice(qb * bq, min(qb * bq + bq, kv_length))
        assert dense[h, rows, kb * bk:kb * bk + bk].all(), (h, qb, kb)
    for kb in range(nk):
      visited, full = _enumerate(pattern.query_block_ranges(kb * bk, kb * bk + bk - 1, h, bq, nq, kv_length))
      assert sorted(visited) == sorted(set(visited))
      assert set(visited) >= set(np.flatnonzero(cls[h, :, kb])), (h, kb)
      for qb in full:
        rows = slice(qb * bq, min(qb * bq + bq, kv_length))
        assert dense[h, rows, kb * bk:kb * bk + bk].all(), (h, qb, kb)


def test_visit_lists_hold_exactly_nonempty_tiles():
  cls = masks.block_classes(SinkWindow(4, 8), 64, 64, 8, 8)
  index, valid = masks.visit_lists(cls)
  for qb in range(cls.shape[1]):
    assert sorted(index[0, qb][valid[0, qb]]) == list(np.flatnonzero(cls[0, qb]))
  # Sink + window: at most sink tile + window tiles + diagonal, independent of N (the point of sparsity).
  assert index.shape[-1] == 3


def test_reductions_to_dense_causal():
  n = 50
  causal = masks.dense_mask(Dense(True), n, n)
  np.testing.assert_array_equal(masks.dense_mask(SinkWindow(3, n), n, n), causal)
  np.testing.assert_array_equal(masks.dense_mask(BlockSparse(4, -(-n // 4), 5), n, n), causal)
  np.testing.assert_array_equal(masks.dense_mask(BlockSparse(4, 1, 1), n, n), causal)


def test_union_over_heads_is_causal_when_heads_cover_strides():
  p = BlockSparse(block=2, local_blocks=1, stride=4, step=1, num_q_heads=4, num_kv_heads=4)
  m = masks.dense_mask(p, 40, 40, 4)
  np.testing.assert_array_equal(m.any(0), masks.dense_mask(Dense(True), 40, 40)[0])
  # ... while each head alone is sparse.
  assert (m.sum(axis=(1, 2)) < masks.dense_mask(Dense(True), 40, 40).sum()).all()


def test_absolute_stride_is_evictable():
  """A key invisible to query t stays invisible to every later query (exact cache eviction)."""
  p = BS(offset=1)
  m = masks.dense_mask(p, 64, 64, 2)
  for h in range(2):
    for t in range(63):
      dropped = ~m[h, t, :t + 1]
      assert not (m[h, t + 1:, :t + 1] & dropped).any(), (h, t)


def test_block_sparse_validation_message():
  with pytest.raises(ValueError, match="num_dense_heads must be >= 0"):
    BlockSparse(num_dense_heads=-1)
  with pytest.raises(ValueError, match="sink >= 0"):
    SinkWindow(-1, 4)
