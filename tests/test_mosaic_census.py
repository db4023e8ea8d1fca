"""The Mosaic GPU kernels' op census (benchmarks/mosaic_census.py), from this CPU: every step of the chain kernel
and of the keys' forward is counted under its named scope, and their only float divisions a chunk are the erf's
1 / (1 + z/2) (one a gelu or gelu' evaluation of a [64, 64] tile: 16 vector ops a thread) and the LayerNorm's and
row means', so a division by a constant (a whole IEEE division a value in these kernels) cannot come back unseen."""
import pytest

from benchmarks import mosaic_census

ERF = 16  # vector<2xf32> divisions of one erf over a warpgroup's [64, 64] float32 tile


@pytest.fixture(scope="module")
def chain():
  return mosaic_census.kernel_census("chain")


def test_the_chain_kernels_steps_are_counted_under_their_scopes(chain):
  steps = {"S0 e2", "S1 e1", "S1 row pull-back", "S2 g_h", "S2 products", "S3 update, publish"}
  assert steps <= chain.keys()
  print("\n" + mosaic_census.format_table("chain", chain))
  assert all(chain[step]["float"] > 0 for step in steps)
  in_steps = sum(row.get("float", 0) for step, row in chain.items() if step in steps)
  assert in_steps > chain[mosaic_census.OUTSIDE]["float"]


def test_the_chain_kernel_divides_only_in_its_erfs_and_row_means(chain):
  assert chain["S0 e2"]["divf"] == ERF  # gelu'(z); gelu''(z) multiplies
  assert chain["S2 products"]["divf"] <= ERF + 2  # gelu'(z) again, and the two scale sums by s₁
  # erf's and φ's (one φ for gelu' and gelu''): 2 × 16 vector pairs, each value one ex2.approx (approx_math)
  assert chain["S0 e2"]["exp"] == 4 * ERF


def test_the_keys_forwards_steps_are_counted_under_their_scopes():
  forward = mosaic_census.kernel_census("forward")
  assert {"F0 scales", "F1 h", "F2 rows", "F3 e2, update"} <= forward.keys()
  assert forward["F1 h"]["divf"] == ERF and forward["F3 e2, update"]["divf"] == ERF
