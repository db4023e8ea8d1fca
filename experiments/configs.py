"""Named run presets for ``--config NAME``, registered with ``research.train.presets``.

``tiny`` trains a byte-level LM on the Python standard library's sources on a 2-core CPU in a few minutes;
``small`` is a laptop/GPU-sized version; ``gpu`` is a ~100M-parameter model for one H100/H200;
``mqar_tiny`` is the Zoology MQAR recall task at T=64 with 4 key-value pairs; ``mqar_gpu`` its one-GPU size
(d_model 128, batch 256; ``experiments.mqar`` sweeps T and the pair count).

Importing this module also imports memlab's plugin packages (``layers``, ``optim``), so the experiments work from a
source tree without ``pip install -e .`` (which declares them as entry points).
"""

from __future__ import annotations

import layers  # noqa: F401  (registers every mixer)
import optim  # noqa: F401  (registers GaLore and its variants)
from research.data import MQARTaskConfig
from research.models import ModelConfig
from research.train import TrainConfig
from research.train.presets import PRESETS, get_preset, register_preset

__all__ = ["PRESETS", "get_preset"]


@register_preset("tiny")
def tiny() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(layers=("attn", "attn", "attn"), d_model=128, num_heads=4, num_kv_heads=4),
      seq_len=128, batch_size=16, steps=500, learning_rate=3e-3, warmup_steps=30,
      eval_every=100, eval_batches=8, checkpoint_every=50, log_every=20)


@register_preset("small")
def small() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(layers=("attn",) * 6, d_model=384, num_heads=6, num_kv_heads=6),
      seq_len=512, batch_size=32, steps=2000, learning_rate=1.5e-3, warmup_steps=200,
      eval_every=250, eval_batches=16, checkpoint_every=250, log_every=50)


@register_preset("gpu")
def gpu() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(layers=("attn",) * 12, d_model=768, num_heads=12, num_kv_heads=12, dtype="bfloat16"),
      seq_len=1024, batch_size=64, steps=5000, learning_rate=6e-4, warmup_steps=500,
      eval_every=500, eval_batches=32, checkpoint_every=500, log_every=50)


@register_preset("mqar_tiny")
def mqar_tiny() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(vocab_size=8192, layers=("attn", "attn"), d_model=64, num_heads=2, num_kv_heads=2),
      task="mqar", plugins={"mqar": MQARTaskConfig(num_kv_pairs=4)}, seq_len=64, batch_size=64, steps=1500,
      learning_rate=3e-3, warmup_steps=100, eval_every=250, eval_batches=4, checkpoint_every=500, log_every=50)


@register_preset("mqar_gpu")
def mqar_gpu() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(vocab_size=8192, layers=("attn", "attn"), d_model=128, num_heads=2, num_kv_heads=2),
      task="mqar", plugins={"mqar": MQARTaskConfig(num_kv_pairs=16)}, seq_len=256, batch_size=256, steps=2000,
      learning_rate=2e-3, warmup_steps=100, eval_every=500, eval_batches=4, checkpoint_every=1000, log_every=100)


@register_preset("tiny_diloco")
def tiny_diloco() -> TrainConfig:
  """``tiny`` trained by Streaming DiLoCo (``optim.diloco``): 4 replicas x 2-way data parallel on 8 devices (on CPU:
  XLA_FLAGS=--xla_force_host_platform_device_count=8), one of 3 fragments synced every 10 steps in 4-bit e3m0."""
  import dataclasses

  from optim.diloco import DiLoCoConfig
  diloco = DiLoCoConfig(replicas=4, sync_every=30, fragments=3, overlap_steps=1, alpha=0.5, wire="e3m0")
  return dataclasses.replace(tiny(), regime="diloco", plugins={"diloco": diloco})


@register_preset("tiny_zo")
def tiny_zo() -> TrainConfig:
  """``tiny`` fine-tuned by ZO-SPSA with one-byte gradients (``optim.zo``): 8 workers (on CPU:
  XLA_FLAGS=--xla_force_host_platform_device_count=8) x 1 direction, 2 sequences each, log8 codes, a ledger beside
  the checkpoints. Starts from the newest checkpoint of ``runs/tiny`` (``make train`` first; ``--init-from none``
  starts from the random initialisation instead)."""
  import dataclasses

  from optim.zo.regime import ZOSPSAConfig
  from optim.zo.registry import MeZOConfig
  return dataclasses.replace(
      tiny(), regime="zo_spsa", optimizer="mezo_sgd", init_from="runs/tiny", grad_clip=0.0, learning_rate=1e-4,
      warmup_steps=0, steps=300, eval_every=100, checkpoint_every=50, log_every=10,
      plugins={"zo_spsa": ZOSPSAConfig(check_every=50), "mezo_sgd": MeZOConfig(num_samples=1)})
