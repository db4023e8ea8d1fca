"""Test session setup: the CPU backend with 8 fake devices, configured before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same small programs; share the executables across tests and xdist workers.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "memlab-tests-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Bit-exact comparisons (resume, parity) are easier to reason about without XLA's CPU fast-math shortcuts.
jax.config.update("jax_default_matmul_precision", "highest")
