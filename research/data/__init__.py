"""Training data: byte-level text corpora and the MQAR synthetic recall task, behind one ``Task`` interface.

A task hands out batches as ``{"inputs": int32 [b, t], "labels": int32 [b, t]}`` where ``labels[:, i]`` is the
target for ``inputs[:, i]`` (-100 = not scored). Training batches are pure functions of ``(seed, step)``, so the
data position saved in a checkpoint is the step number.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from research.data.mqar import IGNORE_LABEL, MQARConfig, mqar_examples
from research.data.text_corpus import CorpusError, TextCorpus, training_batch, validation_batches

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


__all__ = ["Batch", "CorpusError", "IGNORE_LABEL", "MQARConfig", "MQARTask", "Task", "TextCorpus", "TextTask"]
