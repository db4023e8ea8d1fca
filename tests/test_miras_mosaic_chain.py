"""The Mosaic GPU latency probes of the Miras keys' recurrence (benchmarks/miras_mosaic_chain.py): each kernel
equals its jnp steps in Mosaic GPU interpret mode, and lowers for an (abstract) H100 from this CPU, so a device call
only has to time them."""
import functools

import jax
import pytest

from benchmarks import miras_mosaic_chain as chain

# the same bf16 roundings in a different float32 summation order (an operand, or a stacked bf16 start state, may
# round the other way: ~1e-3 measured); a wrong product, tile, transpose or sync is O(1)
TOLERANCE = {"forward": 1e-2, "backward": 1e-2}


@pytest.mark.parametrize("direction", sorted(chain.DIRECTIONS))
def test_the_probe_kernel_equals_its_reference_in_interpret_mode(direction):
  kernel, reference, make_inputs = chain.DIRECTIONS[direction]
  xs = make_inputs(heads=2, chunks=4)
  err = chain.max_relative_error(jax.jit(functools.partial(kernel, interpret=True))(*xs), jax.jit(reference)(*xs))
  print(f"mosaic {direction} probe (interpret) vs reference: max rel error {err:.1e}")
  assert err < TOLERANCE[direction]


@pytest.mark.parametrize("direction", sorted(chain.DIRECTIONS))
def test_the_probe_kernel_lowers_for_an_h100(direction):
  assert chain.lower_for_h100(direction, heads=2, chunks=4) > 0


def test_the_probe_rejects_a_chunk_count_its_copies_cannot_take():
  with pytest.raises(ValueError, match="multiple of 4"):
    chain.forward_kernel(*chain.forward_inputs(heads=1, chunks=3), interpret=True)
