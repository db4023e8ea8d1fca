"""The chain outputs' kernel (layers/kernels/miras/pallas_chain_outputs.py, Pallas interpret mode) against
:func:`keys_chain.chain_outputs`: every output of three chunks of two heads (c = d = 64, E = 256) on random inputs,
in float32 matmuls and in bfloat16 matmuls with the operands' dtypes of the real run, and what it does not cover
refused."""

import functools

import jax
import jax.numpy as jnp
import pytest

from benchmarks.miras_keys import MONETA, chain_arguments
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import keys_chain, pallas_chain_outputs
from layers.kernels.miras.chunked import with_matmul
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import LqNorm
from layers.miras.spec import MemorySpec


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request):
  """(mode, the reference's outputs, the kernel's) on one set of :func:`chain_arguments`."""
  spec = with_matmul(MONETA, request.param)
  args = chain_arguments(spec, request.param == "bfloat16")
  want = jax.jit(functools.partial(keys_chain.chain_outputs, spec))(*args)
  got = jax.jit(functools.partial(pallas_chain_outputs.chain_outputs, spec, interpret=True))(*args)
  return request.param, want, got


def test_the_kernel_equals_the_xla_chain_outputs(case):
  """Every output in the reference's shape and dtype, none NaN, within 1e-5 of it (relative to its largest
  magnitude) in float32 matmuls and 1e-2 in bfloat16 ones (bf16 operands of the same products summed by tiles)."""
  mode, want, got = case
  assert jax.tree.structure(got) == jax.tree.structure(want)
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  errs = {}
  for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True):
    assert (g.shape, g.dtype) == (w.shape, w.dtype), jax.tree_util.keystr(path)
    assert not bool(jnp.any(jnp.isnan(g))), jax.tree_util.keystr(path)
    errs[jax.tree_util.keystr(path)] = max_relative_error(g, w)
  print(f"chain outputs' kernel (interpret) vs XLA, {mode} matmuls: max rel error "
        + ", ".join(f"{name} {e:.1e}" for name, e in errs.items()))
  assert max(errs.values()) < (1e-5 if mode == "float32" else 1e-2), errs


def test_the_kernel_refuses_a_bias_with_delta():
  spec = MemorySpec(MLPMemory(), biases.YaadHuber(1e-3), LqNorm(4.0))
  with pytest.raises(ValueError, match="biases without δ"):
    pallas_chain_outputs.chain_outputs(spec, None, None, None)
