"""The training loop's registry builds every optimizer of ``optim`` for a real decoder LM's parameter tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optim.memory import state_bytes_by_group
from research.checkpoint import Checkpointer, abstract_like
from research.models import DecoderLM, ModelConfig
from research.optimizers import decay_mask, get_optimizer
from research.train import TrainConfig, make_optimizer


@pytest.mark.parametrize("name", ["galore", "natural_galore", "optax_galore"])
def test_registered_optimizer_steps_on_lm_params(name):
  cfg = TrainConfig(model=ModelConfig(layers=("attn",), d_model=32, num_heads=2, num_kv_heads=2), optimizer=name)
  params = nnx.to_pure_dict(nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
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
  assert cfg.optimizer_config.resolved_rank(cfg.model) == 8 and q.shape == (32, 32)
  # Natural GaLore's s = 20 gradient history outweighs AdamW's moments (see optim/natural_galore.py).
  assert (groups["attn/mlp"]["total"] > adam_bytes) == (name == "natural_galore")


def test_optax_galore_entry_equals_optax_contrib_galore():
  cfg = TrainConfig(model=ModelConfig(layers=("attn",), d_model=32, num_heads=2, num_kv_heads=2),
                    optimizer="optax_galore")
  params = nnx.to_pure_dict(nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
  opt = cfg.optimizer_config
  ours = get_optimizer("optax_galore")(opt, optax.constant_schedule(1e-2), cfg.model)
  ref = optax.contrib.galore(1e-2, rank=opt.resolved_rank(cfg.model), update_proj_gap=200,
                             base_optimizer=optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
                             weight_decay=opt.weight_decay, mask=decay_mask)
  s_ours, s_ref = ours.init(params), ref.init(params)
  for i in range(3):
    key = jax.random.key(i)
    grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape, p.dtype), params)
    u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, params)
    u_ref, s_ref = jax.jit(ref.update)(grads, s_ref, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), u_ours, u_ref)
  assert not any(x.size == 0 for x in jax.tree.leaves(s_ours)), "zero-size arrays break orbax checkpoints"


@pytest.mark.parametrize("name", ["galore", "natural_galore", "optax_galore"])
def test_optimizer_state_round_trips_through_the_checkpointer(name, tmp_path):
  cfg = TrainConfig(model=ModelConfig(layers=("attn",), d_model=32, num_heads=2, num_kv_heads=2), optimizer=name)
  params = nnx.to_pure_dict(nnx.state(DecoderLM(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
  tx = make_optimizer(cfg)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape, p.dtype), params)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
  checkpointer.save(1, {"opt_state": state}, {"step": 1})
  restored, _ = checkpointer.restore(1, abstract_like({"opt_state": state}))
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, restored["opt_state"], state)
