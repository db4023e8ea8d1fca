"""The private-JAX gate: cuDNN attention with an external logsumexp only on JAX versions it was GPU-tested on."""

from __future__ import annotations

import jax
import pytest

from layers.kernels import jax_compat


@pytest.fixture(autouse=True)
def _fresh_gate():
  jax_compat.cudnn_attention_problem.cache_clear()
  yield
  jax_compat.cudnn_attention_problem.cache_clear()


def test_untested_jax_is_refused_with_one_warning(monkeypatch, caplog):
  monkeypatch.setattr(jax_compat, "CUDNN_BACKWARD_SIGNATURES", {"0.0.1": ()})
  with caplog.at_level("WARNING", logger="memlab"):
    problem = jax_compat.cudnn_attention_problem()
    assert jax_compat.cudnn_attention_problem() == problem  # cached: checked and logged once per process
  assert f"JAX {jax.__version__} is not a version its GPU parity test passed on (0.0.1)" in problem
  assert len([r for r in caplog.records if "Pallas kernel runs instead" in r.message]) == 1
  with pytest.raises(RuntimeError, match="unavailable"):
    jax_compat.cudnn_window_forward(None, None, None, window=4, scale=1.0)


def test_a_changed_private_signature_is_refused_not_bound(monkeypatch):
  monkeypatch.setattr(jax_compat, "CUDNN_BACKWARD_SIGNATURES",
                      {jax.__version__: ("query", "value", "key", *jax_compat._PARAMS)})  # operands reordered
  problem = jax_compat.cudnn_attention_problem()
  assert problem is not None and "not the recorded" in problem


def test_recorded_versions_have_the_recorded_operand_order():
  for version, signature in jax_compat.CUDNN_BACKWARD_SIGNATURES.items():
    assert signature[:len(jax_compat._OPERANDS)] == jax_compat._OPERANDS, version


def test_triton_modules_hands_out_the_miras_kernels_ir():
  """The developer tool's private hook (benchmarks/triton_compile.py): lowering one fwd+bwd of the Miras Pallas
  kernels for an abstract H100 yields the forward and the backward kernel's Triton IR, and the hook is undone."""
  from benchmarks.triton_compile import triton_ir
  from jax._src.pallas.triton import pallas_call_registration as registration
  from layers.kernels.miras.pallas_triton import Tuning
  from research.models.registry import MIXERS

  lower = registration.lowering.lower_jaxpr_to_triton_module
  spec = MIXERS.config_class("moneta")(gates="head", chunk_size=16).memory_spec()
  modules = triton_ir(spec, "head", 16, 16, Tuning(), "bfloat16")
  assert [m.split("{")[0].strip() for m in modules.values()] == ["module @_fwd_kernel", "module @_bwd_kernel"]
  assert all("tt.dot" in m and "gpu.barrier" in m for m in modules.values())
  assert registration.lowering.lower_jaxpr_to_triton_module is lower


def test_triton_modules_name_the_tiled_kernels():
  """``triton_ir`` with a ``pallas_tiles.Tiling`` hands out every kernel of the tiled path's fwd+bwd by its name
  (what ``benchmarks/triton_compile.py --impl pallas_tiles --kernels`` selects)."""
  from benchmarks.triton_compile import triton_ir
  from layers.kernels.miras.pallas_tiles import Tiling
  from research.models.registry import MIXERS

  spec = MIXERS.config_class("moneta")(gates="head", chunk_size=16).memory_spec()
  modules = triton_ir(spec, "head", 16, 16, Tiling(hidden_tile=32), "bfloat16")
  assert set(modules) == {"_hidden_sum_kernel", "_errors_kernel", "_close_kernel", "_read_kernel", "_read_grad_kernel",
                          "_queries_grad_kernel", "_errors_cotangent_kernel", "_errors_pullback_kernel",
                          "_state_cotangent_kernel"}
  assert all(ir.startswith(f"module @{name}") for name, ir in modules.items())
