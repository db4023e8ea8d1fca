"""MoM and Gated DeltaNet layers: dispatch vs dense reference, routing, aux loss, GDN equivalence, decode cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.gated_deltanet import GatedDeltaNet, GDNConfig, MemoryCache
from layers.mom import (
  AUX_LOSS_NAME,
  MixtureOfMemories,
  MoMConfig,
  load_balance_loss,
  packed_layout,
  packed_length,
  route,
)
from research.config import ConfigError
from research.models import DecoderLM, MixerContext, ModelConfig, registry

GDN = GDNConfig(chunk_size=16)
CTX = MixerContext(d_model=32, num_heads=2, head_dim=16, num_layers=2)


def _x(seed, b=2, t=37, d=32):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, t, d))


def _rel(x, y):
  err = float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
  assert np.isfinite(err)
  return err


def _pair(cfg, seed=0):
  """The same weights under cfg's dispatch and the dense reference."""
  layer = MixtureOfMemories(cfg, CTX, rngs=nnx.Rngs(seed))
  dense_layer = MixtureOfMemories(dataclasses.replace(cfg, dispatch="dense"), CTX, rngs=nnx.Rngs(seed))
  return layer, dense_layer


@pytest.mark.parametrize("dispatch", ["packed", "sorted"])
@pytest.mark.parametrize("num_memories,top_k,shared", [(4, 2, True), (3, 1, False)])
def test_dispatch_matches_dense_reference(dispatch, num_memories, top_k, shared):
  layer, reference = _pair(MoMConfig(memory=GDN, num_memories=num_memories, top_k=top_k, shared_memory=shared,
                                     dispatch=dispatch))
  x = _x(1)
  y, aux = layer(x)
  y_ref, aux_ref = reference(x)
  print(f"{dispatch} M={num_memories} k={top_k} shared={shared}: rel err {_rel(y, y_ref):.2e}")
  assert _rel(y, y_ref) <= 1e-5 and float(aux[AUX_LOSS_NAME]) == pytest.approx(float(aux_ref[AUX_LOSS_NAME]))


def test_packed_layout_places_every_routed_token_once():
  mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.4, (3, 2, 37))
  layout = packed_layout(mask, 16, copies=2)  # copies only sizes the row; 3 slots at p = 0.4 fit in 2·37 + 3·15
  assert layout.token.shape == (2, packed_length(37, 16, 3, 2)) == (2, 128) and layout.chunk_resets.shape == (2, 8)
  for b in range(2):
    token, slot, position = (np.asarray(a[b]) for a in (layout.token, layout.slot, layout.position))
    placed = sorted(zip(slot[token >= 0], token[token >= 0]))
    assert placed == sorted(zip(*np.nonzero(np.asarray(mask[:, b]))))  # each routed (slot, token) exactly once
    for n in range(3):  # a slot's tokens: one run, in time order, starting on a flagged chunk
      where = np.flatnonzero((slot == n) & (token >= 0))
      if where.size:
        assert np.all(np.diff(where) == 1) and np.all(np.diff(token[where]) > 0)
        assert where[0] % 16 == 0 and bool(layout.chunk_resets[b, where[0] // 16])
        assert list(position[where]) == list(range(where.size))


@pytest.mark.parametrize("dispatch", ["packed", "sorted"])
def test_gradients_match_dense_reference(dispatch):
  layer, reference = _pair(MoMConfig(memory=GDN, num_memories=4, top_k=2, dispatch=dispatch))
  x = _x(2, t=18)

  def loss(model, x):
    y, aux = model(x)
    return jnp.sum(jnp.sin(50.0 * y)) + aux[AUX_LOSS_NAME]

  g = nnx.grad(loss, argnums=(0, 1))(layer, x)
  g_ref = nnx.grad(loss, argnums=(0, 1))(reference, x)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g[0]), jax.tree.leaves(g[0]), jax.tree.leaves(g_ref[0])):
    assert _rel(a, b) <= 1e-4, path[0]
  print(f"dx rel err {_rel(g[1], g_ref[1]):.2e}")
  assert _rel(g[1], g_ref[1]) <= 1e-4


