"""Decoder LM assembly: shapes, causality, GQA, dtypes and the mixer registry."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import DecoderLM, ModelConfig, available_mixers, get_mixer, parse_layer_spec, register_mixer
from research.models.blocks import rope


def _tokens(key, b, t, vocab=256):
  return jax.random.randint(key, (b, t), 0, vocab)


@pytest.mark.parametrize("tie", [True, False])
def test_logit_shapes_and_finiteness(tie):
  cfg = ModelConfig(layers=("attn", "attn"), d_model=32, num_heads=4, num_kv_heads=2, tie_embeddings=tie)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  logits, aux = model(_tokens(jax.random.key(1), 3, 11))
  assert logits.shape == (3, 11, 256) and logits.dtype == jnp.float32
  assert aux == {}
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert (model.head is None) == tie


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_future_tokens_cannot_change_past_logits(dtype):
  cfg = ModelConfig(layers=("attn",) * 3, d_model=32, num_heads=4, num_kv_heads=1, dtype=dtype)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  key_a, key_b = jax.random.split(jax.random.key(7))
  tokens = _tokens(key_a, 2, 24)
  cut = 13
  changed = tokens.at[:, cut:].set(_tokens(key_b, 2, 24 - cut))
  assert bool(jnp.any(changed[:, cut:] != tokens[:, cut:]))
  before, _ = model(tokens)
  after, _ = model(changed)
  np.testing.assert_array_equal(np.asarray(before[:, :cut]), np.asarray(after[:, :cut]))
  # ... and the future does change (the test could fail): the logits after the cut differ.
  assert float(jnp.max(jnp.abs(before[:, cut:] - after[:, cut:]))) > 1e-3


def test_gradient_flows_to_every_parameter():
  cfg = ModelConfig(layers=("attn", "attn"), d_model=32, num_heads=2, num_kv_heads=2, tie_embeddings=False)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = _tokens(jax.random.key(3), 2, 9)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_rope_preserves_norm_and_encodes_relative_position():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  q, k = x, jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
  pos = jnp.arange(6)
  rq, rk = rope(q, pos, 10_000.0), rope(k, pos, 10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # <R(m) q, R(n) k> depends on m - n only: shifting both positions leaves the scores unchanged.
  rq2, rk2 = rope(q, pos + 5, 10_000.0), rope(k, pos + 5, 10_000.0)
  scores = jnp.einsum("bthd,bshd->bhts", rq, rk)
  np.testing.assert_allclose(scores, jnp.einsum("bthd,bshd->bhts", rq2, rk2), rtol=1e-4, atol=1e-5)


def test_layer_spec_parsing_and_registry_errors():
  assert parse_layer_spec(" attn, attn ") == ("attn", "attn")
  assert "attn" in available_mixers()
  with pytest.raises(KeyError, match="unknown layer 'nope'; registered layers: .*attn"):
    parse_layer_spec("attn,nope")
  with pytest.raises(ValueError, match="comma-separated"):
    parse_layer_spec("attn,,attn")
  with pytest.raises(ValueError, match="already registered"):
    register_mixer("attn")(lambda *a, **k: None)
  with pytest.raises(TypeError, match="frozen dataclass"):
    register_mixer("not_a_config", config=dict)
  assert get_mixer("attn") is not None


@pytest.mark.parametrize("kwargs, message", [
    ({"num_heads": 4, "num_kv_heads": 3}, "must divide num_heads"),
    ({"d_model": 30, "num_heads": 4}, "divisible by num_heads"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"head_dim": 7}, "positive even"),
    ({"layers": ()}, "must name at least one layer"),
    ({"layers": ("attn", "nope")}, "unknown layer 'nope'"),
    ({"layers": ("mom",), "mixers": {"mom": {"top_k": 9}}}, r"mixers.mom.top_k must be in \[1, num_memories=4\]"),
    ({"mixers": {"attn": {"implementation": "flash"}}}, "mixers.attn.implementation must be one of"),
])
def test_model_config_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{"layers": ("attn",), **kwargs})


def test_model_config_round_trips_through_json_and_fills_mixer_defaults():
  from layers.mom import MoMConfig
  from research.config import from_json, to_json
  cfg = ModelConfig(layers=("mom", "attn", "mom"), mixers={"mom": {"top_k": 1, "memory": {"chunk_size": 16}}})
  assert isinstance(cfg.mixers["mom"], MoMConfig) and cfg.mixers["mom"].memory.chunk_size == 16
  assert set(cfg.mixers) == {"mom", "attn"}  # attn took its defaults
  assert from_json(ModelConfig, json.loads(json.dumps(to_json(cfg)))) == cfg
