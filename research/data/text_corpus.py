"""Byte-level language-modelling data over local text files.

The embedded default corpus is the Python standard library's own ``.py`` sources, found at run time (present on
every machine, ~30 MB). A corpus is the concatenation of its files' bytes in sorted path order, split into
64 KiB blocks; every 50th block is validation, the rest training. Batches are pure functions of
``(seed, step)``, so the iterator's position is just the step number and resuming is exact.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

BLOCK_BYTES = 64 * 1024
VALIDATION_EVERY = 50  # block i is validation iff i % VALIDATION_EVERY == VALIDATION_EVERY - 1


class CorpusError(ValueError):
  """The text corpus cannot be built from the given paths (missing, empty, binary or unreadable input)."""


def default_corpus_files() -> list[Path]:
  """The standard library's ``.py`` files (site-packages excluded), sorted."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
  if not files:
    raise CorpusError(f"no .py files under the standard library folder {stdlib}")
  return sorted(files)


def _is_binary(data: bytes) -> bool:
  return b"\0" in data[:8192]


def _files_under(folder: Path, raw: str | os.PathLike) -> list[Path]:
  """Every non-hidden file below ``folder``; a sub-folder that cannot be read is an error, not an empty folder."""
  found, unreadable = [], []
  for root, dirs, names in os.walk(folder, onerror=lambda e: unreadable.append(e.filename)):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [Path(root, n) for n in names if not n.startswith(".") and Path(root, n).is_file()]
  if unreadable:
    raise CorpusError(f"data folder '{raw}': cannot read {unreadable[0]} (permission denied or gone)")
  return found


def collect_text_files(paths: Sequence[str | os.PathLike]) -> dict[Path, bool]:
  """Files named by ``paths`` (files, or folders searched recursively, hidden entries skipped), sorted.

  Returns {file: named}, where ``named`` says the file was passed directly (then it must be text; binary files
  found inside folders are skipped).
  """
  files: dict[Path, bool] = {}
  for raw in paths:
    path = Path(raw)
    if not path.exists():
      raise CorpusError(f"data path '{raw}' does not exist")
    if path.is_dir():
      found = _files_under(path, raw)
      if not found:
        raise CorpusError(f"data folder '{raw}' holds no files")
      files.update({p: files.get(p, False) for p in found})
    else:
      files[path] = True
  return dict(sorted(files.items()))


def read_corpus(files: dict[Path, bool]) -> np.ndarray:
  """Concatenated bytes of ``files`` ({path: named}) as uint8 [n]; see :func:`collect_text_files`."""
  chunks = []
  for path, named in files.items():
    try:
      data = path.read_bytes()
    except OSError as e:
      raise CorpusError(f"cannot read data file '{path}': {e.strerror or e}") from None
    if _is_binary(data):
      if not named:
        continue
      raise CorpusError(f"data file '{path}' looks binary (contains NUL bytes); pass text files")
    chunks.append(np.frombuffer(data, dtype=np.uint8))
  corpus = np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)
  if corpus.size == 0:
    raise CorpusError(f"the data holds no text: its {len(files)} file(s) are empty or binary")
  return corpus


def split_train_validation(corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) byte streams: every ``VALIDATION_EVERY``-th 64 KiB block goes to validation.

  A corpus shorter than ``VALIDATION_EVERY`` blocks keeps its last 2% (at least one byte) for validation.
  """
  n_blocks = corpus.size // BLOCK_BYTES
  if n_blocks < VALIDATION_EVERY:
    cut = corpus.size - max(1, corpus.size // 50)
    return corpus[:cut], corpus[cut:]
  blocks = corpus[: n_blocks * BLOCK_BYTES].reshape(n_blocks, BLOCK_BYTES)
  is_val = np.arange(n_blocks) % VALIDATION_EVERY == VALIDATION_EVERY - 1
  train = np.concatenate([blocks[~is_val].reshape(-1), corpus[n_blocks * BLOCK_BYTES:]])
  return train, blocks[is_val].reshape(-1)


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Train/validation byte streams of one corpus. ``train``/``validation``: uint8 [n]."""

  train: np.ndarray
  validation: np.ndarray
  source: str

  @classmethod
  def load(cls, paths: Sequence[str | os.PathLike] | None = None) -> "TextCorpus":
    """The default stdlib corpus when ``paths`` is empty/None, else the text files under ``paths``."""
    if paths:
      files = collect_text_files(paths)
      source = ", ".join(str(p) for p in paths)
    else:
      files = dict.fromkeys(default_corpus_files(), False)
      source = f"python stdlib ({sysconfig.get_paths()['stdlib']})"
    train, validation = split_train_validation(read_corpus(files))
    return cls(train=train, validation=validation, source=f"{source}: {len(files)} files")

  def check_fits(self, seq_len: int) -> None:
    for name, stream in (("training", self.train), ("validation", self.validation)):
      if stream.size < seq_len + 1:
        raise CorpusError(f"the {name} split of {self.source} has {stream.size} bytes, fewer than seq_len+1 = "
                          f"{seq_len + 1}; pass more text or a smaller --seq-len")


def sample_windows(stream: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
  """``batch_size`` random windows of ``seq_len + 1`` bytes: int32 [batch_size, seq_len + 1]."""
  starts = rng.integers(0, stream.size - seq_len, size=batch_size)
  return stream[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def training_batch(corpus: TextCorpus, *, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
  """The training batch of ``step``: a pure function of (seed, step). int32 [batch_size, seq_len + 1]."""
  return sample_windows(corpus.train, batch_size, seq_len, np.random.default_rng([seed, step]))


def training_batches(corpus: TextCorpus, *, seed: int, start_step: int, batch_size: int,
                     seq_len: int) -> Iterator[np.ndarray]:
  """Deterministic, resumable stream of training batches from ``start_step`` on."""
  step = start_step
  while True:
    yield training_batch(corpus, seed=seed, step=step, batch_size=batch_size, seq_len=seq_len)
    step += 1


def validation_batches(corpus: TextCorpus, *, num_batches: int, batch_size: int, seq_len: int,
                       seed: int = 0) -> list[np.ndarray]:
  """A fixed list of validation batches (same for every evaluation of a run, and the same windows for any
  split of ``num_batches × batch_size`` examples into batches)."""
  rng = np.random.default_rng([seed, 0x5EED])
  return np.split(sample_windows(corpus.validation, num_batches * batch_size, seq_len, rng), num_batches)
