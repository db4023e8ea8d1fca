"""Decoder-only language model assembled from a per-layer mixer spec.

Each block is pre-norm: ``x += mixer(norm(x))``; ``x += swiglu(norm(x))``. The mixer of block i is the registered
mixer ``cfg.layers[i]`` built from its config ``cfg.mixers[cfg.layers[i]]`` and the block's
:class:`~research.models.registry.MixerContext`, so ``ModelConfig(layers=("mom", "attn", "mom"))`` builds a hybrid
model (the ``layers`` plugin package registers ``attn``, ``mom`` and the other mixers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.blocks import INIT_STD, RMSNorm, SwiGLU, annotated
from research.models.config import ModelConfig
from research.models.registry import get_mixer


class DecoderBlock(nnx.Module):
  """One pre-norm residual block. x: [b, t, d] -> ([b, t, d], aux losses of its mixer)."""

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
    name, ctx = cfg.layers[layer_index], cfg.mixer_context(layer_index)
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = get_mixer(name)(cfg.mixers[name], ctx, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = SwiGLU(cfg.d_model, cfg.resolved_mlp_hidden, dtype=cfg.compute_dtype, rngs=rngs,
                      out_std=ctx.out_init_std)

  def __call__(self, x: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    h = self.mixer_norm(x)
    mixed, aux = self.mixer(h, use_cache=True) if use_cache else self.mixer(h)
    x = x + mixed
    return x + self.mlp(self.mlp_norm(x)), aux


class DecoderLM(nnx.Module):
  """tokens: int [b, t] -> (logits: float32 [b, t, vocab], aux: {"<layer>/<name>": scalar}).

  With ``use_cache=True`` (after :meth:`init_cache`) every mixer continues from its decode cache, so a prompt
  followed by one token at a time gives the logits of the full forward (see ``research.models.generate``).

  Args:
    cfg: model shape; ``cfg.layers`` picks each block's mixer by registered name, ``cfg.mixers`` configures it.
    rngs: parameter initialisation randomness.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                           embedding_init=annotated(nnx.initializers.normal(INIT_STD), ("vocab", "embed")), rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(cfg, i, rngs=rngs) for i in range(len(cfg.layers))])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        kernel_init=annotated(nnx.initializers.normal(INIT_STD), ("embed", "vocab")), rngs=rngs)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """Give every mixer an empty decode cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
    for name, block in zip(self.cfg.layers, self.blocks):
      if not hasattr(block.mixer, "init_cache"):
        raise ValueError(f"layer {name!r} has no decode cache, so this model cannot decode incrementally")
      block.mixer.init_cache(batch_size, max_length)

  def __call__(self, tokens: jax.Array, *, use_cache: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = self.embed(tokens)
    aux_losses = {}
    for i, block in enumerate(self.blocks):
      x, aux = block(x, use_cache=use_cache)
      aux_losses.update({f"{i}_{self.cfg.layers[i]}/{name}": value for name, value in aux.items()})
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32), aux_losses


def token_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_id: int = -100) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross entropy and the count of scored tokens; labels equal to ``ignore_id`` are skipped.

  logits: float [b, t, v]; labels: int [b, t]. Returns (sum of -log p(label), number of scored tokens).
  """
  mask = labels != ignore_id
  safe = jnp.where(mask, labels, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, log_z - picked, 0.0)), jnp.sum(mask)
