"""The Mosaic GPU kernels of the Miras MLP memories' keys' recurrence (layers/kernels/miras/mosaic_keys.py), forward
and backward: each equal to ``pallas_tiles``' Triton kernels in interpret mode on the CPU and free of races between
its warpgroups there, the whole memory and its gradients equal with both, each lowered for an (abstract) H100, and
what they do not cover refused; the row step's evaluation on blocks of columns equal to the whole rows'. On the GPU
the forward is checked through the API by ``test_miras.py::test_pallas_kernels_on_gpu_match_the_flat_path`` (the
backward's first form there too), the backward against the Triton one by ``benchmarks/miras_keys.py --direction
backward`` (docs/benchmarks.md)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.miras_keys import backward_inputs, keys_inputs, max_relative_errors
from benchmarks.miras_mosaic_chain import max_relative_error
from benchmarks.triton_compile import lowered_for_h100
from layers.kernels.miras import flat, mosaic_chain, mosaic_keys, pallas_tiles
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


_pullback_inputs_of_two = functools.partial(backward_inputs, MONETA, 2, 2, interpret=True)


@pytest.mark.parametrize("kernel", [k for k in pallas_tiles.KEYS_BACKWARDS if k != "triton"])
def test_the_other_keys_backwards_equal_the_triton_one(kernel):
  """Every cotangent ``pallas_tiles``' recurrence returns (the initial state's, the LayerNorm's, the chunk inputs'
  K, V, δ, the chunk-end decay and coefficients), two chunks of two heads, from the same residuals, with the Mosaic
  kernel (7.4e-4 at most measured) or ``keys_chain``'s passes with their chain as an XLA scan or the Mosaic kernel
  (5.2e-3: bf16 operands and row terms, summed and rounded in another order); a wrong product, tile, sync or scale
  share is O(1)."""
  args = _pullback_inputs_of_two()
  triton, other = (jax.jit(functools.partial(pallas_tiles._recurrence_bwd, MONETA,
                                             pallas_tiles.Tiling(interpret=True, keys_backward=name)))(*args)
                   for name in ("triton", kernel))
  pairs = [(m, t) for m, t in zip(jax.tree.leaves(other), jax.tree.leaves(triton), strict=True)
           if t.dtype != jax.dtypes.float0 and bool(jnp.any(t != 0))]
  err = max(max_relative_error(m, t) for m, t in pairs)
  print(f"{kernel} keys' backward (interpret) vs Triton's: max rel error {err:.1e} over {len(pairs)} cotangents")
  assert err < 1e-2 and len(pairs) == 8  # all but δ's (no δ in Moneta: zero in both) and the completeness flags'


@pytest.mark.parametrize("kernel", ["forward", "backward", "chain"])
def test_the_warpgroups_share_memory_without_races(kernel):
  """Interpret mode's race detector over a chunk's syncs, the TMA prefetches and the tiles' shared operands (one
  head, two chunks), for both keys' kernels and the chain's: it raises on a read and a write of shared memory with
  no sync between."""
  params = plgpu.InterpretGPUParams(detect_races=True)
  if kernel == "forward":
    outputs = jax.jit(functools.partial(mosaic_keys.keys_forward, MONETA, interpret=params))(*keys_inputs(2, 1))
  else:
    backward = mosaic_keys.keys_backward if kernel == "backward" else mosaic_chain.keys_backward
    outputs = jax.jit(functools.partial(backward, MONETA, interpret=params))(
        *backward_inputs(MONETA, 2, 1, interpret=True))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outputs))


def test_the_memory_and_its_gradients_equal_with_either_kernels():
  """``pallas_tiles.miras_tiles`` (bf16 matmuls, interpret mode) with the keys' recurrence as the Triton kernels
  in both directions, as the Mosaic forward with the Triton backward (``pallas_mosaic_bf16``: the Triton backward
  takes the bf16 stacked start states), as the Mosaic ones in both directions and as the Mosaic forward with
  ``keys_chain``'s backward and its chain kernel (``pallas_mosaic_chain_bf16``): the reads and the gradients of q,
  k, v, one head of two chunks."""
  ks = jax.random.split(jax.random.key(1), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (unit(jax.random.normal(key, (1, 128, 1, 64))) for key in ks[:2])
  v, weights = jax.random.normal(ks[2], q.shape), jax.random.normal(ks[3], q.shape)
  gates = Gates(eta=0.1 * jax.nn.sigmoid(jax.random.normal(ks[4], (1, 128, 1, 1))),
                log_alpha=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[5], (1, 128, 1, 1))), delta=None)
  state = {"w2": jax.random.normal(ks[6], (1, 1, 256, 64)) / 8, "w1": jax.random.normal(ks[7], (1, 1, 64, 256)) / 16}
  results = {}
  for forward, backward in (("triton", "triton"), ("mosaic", "triton"), ("mosaic", "mosaic"),
                            ("mosaic", "chain_mosaic")):
    run = functools.partial(pallas_tiles.miras_tiles, spec=MONETA, initial_state=state, matmul="bfloat16",
                            tiling=pallas_tiles.Tiling(interpret=True, keys_forward=forward, keys_backward=backward))
    loss = lambda q, k, v, run=run: jnp.sum(run(q, k, v, gates)[0] * weights)
    results[forward, backward] = run(q, k, v, gates)[0], jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  o_triton, g_triton = results.pop(("triton", "triton"))
  for (forward, backward), (o, g) in results.items():
    errs = max_relative_error(o, o_triton), max_relative_error(g, g_triton)
    print(f"pallas_tiles_bf16 with the {forward} forward and the {backward} backward vs the Triton ones: max rel "
          f"error reads {errs[0]:.1e}, gradients {errs[1]:.1e}")
    # the reads take the same bf16 operands (4e-7 measured); the gradients differ by the Mosaic forward's bf16
    # start states (the reads' cotangents of them come back in bf16 too): 1.0e-3 measured; a wrong product is O(1)
    assert errs[0] < 1e-5 and errs[1] < 1e-2


def test_bf16_inputs_stay_bf16_through_the_chunks():
  """``pallas_mosaic_chain_bf16`` with bf16 q, k, v chunks them in bf16 (``miras_flat``'s keep_dtype: the kernels
  take them in float32 where they compute) and returns their cotangents in bf16: against the same inputs in
  float32 (chunked in float32), the reads equal to rounding and the gradients within bf16's rounding of the
  cotangents (4.0e-3 measured; a wrong cast or a lost share is O(1))."""
  ks = jax.random.split(jax.random.key(2), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (unit(jax.random.normal(key, (1, 128, 1, 64))).astype(jnp.bfloat16) for key in ks[:2])
  v = jax.random.normal(ks[2], q.shape).astype(jnp.bfloat16)
  weights = jax.random.normal(ks[3], q.shape)
  gates = Gates(eta=0.1 * jax.nn.sigmoid(jax.random.normal(ks[4], (1, 128, 1, 1))),
                log_alpha=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[5], (1, 128, 1, 1))), delta=None)
  state = {"w2": jax.random.normal(ks[6], (1, 1, 256, 64)) / 8, "w1": jax.random.normal(ks[7], (1, 1, 64, 256)) / 16}
  run = functools.partial(pallas_tiles.miras_tiles, spec=MONETA, initial_state=state, matmul="bfloat16",
                          tiling=pallas_tiles.Tiling(interpret=True, keys_forward="mosaic",
                                                     keys_backward="chain_mosaic"))
  loss = lambda q, k, v: jnp.sum(run(q, k, v, gates)[0] * weights)
  upcast = lambda xs: [x.astype(jnp.float32) for x in xs]
  (o16, g16), (o32, g32) = ((run(*xs, gates)[0], jax.grad(loss, argnums=(0, 1, 2))(*xs))
                            for xs in ((q, k, v), upcast((q, k, v))))
  chunks = flat.chunk_inputs(MONETA, q, k, v, gates, 64, None, keep_dtype=True)
  assert chunks.q.dtype == chunks.k.dtype == chunks.v.dtype == jnp.bfloat16 and chunks.decay.dtype == jnp.float32
  errs = max_relative_error(o16, o32), max(max_relative_error(a, b) for a, b in zip(upcast(g16), g32, strict=True))
  print(f"pallas_mosaic_chain_bf16, bf16 inputs vs the same in float32: max rel error reads {errs[0]:.1e}, "
        f"gradients {errs[1]:.1e}")
  assert errs[0] < 1e-5 and errs[1] < 1e-2


def test_the_first_start_state_is_the_initial_state(both_forwards):
  """Slot 0 of the stacked start states is the initial state (as bf16 from the Mosaic forward)."""
  state = _keys_inputs()[0]
  for starts2, starts1 in (outputs[:2] for outputs in both_forwards):
    assert bool(jnp.all(starts2[0] == state["w2"].astype(starts2.dtype)))
    assert bool(jnp.all(starts1[0] == state["w1"].astype(starts1.dtype)))


@pytest.mark.parametrize("direction", ["forward", "backward", "chain"])
def test_the_mosaic_keys_kernels_lower_for_an_h100(direction):
  """Layouts, wgmma shapes, the shared-memory budget (checked at lowering) and the primitives (the backward's row
  step pull-back sums cotangents with plain adds) from this CPU, for both keys' kernels and the chain's."""
  if direction == "forward":
    kernel, args = functools.partial(mosaic_keys.keys_forward, MONETA), jax.eval_shape(_keys_inputs)
  else:
    backward = mosaic_keys.keys_backward if direction == "backward" else mosaic_chain.keys_backward
    kernel, args = functools.partial(backward, MONETA), jax.eval_shape(_pullback_inputs_of_two)
  assert "mosaic_gpu" in lowered_for_h100(kernel, *args).as_text()


@pytest.mark.parametrize(("spec", "chunk", "per_head", "reason"), [
    (MONETA, 64, False, "per-head gates"),
    (MONETA, 32, True, "c = d = 64"),
    (with_matmul(MemorySpec(MLPMemory(expansion=8), biases.Lp(3.0), LqNorm(4.0)), "bfloat16"), 64, True,
     "hidden width"),
    (with_matmul(MemorySpec(MLPMemory(), biases.YaadHuber(1e-3), Decay()), "bfloat16"), 64, True, "no δ"),
])
def test_what_the_mosaic_keys_forward_does_not_cover_is_refused(spec, chunk, per_head, reason):
  assert reason in mosaic_keys.unsupported(spec, chunk, 64, per_head)


def test_the_mosaic_keys_kernels_refuse_float32_matmuls():
  q = k = v = jnp.zeros((1, 64, 1, 64))
  gates = Gates(eta=jnp.zeros((1, 64, 1, 1)), log_alpha=jnp.zeros((1, 64, 1, 1)), delta=None)
  state = {"w2": jnp.zeros((1, 1, 256, 64)), "w1": jnp.zeros((1, 1, 64, 256))}
  with pytest.raises(ValueError, match="bfloat16 matmuls only"):
    pallas_tiles.miras_tiles(q, k, v, gates, spec=MONETA, initial_state=state, matmul="float32",
                             tiling=pallas_tiles.Tiling(interpret=True, keys_backward="mosaic"))


@pytest.mark.parametrize("direction", ["keys_forward", "keys_backward"])
def test_tiling_rejects_an_unknown_keys_kernel(direction):
  with pytest.raises(ValueError, match=direction):
    pallas_tiles.Tiling(**{direction: "cuda"})


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_the_row_step_on_blocks_of_columns_equals_it_on_whole_rows(blocks):
  """``_mosaic_lowerable(columns=w)`` evaluates the row step's vjp on [c, w] blocks, each row sum exchanged (here a psum
  over the blocks, as the kernel's warpgroups do through shared memory): the blocks put together equal it on
  whole rows (float32, random rows)."""
  c, d = 64, 64
  args = [jax.random.normal(key, (c, d)) for key in jax.random.split(jax.random.key(3), 6)]
  args[3] = 1.0 + 0.1 * args[3]  # γ near 1
  row_step_vjp = functools.partial(mosaic_keys.row_step_vjp, MONETA)
  want = row_step_vjp(*args)
  split = lambda x: jnp.stack(jnp.split(x, blocks, axis=1))  # [blocks, c, d / blocks]
  on_block = mosaic_keys._mosaic_lowerable(row_step_vjp, columns=d // blocks, width=d,
                                           row_sum=lambda partial: jax.lax.psum(partial, "block"))
  got = jax.vmap(on_block, axis_name="block")(*map(split, args))
  for g, w in zip(got, want):
    whole = jnp.concatenate(list(g), axis=1)
    assert float(jnp.max(jnp.abs(whole - w)) / jnp.max(jnp.abs(w))) < 1e-5


def test_a_step_that_mixes_columns_is_refused_on_blocks():
  """A function that is not row-wise (here a sum over the rows) cannot run on blocks of columns."""
  on_block = mosaic_keys._mosaic_lowerable(lambda x: jnp.sum(x, axis=0), columns=16, width=64, row_sum=lambda p: p)
  with pytest.raises(ValueError, match="not row-wise"):
    on_block(jnp.ones((64, 16)))