def test_one_memory_top1_no_shared_equals_gdn_layer():
  layer = MixtureOfMemories(MoMConfig(memory=GDN, num_memories=1, top_k=1, shared_memory=False), CTX,
                            rngs=nnx.Rngs(3))
  gdn = GatedDeltaNet(GDN, CTX, rngs=nnx.Rngs(4))
  for name in ("k_proj", "v_proj", "b_proj", "a_proj"):
    getattr(gdn, name).kernel[...] = getattr(layer, name)[0]
  for name in ("a_log", "dt_bias", "q_conv", "k_conv", "v_conv"):
    getattr(gdn, name)[...] = getattr(layer, name)[...]
  gdn.q_proj.kernel[...] = layer.q_proj.kernel[...]
  gdn.out = layer.out
  x = _x(5)
  y_mom, aux = layer(x)
  y_gdn, _ = gdn(x)
  print(f"MoM(M=1,k=1) vs GDN: rel err {_rel(y_mom, y_gdn):.2e}")
  assert _rel(y_mom, y_gdn) <= 1e-5 and float(aux[AUX_LOSS_NAME]) == pytest.approx(1.0)


def test_routing_weights_sum_to_one_and_no_token_dropped():
  layer = MixtureOfMemories(MoMConfig(memory=GDN, num_memories=5, top_k=3, shared_memory=True), CTX,
                            rngs=nnx.Rngs(6))
  x = _x(7, t=50)
  _, slot_weights, routed, _ = layer.routing(x)
  routed_weights = slot_weights[..., :-1]
  assert float(jnp.max(jnp.abs(jnp.sum(routed_weights, -1) - 1.0))) <= 1e-6
  assert bool(jnp.all(routed_weights >= 0)) and bool(jnp.all(slot_weights[..., -1] == 1.0))
  # every token is processed by exactly k routed memories plus the shared one: K·T routed tokens per sequence
  assert bool(jnp.all(jnp.sum(routed[..., :-1], axis=(1, 2)) == 3 * 50)) and bool(jnp.all(routed[..., -1]))
  # k = M gives the full softmax
  probs, weights, idx = route(jax.random.normal(jax.random.PRNGKey(8), (2, 9, 4)), 4)
  full = jnp.take_along_axis(probs, idx, -1)
  assert float(jnp.max(jnp.abs(full - weights))) <= 1e-6


@pytest.mark.parametrize("dispatch", ["packed", "sorted"])
def test_uneven_loads_all_tokens_to_one_memory(dispatch):
  """A router that sends every token to memory 0 (top-1) must still process all of them."""
  cfg = MoMConfig(memory=GDN, num_memories=3, top_k=1, shared_memory=False, dispatch=dispatch)
  layer, reference = _pair(cfg, seed=9)
  for model in (layer, reference):
    model.router.kernel[...] = jnp.zeros_like(model.router.kernel[...]).at[:, 0].set(0.0)
    model.router.kernel[...] = model.router.kernel[...]  # uniform logits: ties resolve to memory 0
  x = _x(10, t=40)
  _, _, routed, _ = layer.routing(x)
  assert bool(jnp.all(routed[..., 0])) and not bool(jnp.any(routed[..., 1:]))
  assert _rel(layer(x)[0], reference(x)[0]) <= 1e-5


def test_aux_loss_equals_k_at_balanced_routing():
  m, k = 4, 2
  uniform = jnp.full((2, 8, m), 1.0 / m)
  idx = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(11), (2, 8, m)), -1)[..., :k]
  assert float(load_balance_loss(uniform, idx)) == pytest.approx(k, rel=1e-6)
  # perfectly balanced selections with non-uniform probabilities
  balanced_idx = jnp.stack([jnp.arange(8) % m, (jnp.arange(8) + 1) % m], -1)[None].repeat(2, 0)
  probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(12), (2, 8, m)), -1)
  assert float(load_balance_loss(probs, balanced_idx)) == pytest.approx(k, rel=1e-6)
  # the layer: zero router -> uniform probabilities -> aux = k, with a non-zero gradient on the router
  layer = MixtureOfMemories(MoMConfig(memory=GDN, num_memories=m, top_k=k), CTX, rngs=nnx.Rngs(13))
  layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
  aux_fn = lambda model: model(_x(14, t=16))[1][AUX_LOSS_NAME]
  assert float(aux_fn(layer)) == pytest.approx(k, rel=1e-6)
  grad = nnx.grad(aux_fn)(layer)
  assert float(jnp.max(jnp.abs(grad.router.kernel[...]))) > 0


