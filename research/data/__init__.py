"""Training data: byte-level text corpora and the MQAR synthetic recall task, behind one ``Task`` interface.

A task hands out batches as ``{"inputs": int32 [b, t], "labels": int32 [b, t]}`` where ``labels[:, i]`` is the
target for ``inputs[:, i]`` (-100 = not scored). Training batches are pure functions of ``(seed, step)``, so the
data position saved in a checkpoint is the step number.

Tasks are plugins like mixers and optimizers: ``@register_task("name", config=Cfg)`` on a factory
``factory(cfg, *, seq_len, vocab_size, seed) -> Task`` (raising ``ValueError`` for data that cannot serve the run);
``--task name`` selects one and ``--name.<field>`` sets its config. This module registers ``text`` and ``mqar``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from research.config import Config, option
from research.data.mqar import IGNORE_LABEL, MQARConfig, mqar_examples
from research.data.text_corpus import CorpusError, TextCorpus, training_batch, validation_batches
from research.registry import Registry

Batch = dict[str, np.ndarray]
# Mixed into the seed of held-out sets so they never coincide with a training step's batch.
EVAL_SEED_SALT = 0xE7A1_5EED


class Task(Protocol):
  """A source of training and evaluation batches."""

  description: str

  def train_batch(self, step: int, batch_size: int) -> Batch: ...

  def eval_batches(self, num_batches: int, batch_size: int) -> list[Batch]: ...


def _shifted(windows: np.ndarray) -> Batch:
  return {"inputs": windows[:, :-1], "labels": windows[:, 1:]}


@dataclasses.dataclass(frozen=True)
class TextTask:
  """Next-byte prediction over a :class:`TextCorpus` with windows of ``seq_len`` tokens."""

  corpus: TextCorpus
  seq_len: int
  seed: int

  @property
  def description(self) -> str:
    return (f"bytes of {self.corpus.source} ({self.corpus.train.size / 1e6:.1f} MB train, "
            f"{self.corpus.validation.size / 1e6:.2f} MB validation)")

  def train_batch(self, step: int, batch_size: int) -> Batch:
    return _shifted(training_batch(self.corpus, seed=self.seed, step=step, batch_size=batch_size,
                                   seq_len=self.seq_len))

  def eval_batches(self, num_batches: int, batch_size: int) -> list[Batch]:
    return [_shifted(w) for w in validation_batches(self.corpus, num_batches=num_batches, batch_size=batch_size,
                                                    seq_len=self.seq_len)]


@dataclasses.dataclass(frozen=True)
class MQARTask:
  """Multi-query associative recall; evaluation uses a fixed held-out set drawn from a separate seed."""

  config: MQARConfig
  seed: int

  @property
  def description(self) -> str:
    c = self.config
    return f"MQAR (T={c.seq_len}, {c.num_kv_pairs} key-value pairs, vocab {c.vocab_size})"

  def train_batch(self, step: int, batch_size: int) -> Batch:
    inputs, labels = mqar_examples(self.config, batch_size, seed=(self.seed, step))
    return {"inputs": inputs, "labels": labels}

  def eval_batches(self, num_batches: int, batch_size: int) -> list[Batch]:
    inputs, labels = mqar_examples(self.config, num_batches * batch_size, seed=(self.seed, EVAL_SEED_SALT))
    return [{"inputs": i, "labels": l} for i, l in zip(np.split(inputs, num_batches), np.split(labels, num_batches))]


TaskFactory = Callable[..., Task]
TASKS: Registry[TaskFactory] = Registry("task")
register_task = TASKS.register


@dataclasses.dataclass(frozen=True)
class TextConfig(Config):
  """Next-byte prediction over text files (``text``).

  Attributes:
    data: text files or folders; empty means the embedded default corpus (the Python standard library's sources).
  """

  data: tuple[str, ...] = ()


@register_task("text", config=TextConfig)
def text_task(cfg: TextConfig, *, seq_len: int, vocab_size: int, seed: int) -> TextTask:
  if vocab_size < 256:
    raise ValueError(f"the text task needs vocab_size >= 256 for bytes (got {vocab_size})")
  corpus = TextCorpus.load(cfg.data)
  corpus.check_fits(seq_len)
  return TextTask(corpus, seq_len, seed)


@dataclasses.dataclass(frozen=True)
class MQARTaskConfig(Config):
  """Multi-query associative recall (``mqar``; Zoology, arXiv 2312.04927); vocabulary = the model's.

  Attributes:
    num_kv_pairs: key-value pairs per example (4 · pairs <= seq_len).
    power_a: query gaps are drawn with p(i) ∝ a·i^(a−1) (0.01 puts most queries far from their key).
    random_non_queries: fill the empty slots with random tokens.
  """

  num_kv_pairs: int = option(4, minimum=1)
  power_a: float = option(0.01, minimum=1e-6, maximum=1.0)
  random_non_queries: bool = True


@register_task("mqar", config=MQARTaskConfig)
def mqar_task(cfg: MQARTaskConfig, *, seq_len: int, vocab_size: int, seed: int) -> MQARTask:
  return MQARTask(MQARConfig(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=cfg.num_kv_pairs,
                             power_a=cfg.power_a, random_non_queries=cfg.random_non_queries), seed=seed)


__all__ = ["Batch", "CorpusError", "IGNORE_LABEL", "MQARConfig", "MQARTask", "MQARTaskConfig", "TASKS", "Task",
           "TextConfig", "TextCorpus", "TextTask", "register_task"]
