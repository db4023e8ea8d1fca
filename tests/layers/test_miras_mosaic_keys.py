"""The Mosaic GPU keys' forward of the Miras MLP memories (layers/kernels/miras/mosaic_keys.py): equal to
``pallas_tiles``' Triton keys' forward in interpret mode on the CPU, free of races between its warpgroups there,
equal through the whole memory and its backward, lowered for an (abstract) H100, and refusing what it does not
cover. On the GPU the kernel is checked through the API by
``test_miras.py::test_pallas_kernels_on_gpu_match_the_flat_path``."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.miras_keys_forward import keys_inputs, max_relative_errors
from benchmarks.triton_compile import lowered_for_h100
from layers.kernels.miras import mosaic_keys, pallas_tiles
from layers.kernels.miras.chunked import with_matmul
from layers.miras import bias as biases
from layers.miras.memory import MLPMemory
from layers.miras.retention import Decay, LqNorm
from layers.miras.spec import Gates, MemorySpec

MONETA = with_matmul(MemorySpec(MLPMemory(), biases.Lp(3.0), LqNorm(4.0)), "bfloat16")
_keys_inputs = functools.partial(keys_inputs, 2, 2)  # two chunks of two heads at c = d = 64, E = 256


@pytest.fixture(scope="module")
def both_forwards():
  """Both keys' forwards of Moneta (bf16 matmuls) on the same inputs, in interpret mode."""
  args = _keys_inputs()
  mosaic = jax.jit(functools.partial(mosaic_keys.keys_forward, MONETA, interpret=True))(*args)
  triton = jax.jit(functools.partial(pallas_tiles._triton_keys_forward, MONETA,
                                     pallas_tiles.Tiling(interpret=True)))(*args)
  return mosaic, triton


def test_the_mosaic_keys_forward_equals_the_triton_one(both_forwards):
  """Every output (the stacked start states, the end state, e2, h, e1, u, the scales and their summed terms) of
  two chunks of two heads. The same bf16 operands in another float32 summation order (the scale terms row by row,
  u in one accumulator): 1.3e-3 at most measured, as Moneta's normalised memory moves a bf16 rounding here and
  there; a wrong product, tile, sync or scale is O(1)."""
  mosaic, triton = both_forwards
  errors = max_relative_errors(mosaic, triton)
  print("mosaic keys' forward (interpret) vs Triton's, max rel error:",
        ", ".join(f"{name} {err:.1e}" for name, err in errors.items()))
  assert max(errors.values()) < 1e-2
  assert not any(bool(jnp.isnan(x).any()) for x in jax.tree.leaves(mosaic))


def test_the_warpgroups_share_memory_without_races():
  """Interpret mode's race detector over a chunk's three syncs, the TMA prefetch of the next chunk and the tiles'
  shared operands (one head, two chunks): it raises on a read and a write of shared memory with no sync between."""
  params = plgpu.InterpretGPUParams(detect_races=True)
  outputs = jax.jit(functools.partial(mosaic_keys.keys_forward, MONETA, interpret=params))(*keys_inputs(2, 1))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outputs))


def test_the_memory_and_its_gradients_equal_the_triton_keys_forwards():
  """``pallas_tiles.miras_tiles`` (bf16 matmuls, interpret mode) with either keys' forward: the reads and the
  gradients of q, k, v (``pallas_tiles``' backward from the Mosaic kernel's residuals), one head of two chunks."""
  ks = jax.random.split(jax.random.key(1), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (unit(jax.random.normal(key, (1, 128, 1, 64))) for key in ks[:2])
  v, weights = jax.random.normal(ks[2], q.shape), jax.random.normal(ks[3], q.shape)
  gates = Gates(eta=0.1 * jax.nn.sigmoid(jax.random.normal(ks[4], (1, 128, 1, 1))),
                log_alpha=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[5], (1, 128, 1, 1))), delta=None)
  state = {"w2": jax.random.normal(ks[6], (1, 1, 256, 64)) / 8, "w1": jax.random.normal(ks[7], (1, 1, 64, 256)) / 16}
  results = []
  for keys_forward in pallas_tiles.KEYS_FORWARDS:
    run = functools.partial(pallas_tiles.miras_tiles, spec=MONETA, initial_state=state, matmul="bfloat16",
                            tiling=pallas_tiles.Tiling(interpret=True, keys_forward=keys_forward))
    loss = lambda q, k, v, run=run: jnp.sum(run(q, k, v, gates)[0] * weights)
    results.append((run(q, k, v, gates)[0], jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
  (o_triton, g_triton), (o_mosaic, g_mosaic) = results
  err = max(_max_rel(o_mosaic, o_triton), _max_rel(g_mosaic, g_triton))
  print(f"pallas_tiles_bf16 with the Mosaic keys' forward vs the Triton one: max rel error {err:.1e}")
  assert err < 1e-3  # 4e-7 measured: one head, two chunks leave Moneta's normalisation little to amplify


def _max_rel(got, want) -> float:
  pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  return max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in pairs)


def test_the_first_start_state_is_the_initial_state(both_forwards):
  state = _keys_inputs()[0]
  starts2, starts1 = both_forwards[0][:2]
  assert bool(jnp.all(starts2[0] == state["w2"])) and bool(jnp.all(starts1[0] == state["w1"]))


def test_the_mosaic_keys_forward_lowers_for_an_h100():
  """Layouts, wgmma shapes and the shared-memory budget (checked at lowering) from this CPU."""
  forward = functools.partial(mosaic_keys.keys_forward, MONETA)
  text = lowered_for_h100(forward, *jax.eval_shape(_keys_inputs)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize(("spec", "chunk", "per_head", "reason"), [
    (MONETA, 64, False, "per-head gates"),
    (MONETA, 32, True, "c = d = 64"),
    (with_matmul(MemorySpec(MLPMemory(expansion=8), biases.Lp(3.0), LqNorm(4.0)), "bfloat16"), 64, True,
     "hidden width"),
    (with_matmul(MemorySpec(MLPMemory(), biases.YaadHuber(1e-3), Decay()), "bfloat16"), 64, True, "no δ"),
])
def test_what_the_mosaic_keys_forward_does_not_cover_is_refused(spec, chunk, per_head, reason):
  assert reason in mosaic_keys.unsupported(spec, chunk, 64, per_head)


def test_the_mosaic_keys_forward_refuses_float32_matmuls():
  q = k = v = jnp.zeros((1, 64, 1, 64))
  gates = Gates(eta=jnp.zeros((1, 64, 1, 1)), log_alpha=jnp.zeros((1, 64, 1, 1)), delta=None)
  state = {"w2": jnp.zeros((1, 1, 256, 64)), "w1": jnp.zeros((1, 1, 64, 256))}
  with pytest.raises(ValueError, match="bfloat16 matmuls only"):
    pallas_tiles.miras_tiles(q, k, v, gates, spec=MONETA, initial_state=state, matmul="float32",
                             tiling=pallas_tiles.Tiling(interpret=True, keys_forward="mosaic"))


def test_tiling_rejects_an_unknown_keys_forward():
  with pytest.raises(ValueError, match="keys_forward"):
    pallas_tiles.Tiling(keys_forward="cuda")