def test_causality():
  layer = MixtureOfMemories(MoMConfig(memory=GDN), CTX, rngs=nnx.Rngs(15))
  x = _x(16, t=30)
  y, _ = layer(x)
  y2, _ = layer(x.at[:, 20:].add(jax.random.normal(jax.random.PRNGKey(17), (2, 10, 32))))
  assert float(jnp.max(jnp.abs(y2[:, :20] - y[:, :20]))) == 0.0 and _rel(y2[:, 20:], y[:, 20:]) > 1e-3


@pytest.mark.parametrize("kind", ["mom", "gdn"])
def test_cached_decode_equals_full_forward(kind):
  layer = (MixtureOfMemories(MoMConfig(memory=GDN), CTX, rngs=nnx.Rngs(18)) if kind == "mom"
           else GatedDeltaNet(GDN, CTX, rngs=nnx.Rngs(18)))
  x = _x(19, t=30)
  y_full, _ = layer(x)
  layer.init_cache(2)
  outs = [layer(x[:, :24], use_cache=True)[0]]
  outs += [layer(x[:, i:i + 1], use_cache=True)[0] for i in range(24, 27)]
  outs.append(layer(x[:, 27:], use_cache=True)[0])  # a multi-token continuation from the cache
  err = _rel(jnp.concatenate(outs, 1), y_full)
  print(f"{kind} prefill + decode vs full forward: rel err {err:.2e}")
  assert err <= 1e-5
  _, cache = nnx.state(layer, nnx.Param, MemoryCache)
  assert len(jax.tree.leaves(cache)) == 4


def test_decode_leaves_unselected_memories_bit_identical():
  layer = MixtureOfMemories(MoMConfig(memory=GDN, num_memories=4, top_k=1, shared_memory=True), CTX,
                            rngs=nnx.Rngs(20))
  x = _x(21, t=12)
  layer.init_cache(2)
  layer(x[:, :11], use_cache=True)
  before = jax.tree.map(jnp.copy, nnx.state(layer, MemoryCache))
  _, _, routed, _ = layer.routing(x[:, 11:])
  layer(x[:, 11:], use_cache=True)
  after = nnx.state(layer, MemoryCache)
  untouched = ~routed[:, 0]  # [b, slots]
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    same = jnp.all((old == new).reshape(*old.shape[:2], -1), -1)
    assert bool(jnp.all(same[untouched])) and not bool(jnp.all(same[~untouched]))


def test_registry_builds_mixers():
  assert {"mom", "gdn"} <= set(registry.available_mixers())
  for name, cfg in (("mom", MoMConfig(memory=GDN)), ("gdn", GDN)):
    mixer = registry.get_mixer(name)(cfg, CTX, rngs=nnx.Rngs(22))
    y, aux = mixer(_x(23, t=9))
    assert y.shape == (2, 9, 32) and bool(jnp.all(jnp.isfinite(y)))
    assert set(aux) == ({AUX_LOSS_NAME} if name == "mom" else set())


def test_config_validation_messages():
  with pytest.raises(ConfigError, match="top_k must be in"):
    MoMConfig(num_memories=2, top_k=3)
  with pytest.raises(ConfigError, match="dispatch must be one of"):
    MoMConfig(dispatch="ragged")
  with pytest.raises(ConfigError, match="implementation must be one of"):
    GDNConfig(implementation="cuda")
  dense_layer = MixtureOfMemories(MoMConfig(memory=GDN, dispatch="dense"), CTX, rngs=nnx.Rngs(24))
  with pytest.raises(ValueError, match="dispatch='packed' or 'sorted'"):
    dense_layer.init_cache(1)


def test_model_config_mixers_reach_the_memories():
  memory = {"expand_v": 2, "conv_size": 2, "chunk_size": 16, "implementation": "reference"}
  cfg = ModelConfig(layers=("mom", "gdn"), d_model=16, num_heads=2, num_kv_heads=2,
                    mixers={"mom": {"num_memories": 3, "top_k": 1, "shared_memory": False, "dispatch": "sorted",
                                    "memory": memory}, "gdn": memory})
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  mom, gdn = model.blocks[0].mixer.cfg, model.blocks[1].mixer.cfg
  assert (mom.num_memories, mom.top_k, mom.shared_memory, mom.dispatch) == (3, 1, False, "sorted")
  for c in (mom.memory, gdn):
    assert (c.expand_v, c.conv_size, c.chunk_size, c.implementation) == (2, 2, 16, "reference")
  assert model.blocks[1].mixer.shape.value_head_dim == 16  # head_dim 8 · expand_v 2
