"""Attention mixers and LongGen: registry, schedule, KV fraction, visible-only KV cache, cached decode = forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import kv_cache
from layers.attention import (AttentionConfig, BlockSparseConfig, CausalAttention, SinkWindowConfig,
                              decode_sequence)
from layers.kernels.attention import masks
from layers.kernels.attention.api import bind_heads
from layers.kernels.attention.patterns import BlockSparse, Dense, SinkWindow
from layers.longgen import LongGenConfig, full_layer_indices, kv_fraction, longgen_layer_spec
from research.config import ConfigError
from research.models import DecoderLM, MixerContext, ModelConfig, get_mixer

CTX = MixerContext(d_model=32, num_heads=4, num_kv_heads=2, num_layers=3)
PATTERNS = [
    Dense(causal=True),
    SinkWindow(3, 5),
    SinkWindow(0, 4),
    bind_heads(BlockSparse(block=2, local_blocks=2, stride=3), 4, 2),
    bind_heads(BlockSparse(block=3, local_blocks=1, stride=2, offset=1, homo_head=True), 4, 2),
]


def _x(seed, t=21):
  return jax.random.normal(jax.random.PRNGKey(seed), (2, t, CTX.d_model))


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_cached_decode_equals_full_forward(pattern):
  layer = CausalAttention(CTX, pattern, rngs=nnx.Rngs(0))
  x = _x(1)
  y_full, _ = layer(x)
  y_cached = decode_sequence(layer, x, prompt_length=6)
  print(pattern, "max |Δy|", float(jnp.max(jnp.abs(y_cached - y_full))))
  assert float(jnp.max(jnp.abs(y_cached - y_full))) <= 1e-5


@pytest.mark.parametrize("pattern", PATTERNS[1:], ids=repr)
def test_cache_holds_exactly_the_visible_tokens(pattern):
  layer = CausalAttention(CTX, pattern, rngs=nnx.Rngs(0))
  x = _x(2, t=30)
  layer.init_cache(2, 30)
  layer(x[:, :7], use_cache=True)
  pattern = layer.pattern
  dense = masks.dense_mask(pattern, 30, 30, CTX.kv_heads)
  heads = dense.shape[0]
  for t in range(7, 30):
    last = t - 1
    counts = np.asarray(kv_cache.cached_count(layer.cache))
    positions = np.asarray(layer.cache["positions"][...])
    for h in range(CTX.kv_heads):
      want = np.flatnonzero(dense[h % heads, last])
      assert sorted(positions[h][positions[h] >= 0]) == list(want), (t, h)
      assert counts[h] == masks.row_counts(pattern, 30, h % heads)[last]
    layer(x[:, t:t + 1], use_cache=True)
  assert layer.cache["k"].shape[2] == kv_cache.num_slots(pattern, 30)


def test_sink_window_cache_is_constant_size():
  pattern = SinkWindowConfig().pattern(MixerContext(d_model=256, num_heads=32, num_kv_heads=8))
  assert kv_cache.num_slots(pattern, 131072) == 64 + 8192
  assert kv_cache.num_slots(pattern, 1000) == 1000


def test_cache_variables_split_from_params():
  layer = CausalAttention(CTX, PATTERNS[1], rngs=nnx.Rngs(0))
  layer.init_cache(1, 16)
  _, params, cache, rest = nnx.split(layer, nnx.Param, kv_cache.KVCache, ...)
  assert len(jax.tree.leaves(cache)) == 4 and len(jax.tree.leaves(rest)) == 0
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_schedule_middle_third_is_full():
  assert list(full_layer_indices(32)) == list(range(10, 21))
  assert list(full_layer_indices(80)) == list(range(26, 53))
  assert list(full_layer_indices(3)) == [1]
  spec = longgen_layer_spec(32)
  assert spec.count("attn") == 11
  assert abs(spec[:10].count("sink_window") - spec[21:].count("sink_window")) <= 1


def test_kv_fraction_matches_spec():
  sw = kv_fraction(32, 131072, SinkWindow(64, 8192))
  bs = kv_fraction(32, 131072, BlockSparseConfig().pattern(MixerContext(d_model=32, num_heads=32)), num_kv_heads=32)
  print("kv fraction", sw, bs)
  assert abs(sw - 0.3851) < 1e-4 and abs(bs - 0.4303) < 1e-4


@pytest.mark.parametrize("name", ["attn", "swa", "sink_window", "block_sparse", "longgen", "longgen_block"])
def test_registered_mixers_build_and_run_in_a_model(name):
  cfg = ModelConfig(d_model=32, num_heads=4, num_kv_heads=2, layers=(name,) * 3)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  logits, aux = model(jnp.arange(20, dtype=jnp.int32).reshape(2, 10))
  assert logits.shape == (2, 10, cfg.vocab_size) and aux == {} and bool(jnp.isfinite(logits).all())
  if name.startswith("longgen"):
    kinds = [type(block.mixer.pattern) for block in model.blocks]
    assert kinds[1] is Dense and kinds[0] is kinds[2] is not Dense
  assert get_mixer(name) is not None


def test_gradients_flow_through_sparse_layer():
  layer = CausalAttention(CTX, PATTERNS[3], rngs=nnx.Rngs(0))
  x = _x(3)
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and min(norms) > 0


def test_config_validation_messages():
  with pytest.raises(ConfigError, match="implementation must be one of"):
    AttentionConfig(implementation="flash")
  with pytest.raises(ConfigError, match="sink must be >= 0"):
    SinkWindowConfig(sink=-2)
  with pytest.raises(ConfigError, match=r"full_fraction must be in \[0.0, 1.0\]"):
    LongGenConfig(full_fraction=1.5)


def test_mixer_configs_reach_the_layers():
  cfg = ModelConfig(layers=("swa", "sink_window", "block_sparse", "longgen", "longgen", "longgen"), d_model=16,
                    num_heads=2, num_kv_heads=2,
                    mixers={"swa": {"window": 10}, "sink_window": {"sink": 3, "window": 10},
                            "block_sparse": {"block": 4, "local_blocks": 2, "stride": 3},
                            "longgen": {"sink": 3, "window": 10, "full_fraction": 0.5}})
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  patterns = [block.mixer.pattern for block in model.blocks]
  assert patterns[0] == masks.SinkWindow(0, 10) and patterns[1] == masks.SinkWindow(3, 10)
  assert (patterns[2].block, patterns[2].local_blocks, patterns[2].stride) == (4, 2, 3)
  # The schedule centres round(6 · 0.5) = 3 full layers in the whole stack (layers 1..3): of the longgen layers
  # 3, 4, 5 only layer 3 falls inside it.
  assert [type(p).__name__ for p in patterns[3:]] == ["Dense", "SinkWindow", "SinkWindow"]
