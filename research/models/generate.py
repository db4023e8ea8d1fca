"""Autoregressive generation with the layers' decode caches: one prefill pass, then one token per step.

The model is split once into (graphdef, params, caches); the prefill and the decode step are jitted on those with
the cache state donated, so each step costs one token's work (O(1) state for recurrent memories and window
attention, a growing KV cache for full attention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.cache import DecodeCache
from research.models.transformer import DecoderLM


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _forward_cached(graphdef: nnx.GraphDef, params: nnx.State, caches: nnx.State, rest: nnx.State,
                    tokens: jax.Array) -> tuple[jax.Array, nnx.State]:
  model = nnx.merge(graphdef, params, caches, rest)
  logits, _ = model(tokens, use_cache=True)
  return logits, nnx.state(model, DecodeCache)


def _pick(logits: jax.Array, temperature: float, key: jax.Array | None) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate(model: DecoderLM, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Continue ``prompt`` (int [b, t0]) by ``max_new_tokens`` tokens, greedily or by sampling at ``temperature``.

  Returns (tokens int32 [b, t0 + max_new_tokens], logits float32 [b, t0 + max_new_tokens - 1, vocab]: the
  prompt's logits from the prefill, then one row per decoded token). ``model`` keeps its final caches.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
  if temperature < 0 or (temperature > 0 and key is None):
    raise ValueError("temperature must be >= 0, and sampling (temperature > 0) needs a PRNG key")
  b, t0 = prompt.shape
  model.init_cache(b, t0 + max_new_tokens)
  graphdef, params, caches, rest = nnx.split(model, nnx.Param, DecodeCache, ...)
  keys = jax.random.split(key, max_new_tokens) if key is not None else [None] * max_new_tokens
  logits, caches = _forward_cached(graphdef, params, caches, rest, prompt.astype(jnp.int32))
  all_logits, tokens = [logits], [prompt.astype(jnp.int32)]
  for i in range(max_new_tokens):
    tokens.append(_pick(all_logits[-1][:, -1:], temperature, keys[i]))
    if i + 1 < max_new_tokens:
      logits, caches = _forward_cached(graphdef, params, caches, rest, tokens[-1])
      all_logits.append(logits)
  nnx.update(model, caches)
  return jnp.concatenate(tokens, axis=1), jnp.concatenate(all_logits, axis=1)
