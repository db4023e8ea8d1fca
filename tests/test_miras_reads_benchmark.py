"""The reads' benchmark (benchmarks/miras_reads.py): its launch settings parse or fail with a clear message, and on
its own inputs the kernels it times (interpret mode) equal the XLA reads it compares them with, values and every
gradient, so a device call only has to time them."""
import functools

import jax
import pytest

from benchmarks import miras_keys, miras_reads
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import pallas_reads


def test_the_tilings_parse_and_bad_ones_are_refused():
  fast, wide = miras_reads.parse_tilings("4/8/1/64,8/8/2/32")
  assert (fast.num_warps, fast.backward_warps, fast.num_stages, fast.hidden_tile) == (4, 8, 1, 64)
  assert (wide.num_warps, wide.backward_warps, wide.num_stages, wide.hidden_tile) == (8, 8, 2, 32)
  with pytest.raises(ValueError, match="fwd_warps/bwd_warps/stages/tile"):
    miras_reads.parse_tilings("4/8/64")
  with pytest.raises(ValueError, match="num_stages must be positive"):
    miras_reads.parse_tilings("4/8/0/64")


def test_the_layer_shape_parses_and_bad_ones_are_refused():
  assert miras_keys.parse_layer_shape("8x4096") == (8, 4096)
  for bad, message in (("8x", "a shape is BxT"), ("8x100", "multiple of the chunk"), ("0x128", "B positive")):
    with pytest.raises(ValueError, match=message):
      miras_keys.parse_layer_shape(bad)


def test_the_timed_kernels_equal_the_xla_reads_on_the_benchmarks_inputs():
  inputs = miras_reads.read_inputs(1, 128, heads=2)
  tiling = pallas_reads.ReadTiling(interpret=True, num_stages=2)
  outputs = []
  for reads in (functools.partial(miras_reads._xla_reads, miras_keys.MONETA),
                functools.partial(pallas_reads.ChunkReads(tiling), miras_keys.MONETA)):
    forward, both = miras_reads._runs(miras_keys.MONETA, reads, inputs, 64)
    outputs.append(jax.tree.leaves((forward(), both())))
  err = max(max_relative_error(g, w) for g, w in zip(*outputs, strict=True))
  print(f"reads benchmark: kernels (interpret) vs XLA, u, the loss and 11 gradients, bf16 matmuls: max rel error "
        f"{err:.1e}")
  assert err < 1e-2 and len(outputs[0]) == 13
