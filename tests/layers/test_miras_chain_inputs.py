"""The chain inputs' kernel (layers/kernels/miras/pallas_chain_inputs.py, Pallas interpret mode) against
:func:`keys_chain.chain_inputs`: every field of three chunks of two heads (c = d = 64, E = 256) on random inputs, in
float32 matmuls with float32 K and V and in bfloat16 matmuls with the operands' dtypes of the real run, and what it
does not cover refused."""

import functools

import jax
import jax.numpy as jnp
import pytest

from benchmarks.miras_keys import MONETA, chain_arguments
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import pallas_chain_inputs
from layers.kernels.miras.chunked import with_matmul
from layers.kernels.miras.flat import KeyPass
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import LqNorm
from layers.miras.spec import MemorySpec

FORMED = {"nkc", "ne1c", "rows.n", "rows.a", "rows.ehat", "rows.curve"}  # the kernel's, bfloat16 [c, d]
FORMED_F32 = {"rows.rstd", "rows.na"}  # the kernel's, float32 [c]; every other field passed on


def cotangents_of(inputs):
  """The recurrence's cotangents that :func:`keys_chain.chain_inputs` read into ``inputs`` (of the start states and
  of the keys' pass; the end state's, which it does not read, None)."""
  scale = {"w2": inputs.g_scales[..., 0, None, None], "w1": inputs.g_scales[..., 1, None, None]}
  return None, ({"w2": inputs.g_w2, "w1": inputs.g_w1}, KeyPass(scale, inputs.g_e1, inputs.g_e2, inputs.g_h))


def fields(inputs) -> dict:
  """A :class:`keys_chain.ChainInputs`' arrays by name, the row terms' as ``rows.<name>``."""
  rows = {f"rows.{name}": x for name, x in inputs.rows._asdict().items()}
  return {name: x for name, x in inputs._asdict().items() if name != "rows"} | rows


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def case(request):
  """(mode, the reference's fields, the kernel's) on one set of :func:`chain_arguments` (its ChainInputs the
  reference's)."""
  spec = with_matmul(MONETA, request.param)
  residuals, want, _ = chain_arguments(spec, request.param == "bfloat16", seed=1)
  got = jax.jit(functools.partial(pallas_chain_inputs.chain_inputs, spec, interpret=True))(residuals,
                                                                                            cotangents_of(want))
  return request.param, fields(want), fields(got)


def test_the_kernel_equals_the_xla_chain_inputs(case):
  """Every field in the reference's shape, none NaN; those passed on equal, rstd and mean(n ⊙ a) within 1e-5 of
  the reference (relative to its largest magnitude), the bfloat16 ones its values rounded to bfloat16 but for a
  rounding the other float32 summation order moves (one bfloat16 ulp, 2⁻⁷ |x| at most)."""
  mode, want, got = case
  assert got.keys() == want.keys()
  errs, ulps = {}, {}
  for name, w in want.items():
    g = got[name]
    assert (g.shape, g.dtype) == (w.shape, jnp.bfloat16 if name in FORMED else w.dtype), name
    assert not bool(jnp.any(jnp.isnan(g))), name
    if name not in FORMED | FORMED_F32:
      assert bool(jnp.array_equal(g, w)), name
      continue
    errs[name] = max_relative_error(g, w)
    if name in FORMED:  # the distance from w's rounding in units of 2⁻⁷ |w| (+ 1e-5 of its largest magnitude)
      off = jnp.abs(g.astype(jnp.float32) - w.astype(jnp.bfloat16).astype(jnp.float32))
      ulps[name] = float(jnp.max(off / (2.0 ** -7 * jnp.abs(w) + 1e-5 * jnp.max(jnp.abs(w)))))
  print(f"chain inputs' kernel (interpret) vs XLA, {mode} matmuls: max rel error "
        + ", ".join(f"{name} {e:.1e}" for name, e in errs.items()) + "; off bf16(reference) by at most "
        + ", ".join(f"{name} {u:.2f}" for name, u in ulps.items()) + " of 2⁻⁷ |x|")
  assert max(errs[name] for name in FORMED_F32) < 1e-5, errs
  assert max(errs[name] for name in FORMED) < 1e-2, errs
  assert max(ulps.values()) <= 1.0, ulps


def test_the_kernel_refuses_a_bias_with_delta():
  spec = MemorySpec(MLPMemory(), biases.YaadHuber(1e-3), LqNorm(4.0))
  with pytest.raises(ValueError, match="biases without δ"):
    pallas_chain_inputs.chain_inputs(spec, None, None)
