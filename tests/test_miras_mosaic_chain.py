"""The Mosaic GPU latency probe of the Miras keys' recurrence (benchmarks/miras_mosaic_chain.py): its kernel equals
its jnp steps in Mosaic GPU interpret mode, and lowers for an (abstract) H100 from this CPU, so a device call only
has to time it."""
import functools

import jax
import pytest

from benchmarks import miras_mosaic_chain as chain


def test_the_probe_kernel_equals_its_reference_in_interpret_mode():
  xs = chain.inputs(heads=2, chunks=4)
  got = jax.jit(functools.partial(chain.chain, interpret=True))(*xs)
  err = chain.max_relative_error(got, jax.jit(chain.reference)(*xs))
  print(f"mosaic chain probe (interpret) vs reference: max rel error {err:.1e}")
  assert err < 1e-4  # the same bf16 roundings; a wrong product or tile is O(1)


def test_the_probe_kernel_lowers_for_an_h100():
  assert chain.lower_for_h100(heads=2, chunks=4) > 0


def test_the_probe_rejects_a_chunk_count_its_copies_cannot_take():
  with pytest.raises(ValueError, match="multiple of 4"):
    chain.chain(*chain.inputs(heads=1, chunks=3), interpret=True)
