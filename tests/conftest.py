"""Test session setup: the CPU backend with 8 fake devices, configured before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same small programs; share the executables across tests and xdist workers.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "memlab-tests-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Bit-exact comparisons (resume, parity) are easier to reason about without XLA's CPU fast-math shortcuts.
jax.config.update("jax_default_matmul_precision", "highest")


def _count_lines(path: str) -> int:
  """Lines of a /proc file, or 0 where there is none (not Linux)."""
  try:
    with open(path, "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


def _map_limit() -> int:
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 0


_MAP_LIMIT = _map_limit()


@pytest.fixture(autouse=True)
def _release_compiled_programs_near_the_map_limit():
  """Every compiled CPU program keeps its code in its own memory mappings (a Miras fwd+bwd: ~900), and a process
  may hold vm.max_map_count of them (65530 by default): a worker that compiles a few hundred such programs
  segfaults inside XLA's compiler. Past half the limit, the compiled programs are dropped after the test (the
  persistent compilation cache makes compiling them again a cache read)."""
  yield
  if _MAP_LIMIT and _count_lines("/proc/self/maps") > _MAP_LIMIT // 2:
    jax.clear_caches()
