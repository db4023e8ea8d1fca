"""The chain outputs' kernel (layers/kernels/miras/pallas_chain_outputs.py, Pallas interpret mode) against
:func:`keys_chain.chain_outputs`: every output of three chunks of two heads (c = d = 64, E = 256) on random inputs,
in float32 matmuls and in bfloat16 matmuls with the operands' dtypes of the real run, and what it does not cover
refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.miras_keys import keys_inputs
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import keys_chain, pallas_chain_outputs, pallas_tiles
from layers.kernels.miras.chunked import with_matmul
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import LqNorm
from layers.miras.spec import MemorySpec

MONETA = MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0))
BF16 = jnp.bfloat16


def chain_arguments(spec, bf16: bool, n: int = 3, heads: int = 2, seed: int = 0):
  """(residuals, :class:`keys_chain.ChainInputs`, :class:`keys_chain.ChainOutputs`): :func:`keys_inputs`' LayerNorm
  and chunk inputs, random activations and cotangents in the shapes and dtypes of ``pallas_tiles``' keys'
  recurrence (NumPy's generator: no compiles; positive read scales and summed terms), the chain's inputs and the
  XLA chain's outputs. ``bf16``: K, V and the start states in bfloat16, and G2 and g_z rounded to it (as the Mosaic
  GPU kernels leave them)."""
  state, ln, xs = jax.jit(functools.partial(keys_inputs, n, heads, seed=seed))()
  ends, shapes = jax.eval_shape(functools.partial(pallas_tiles._recurrence_fwd, spec, pallas_tiles.Tiling()),
                                state, ln, xs)
  if bf16:
    xs = (xs[0].astype(BF16), xs[1].astype(BF16), *xs[2:])
  rng = np.random.default_rng(seed)
  normal = lambda a, scale=1.0: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype)
  positive = lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
  _, _, starts, activations, u, scales, totals, z = shapes
  starts = jax.tree.map(lambda a: normal(a, a.shape[-1] ** -0.5).astype(BF16 if bf16 else a.dtype), starts)
  residuals = (ln, xs, starts, jax.tree.map(normal, activations), normal(u), positive(scales), positive(totals),
               normal(z))
  cotangents = jax.tree.map(lambda a: normal(a, 0.1), ends)
  inputs = jax.jit(functools.partial(keys_chain.chain_inputs, spec))(residuals, cotangents)
  outputs = jax.jit(functools.partial(keys_chain.chain_scan, spec))(inputs, cotangents[0])[1]
  if bf16:
    outputs = outputs._replace(g2_end=outputs.g2_end.astype(BF16), g_z=outputs.g_z.astype(BF16))
  return residuals, inputs, outputs


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
