"""Policy/value network for the mallocGame (Flax NNX).

A small conv trunk over the time x address occupancy grid (plus the current buffer's time mask), an MLP over the
buffer features, a shared slot scorer over ``[trunk, slot features]`` for the K candidate offsets, one SLOW logit
and a scalar value. Illegal actions get ``-1e9`` logits, so the search never expands them (mctx masks only the
root itself; google-deepmind/mctx issues #29 and #89).

Shapes: grid [B, G, G, 2], feats [B, F], slots [B, K, 6], legal [B, K+1] -> logits [B, K+1], value [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NEG = -1e9


class PolicyValueNet(nnx.Module):
  """About 0.3M parameters for G=32, K=32, width 128."""

  def __init__(self, grid: int, num_features: int, slot_features: int = 6, width: int = 128, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(2, 16, (3, 3), strides=(2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
    self.grid_proj = nnx.Linear((grid // 4) ** 2 * 32, width, rngs=rngs)
    self.feat_proj = nnx.Linear(num_features, width, rngs=rngs)
    self.trunk = nnx.Linear(2 * width, width, rngs=rngs)
    self.slot_hidden = nnx.Linear(width + slot_features, width, rngs=rngs)
    self.slot_out = nnx.Linear(width, 1, rngs=rngs)
    self.slow_out = nnx.Linear(width, 1, rngs=rngs)
    self.value_hidden = nnx.Linear(width, width, rngs=rngs)
    self.value_out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, obs: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    x = jax.nn.relu(self.conv1(obs["grid"]))
    x = jax.nn.relu(self.conv2(x))
    x = jax.nn.relu(self.grid_proj(x.reshape(x.shape[0], -1)))
    f = jax.nn.relu(self.feat_proj(obs["feats"]))
    h = jax.nn.relu(self.trunk(jnp.concatenate([x, f], -1)))
    k = obs["slots"].shape[1]
    hs = jnp.concatenate([jnp.broadcast_to(h[:, None], (h.shape[0], k, h.shape[1])), obs["slots"]], -1)
    slot_logits = self.slot_out(jax.nn.relu(self.slot_hidden(hs)))[..., 0]
    logits = jnp.concatenate([slot_logits, self.slow_out(h)], -1)
    logits = jnp.where(obs["legal"], logits, NEG)
    value = self.value_out(jax.nn.relu(self.value_hidden(h)))[:, 0]
    return logits, value
