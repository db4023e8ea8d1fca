"""The training loop's registry builds every optimizer of ``optim`` for a real decoder LM's parameter tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from optim.memory import state_bytes_by_group
from optim.registry import galore_rank
from research.models import DecoderLM, ModelConfig
from research.optimizers import make_optimizer
from research.train import TrainConfig


@pytest.mark.parametrize("name", ["galore", "natural_galore", "optax_galore"])
def test_registered_optimizer_steps_on_lm_params(name):
  cfg = TrainConfig(model=ModelConfig(layers=("attn",), d_model=32, num_heads=2, num_kv_heads=2), optimizer=name)
  params = nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  tx = make_optimizer(cfg)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  groups = state_bytes_by_group(state, params)
  q = params["blocks"][0]["mixer"]["q_proj"]["kernel"]
  adam_bytes = 2 * sum(p.size * 4 for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
                       if any(k in jax.tree_util.keystr(path) for k in ("mixer", "mlp")) and p.ndim == 2)
  print(name, groups, "AdamW attn/mlp bytes", adam_bytes)
  assert galore_rank(cfg) == 8 and q.shape == (32, 32)
  # Natural GaLore's s = 20 gradient history outweighs AdamW's moments (see optim/natural_galore.py).
  assert (groups["attn/mlp"]["total"] > adam_bytes) == (name == "natural_galore")
