"""The keys' backward cut into its chain (layers/kernels/miras/keys_chain.py): the row step's closed-form pull-back
equal to ``jax.vjp`` of the row step (float64, every bias without δ), the three passes equal to ``pallas_tiles``'
Triton backward in float32 matmuls (interpret mode; the bf16 comparison is in test_miras_mosaic_keys.py), the chain
kernel equal to the XLA chain without read scales, and what they do not cover refused."""

import functools

import jax
import jax.numpy as jnp
import pytest

from benchmarks.miras_keys import backward_inputs
from benchmarks.miras_mosaic_chain import max_relative_error
from layers.kernels.miras import keys_chain, mosaic_chain, pallas_tiles
from layers.kernels.miras.chunked import with_matmul
from layers.kernels.miras.pallas_triton import keys_errors
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import Decay, LqNorm
from layers.miras.spec import Gates, MemorySpec

MONETA = MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0))


@pytest.mark.parametrize("bias", [biases.Lp(3.0), biases.Lp(1.5), biases.L2(), biases.Dot()],
                         ids=["lp3", "lp1.5", "l2", "dot"])
def test_the_row_pullbacks_equal_the_row_steps_vjp(bias):
  """The row step's closed-form pull-backs at :func:`keys_chain.row_terms` (u's: :func:`keys_chain.row_pullback`;
  K's, V's, γ's and β's: :func:`keys_chain.row_inputs_pullback`) equal ``jax.vjp`` of ``keys_errors``, float64,
  random rows (γ away from 1)."""
  spec = MemorySpec(MLPMemory(), bias, LqNorm(4.0))
  with jax.enable_x64():
    keys = jax.random.split(jax.random.key(0), 6)
    u, k, v, w = (jax.random.normal(key, (16, 32), jnp.float64) for key in keys[:4])
    gamma = 1.0 + 0.5 * jax.random.normal(keys[4], (1, 32), jnp.float64)
    beta = 0.5 * jax.random.normal(keys[5], (1, 32), jnp.float64)
    delta = jnp.zeros((16, 1), jnp.float64)
    errors = lambda u, k, v, gamma, beta: keys_errors(spec, u, k, v, delta, (gamma, beta))[0]
    want = jax.vjp(errors, u, k, v, gamma, beta)[1](w)
    terms = keys_chain.row_terms(spec, u, k, v, delta, gamma, beta)
    got = (keys_chain.row_pullback(terms, w), *keys_chain.row_inputs_pullback(spec, terms, k, v, delta, gamma, beta, w))
    errs = {name: float(jnp.max(jnp.abs(g - x)) / jnp.maximum(jnp.max(jnp.abs(x)), 1.0))  # K's is 0 for Dot
            for name, g, x in zip(("u", "k", "v", "gamma", "beta"), got, want, strict=True)}
  print(f"row pull-backs vs jax.vjp ({type(bias).__name__}): max error / max(max |cotangent|, 1) "
        + ", ".join(f"{name} {e:.1e}" for name, e in errs.items()))
  assert all(e < 1e-12 for e in errs.values()), errs


@pytest.mark.parametrize("spec", [MONETA, MemorySpec(MLPMemory(), biases.L2(), Decay())], ids=["moneta", "l2_decay"])
def test_the_chain_passes_equal_the_triton_backward_in_float32(spec):
  """Every cotangent of three chunks of two heads (c = d = 64, E = 256), float32 matmuls, from the same residuals
  (the Triton forward's in interpret mode), with Moneta's read scales and without (ℓ2 bias, plain decay): 4e-7 and
  2.3e-6 at most measured; a wrong term of the chain is O(1)."""
  spec = with_matmul(spec, "float32")
  args = backward_inputs(spec, 3, 2, interpret=True)
  triton, chain = (jax.jit(functools.partial(pallas_tiles._recurrence_bwd, spec,
                                             pallas_tiles.Tiling(interpret=True, keys_backward=name)))(*args)
                   for name in ("triton", "chain"))
  pairs = [(m, t) for m, t in zip(jax.tree.leaves(chain), jax.tree.leaves(triton), strict=True)
           if t.dtype != jax.dtypes.float0 and bool(jnp.any(t != 0))]
  err = max(max_relative_error(m, t) for m, t in pairs)
  print(f"chain keys' backward vs Triton's, float32: max rel error {err:.1e} over {len(pairs)} cotangents")
  assert err < 1e-5 and len(pairs) == 8


def test_the_chain_kernel_equals_the_xla_chain_without_read_scales():
  """:mod:`mosaic_chain`'s kernel (interpret mode, bf16 operands) against :func:`keys_chain.chain_scan` for a memory
  without read scales (ℓ2 bias, plain decay; Moneta's are compared through ``pallas_tiles`` in
  test_miras_mosaic_keys.py): every output of two chunks of one head, bf16 roundings apart."""
  spec = with_matmul(MemorySpec(MLPMemory(), biases.L2(), Decay()), "bfloat16")
  residuals, cotangents = backward_inputs(spec, 2, 1, interpret=True)
  inputs = jax.jit(functools.partial(keys_chain.chain_inputs, spec))(residuals, cotangents)
  want = jax.jit(functools.partial(keys_chain.chain_scan, spec))(inputs, cotangents[0])
  got = jax.jit(functools.partial(mosaic_chain.chain, spec, interpret=True))(inputs, cotangents[0])
  err = max(max_relative_error(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
  print(f"chain kernel (interpret) vs XLA chain, ℓ2 and decay: max rel error {err:.1e}")
  assert err < 1e-2


@pytest.mark.parametrize(("bias", "channel"), [(biases.YaadHuber(1e-3), False), (biases.Lp(3.0), True)],
                         ids=["delta", "channel_gates"])
def test_the_chain_backward_refuses_what_it_does_not_cover(bias, channel):
  gates_width = 64 if channel else 1
  q = k = v = jnp.zeros((1, 64, 1, 64))
  gates = Gates(eta=jnp.zeros((1, 64, 1, gates_width)), log_alpha=jnp.zeros((1, 64, 1, gates_width)),
                delta=jnp.ones((1, 64, 1, 1)) if bias.needs_delta else None)
  state = {"w2": jnp.zeros((1, 1, 256, 64)), "w1": jnp.zeros((1, 1, 64, 256))}
  spec = MemorySpec(MLPMemory(), bias, LqNorm(4.0))
  with pytest.raises(ValueError, match="per-head gates and biases without δ"):
    pallas_tiles.miras_tiles(q, k, v, gates, spec=spec, initial_state=state,
                             tiling=pallas_tiles.Tiling(interpret=True, keys_backward="chain"))
