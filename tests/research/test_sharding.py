"""Sharded training on 8 fake CPU devices: named meshes, logical axes on every parameter, optimizer state that
follows its parameter, equal losses across mesh shapes, per-device memory from XLA, resume on another mesh."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.configs import get_preset
from research.checkpoint import Checkpointer, abstract_like
from research.mesh import mesh_shape, named_mesh
from research.metrics import read_metrics
from research.models import DecoderLM, ModelConfig, available_mixers
from research.sharding import follow_params, logical_axes, param_specs, shard_bytes, spec_for
from research.train import TrainError, build_model, build_regime, train_and_evaluate

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2")


def _cfg(**overrides):
  base = get_preset("tiny")
  model = dataclasses.replace(base.model, d_model=64, num_heads=4, num_kv_heads=4, layers=("attn", "attn"))
  cfg = dataclasses.replace(base, model=model, seq_len=32, batch_size=16, steps=5, eval_batches=1, log_every=1,
                            eval_every=5, checkpoint_every=5)
  return dataclasses.replace(cfg, **overrides)


def test_mesh_specs_and_their_errors():
  assert mesh_shape("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert mesh_shape("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  for spec, message in (("data=3", "multiply to 3, but there are 8 devices"), ("pipe=8", "axes among data, fsdp"),
                        ("data=2,data=4", "twice"), ("data=-1,fsdp=-1", "only one axis"), ("fsdp=x", "integer"),
                        ("data=3,fsdp=-1", "do not divide the 8 devices")):
    with pytest.raises(ValueError, match=message):
      mesh_shape(spec, 8)
  with pytest.raises(TrainError, match=r"--mesh data=3: the axis sizes multiply to 3, but there are 8 devices"):
    build_regime(_cfg(mesh="data=3"), build_model(_cfg(), abstract=True))


@pytest.mark.parametrize("name", sorted(set(available_mixers()) - {"test_running_mean"}))
def test_every_parameter_of_every_mixer_has_logical_axes(name):
  cfg = ModelConfig(layers=(name,), d_model=32, num_heads=2, num_kv_heads=2, tie_embeddings=False)
  axes = logical_axes(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
  params = nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  for (path, ax), (_, p) in zip(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: x is None or
                                                                     isinstance(x, tuple)),
                                jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))):
    assert ax is not None and len(ax) == len(p.shape), f"{name}: {jax.tree_util.keystr(path)} has axes {ax}"


def test_rules_shard_only_what_divides_and_use_each_mesh_axis_once():
  mesh = named_mesh("fsdp=4,tensor=2")
  assert spec_for(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert spec_for(("embed", "mlp"), (6, 128), mesh) == P(None, "tensor")  # 6 is not divisible by 4
  assert spec_for(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
  assert spec_for((None,), (64,), mesh) == P(None) and spec_for(None, (3,), mesh) == P()


def test_optimizer_state_follows_its_parameter_galore_included():
  cfg = _cfg(optimizer="galore", plugins={"galore": {"rank": 8}}, mesh="fsdp=4,tensor=2")
  model = build_model(cfg, abstract=True)
  specs = param_specs(model.axes, model.params, named_mesh(cfg.mesh))
  state = jax.eval_shape(build_regime(cfg, model).tx.init, model.params)
  opt_specs = follow_params(state, model.params, specs)
  w = "['blocks'][1]['mlp']['up']['kernel']"  # [64, 192]: embed over fsdp, mlp over tensor
  found = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(state),
                                jax.tree.leaves(opt_specs, is_leaf=lambda s: isinstance(s, P))):
    if w in jax.tree_util.keystr(path):
      found.setdefault(tuple(leaf.shape), set()).add(spec)
  assert found[(64, 8)] == {P("fsdp", None)}  # the projector P [m, r] keeps the weight's row axis
  assert found[(8, 192)] == {P(None, "tensor")}  # the low-rank moments [r, n] keep its column axis
  assert found[()] == {P()}  # counts


def test_losses_agree_across_meshes_and_fsdp_holds_a_fraction_of_the_state(tmp_path):
  losses, state_bytes = {}, {}
  for mesh in MESHES:
    cfg = _cfg(mesh=mesh)
    train_and_evaluate(cfg, tmp_path / mesh, log=lambda s: None)
    losses[mesh] = [r["loss"] for r in read_metrics(tmp_path / mesh / "metrics.jsonl") if r["split"] == "train"]
    xla = json.loads((tmp_path / mesh / "memory.json").read_text())["compiled"]
    regime = build_regime(cfg, build_model(cfg, abstract=True))
    ours = shard_bytes(regime.abstract_state(), regime.shardings)
    batch = shard_bytes(regime.abstract_batch(), {k: v.sharding for k, v in regime.abstract_batch().items()})
    assert xla["argument_size_in_bytes"] == ours + batch  # XLA's accounting = our shard sizes
    state_bytes[mesh] = xla["argument_size_in_bytes"] - batch
  print("losses", losses, "\nper-device params + optimizer state bytes", state_bytes)
  for mesh in MESHES[1:]:
    np.testing.assert_allclose(losses[mesh], losses["data=8"], rtol=0, atol=1e-5)
  assert state_bytes["fsdp=8"] <= state_bytes["data=8"] / 6


def test_a_checkpoint_resumes_on_another_mesh_with_the_same_values(tmp_path):
  straight = tmp_path / "straight"
  train_and_evaluate(_cfg(steps=6, checkpoint_every=3, mesh="data=8"), straight, log=lambda s: None)
  moved = tmp_path / "moved"  # the same run stopped at step 3, resumed on another mesh
  shutil.copytree(straight, moved)
  shutil.rmtree(moved / "checkpoints" / "6")
  regimes = {m: build_regime(_cfg(mesh=m), build_model(_cfg(), abstract=True)) for m in ("data=8", "data=2,fsdp=4")}
  saved = {m: Checkpointer(moved / "checkpoints").restore(3, abstract_like(r.abstract_state()))[0]
           for m, r in regimes.items()}
  for a, b in zip(jax.tree.leaves(saved["data=8"]), jax.tree.leaves(saved["data=2,fsdp=4"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical values on the new layout
  assert any(leaf.sharding.spec != P() for leaf in jax.tree.leaves(saved["data=2,fsdp=4"]))
  logs = []
  train_and_evaluate(_cfg(steps=6, checkpoint_every=3, mesh="data=2,fsdp=4"), moved, log=logs.append)
  assert any("resumed from checkpoint at step 3" in line for line in logs)
  losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"]
  assert losses(moved)[:3] == losses(straight)[:3] and len(losses(moved)) == 6
  np.testing.assert_allclose(losses(moved)[3:], losses(straight)[3:], rtol=0, atol=1e-5)
