"""The Miras mixers (moneta, yaad, memora, titans): decoding equals the full forward, streaming, registry and config
errors, gradients to every parameter, and the initial memory's scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.miras.mixers import MemoraConfig, MirasLayer, MonetaConfig, TitansConfig, YaadConfig
from layers.miras.retention import LqNorm
from research.config import ConfigError
from research.models import DecoderLM, MixerContext, ModelConfig
from research.models.generate import generate
from research.models.registry import MIXERS, get_mixer

NAMES = ("moneta", "yaad", "memora", "titans")
CTX = MixerContext(d_model=32, num_heads=2)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_the_full_forward(name):
  """Prefill 7 tokens, then one at a time across chunk boundaries (chunk 4): the logits of one full pass."""
  cfg = ModelConfig(layers=(name, "attn"), d_model=32, num_heads=2, num_kv_heads=1, mixers={name: {"chunk_size": 4}})
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(1), (2, 7), 0, 256)
  tokens, logits = generate(model, prompt, 7)
  full, _ = model(tokens[:, :-1])
  error = float(jnp.max(jnp.abs(full - logits)))
  print(f"{name}: max |cached - full| = {error:.2e}")
  assert error < 1e-4


@pytest.mark.parametrize("cfg", [MonetaConfig(chunk_size=4, gates="head"), MemoraConfig(chunk_size=3),
                                 TitansConfig(chunk_size=4, read="pre")], ids=lambda c: type(c).__name__)
def test_streamed_segments_equal_one_pass(cfg):
  layer = MirasLayer(cfg, CTX, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 13, 32))
  full, _ = layer(x)
  layer.init_cache(2)
  parts = [layer(x[:, a:b], use_cache=True)[0] for a, b in ((0, 5), (5, 6), (6, 13))]
  error = float(jnp.max(jnp.abs(jnp.concatenate(parts, axis=1) - full)))
  print(f"{type(cfg).__name__}: segments 5 + 1 + 7 vs one pass: max error {error:.2e}")
  assert error < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
  layer = get_mixer(name)(MIXERS.config_class(name)(chunk_size=4), CTX, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer, nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 32))
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] ** 2))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), path
    assert float(jnp.max(jnp.abs(g))) > 0, f"{name}: no gradient reaches {jax.tree_util.keystr(path)}"


def test_config_errors_are_one_line():
  with pytest.raises(ConfigError, match="gates must be head for the momentum recurrence"):
    TitansConfig(gates="channel")
  with pytest.raises(ConfigError, match="eps must be > 0 when p < 2"):
    MonetaConfig(p=1.5, eps=0.0)
  with pytest.raises(ConfigError, match="chunk_size"):
    YaadConfig(chunk_size=0)
  with pytest.raises(ConfigError, match="memory must be one of"):
    MemoraConfig(memory="deep")


def test_initial_moneta_weights_have_fan_in_scale():
  layer = MirasLayer(MonetaConfig(), MixerContext(d_model=256, num_heads=4), rngs=nnx.Rngs(0))
  w = jax.vmap(LqNorm(4.0).gradient_point)({n: p[...] for n, p in layer.initial.items()})  # the norm is per head
  for name, (rows, cols) in layer.spec.memory.shapes(64).items():
    std = float(jnp.std(w[name]))
    print(f"{name}: std of W₀ {std:.4f}, 1/sqrt(fan-in) {1 / np.sqrt(cols):.4f}")
    np.testing.assert_allclose(std, 1 / np.sqrt(cols), rtol=0.05)


def test_linear_memory_ablation_and_channel_gate_shapes():
  layer = MirasLayer(YaadConfig(memory="linear", chunk_size=4), CTX, rngs=nnx.Rngs(0))
  assert layer.ln_scale is None and set(layer.initial) == {"w"}
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 32))
  y, aux = layer(x)
  assert y.shape == x.shape and aux == {} and bool(jnp.all(jnp.isfinite(y)))
  assert layer.eta_gate(x).shape == (2, 9, 2, 16) and layer.delta_gate(x).shape == (2, 9, 2, 1)
