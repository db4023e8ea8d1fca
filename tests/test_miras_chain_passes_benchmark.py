"""The chain passes' benchmark (benchmarks/miras_chain_passes.py): on its own inputs (one batch row, two chunks) the
kernels it times (interpret mode) equal the XLA passes it compares them with, and the least bytes it counts are
the bytes of what each pass reads and writes, so a device call only has to time them."""
import jax
import jax.numpy as jnp

from benchmarks import miras_chain_passes, miras_keys
from benchmarks.miras_mosaic_chain import max_relative_error


def test_the_timed_kernels_equal_the_xla_passes_on_the_benchmarks_inputs():
  residuals, inputs, outputs = miras_chain_passes.layer_arguments(1, 128)
  assert inputs.rows.n.dtype == jnp.bfloat16 and residuals[1][0].dtype == jnp.bfloat16
  runs = miras_chain_passes.passes(miras_keys.MONETA, residuals, inputs, outputs, [4], interpret=True)
  assert list(runs) == ["chunk terms: xla", "chunk terms: pallas, 4 warps", "chain outputs: xla",
                        "chain outputs: pallas, 4 warps"]
  errs = {}
  for stage in ("chunk terms", "chain outputs"):
    (xla, moved), (kernel, moved_too) = runs[f"{stage}: xla"], runs[f"{stage}: pallas, 4 warps"]
    errs[stage] = max(max_relative_error(g, w) for g, w in zip(jax.tree.leaves(kernel()), jax.tree.leaves(xla()),
                                                                strict=True))
    assert moved == moved_too > miras_chain_passes.nbytes(residuals[4])  # at least u (or g_e1) read once
  print("chain passes' benchmark: kernels (interpret) vs XLA, max rel error",
        ", ".join(f"{name} {err:.1e}" for name, err in errs.items()))
  assert max(errs.values()) < 1e-2  # the chunk terms' [c, d] arrays in bf16 against XLA's float32
