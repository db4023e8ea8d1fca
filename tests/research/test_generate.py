"""Incremental decoding: prefill + one token at a time reproduces the full forward, for every cached mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import DecoderLM, ModelConfig
from research.models.cache import DecodeCache
from research.models.generate import generate

STACKS = [("attn", "attn"), ("attn", "sink_window", "block_sparse"), ("gdn", "attn"), ("mom", "swa")]


@pytest.mark.parametrize("layers", STACKS, ids=lambda s: ",".join(s))
def test_greedy_generation_logits_equal_the_full_forward(layers):
  sparse = {"sink_window": {"sink": 2, "window": 5}, "swa": {"window": 5},
            "block_sparse": {"block": 2, "local_blocks": 2, "stride": 2}}
  cfg = ModelConfig(layers=layers, d_model=32, num_heads=2, num_kv_heads=1,
                    mixers={k: v for k, v in sparse.items() if k in layers})
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(1), (2, 7), 0, 256)
  tokens, logits = generate(model, prompt, 6)
  assert tokens.shape == (2, 13) and logits.shape == (2, 12, 256)
  np.testing.assert_array_equal(tokens[:, :7], prompt)
  full, _ = model(tokens[:, :-1])
  error = float(jnp.max(jnp.abs(full - logits)))
  print(f"{layers}: max |cached - full| = {error:.2e}")
  assert error < 1e-4
  np.testing.assert_array_equal(tokens[:, 7:], jnp.argmax(full[:, 6:], axis=-1))  # greedy picks


def test_sampling_is_reproducible_and_caches_split_from_params():
  model = DecoderLM(ModelConfig(layers=("attn",), d_model=16, num_heads=2, num_kv_heads=2), rngs=nnx.Rngs(0))
  prompt = jnp.zeros((1, 3), jnp.int32)
  a, _ = generate(model, prompt, 5, temperature=1.0, key=jax.random.key(4))
  b, _ = generate(model, prompt, 5, temperature=1.0, key=jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  _, params, caches = nnx.split(model, nnx.Param, DecodeCache)
  assert {p.shape for p in jax.tree.leaves(caches)} == {(1, 2, 8, 8), (2, 8), ()}  # k, v; positions; next
  assert not any(isinstance(leaf, DecodeCache) for leaf in jax.tree.leaves(params, is_leaf=lambda x: True))


def test_bad_generation_requests_are_rejected():
  model = DecoderLM(ModelConfig(layers=("attn",), d_model=16, num_heads=2, num_kv_heads=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, jnp.zeros((1, 3), jnp.int32), 0)
  with pytest.raises(ValueError, match="PRNG key"):
    generate(model, jnp.zeros((1, 3), jnp.int32), 2, temperature=0.7)
