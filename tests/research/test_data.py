"""Text corpus and MQAR generator: determinism, resumability, splits, errors and the Zoology protocol."""

import itertools

import numpy as np
import pytest

from research.data import CorpusError, MQARConfig, TextCorpus, TextTask
from research.data.mqar import IGNORE_LABEL, _sample_distinct_uniform, mqar_examples
from research.data.text_corpus import (BLOCK_BYTES, VALIDATION_EVERY, split_train_validation, training_batch,
                                       training_batches)


@pytest.fixture(scope="module")
def stdlib_corpus():
  return TextCorpus.load()


def test_default_corpus_is_the_stdlib_sources(stdlib_corpus):
  assert stdlib_corpus.train.size > 10_000_000 and stdlib_corpus.validation.size > 100_000
  assert "stdlib" in stdlib_corpus.source
  assert b"import " in stdlib_corpus.train[:2_000_000].tobytes()


def test_batches_are_deterministic_and_resumable(stdlib_corpus):
  kwargs = dict(seed=3, batch_size=4, seq_len=32)
  first = list(itertools.islice(training_batches(stdlib_corpus, start_step=0, **kwargs), 6))
  resumed = list(itertools.islice(training_batches(stdlib_corpus, start_step=4, **kwargs), 2))
  for a, b in zip(first[4:], resumed):
    np.testing.assert_array_equal(a, b)
  assert first[0].shape == (4, 33) and first[0].dtype == np.int32
  assert not np.array_equal(first[0], first[1])
  assert not np.array_equal(first[0], training_batch(stdlib_corpus, step=0, seed=4, batch_size=4, seq_len=32))


def test_text_task_shifts_targets(stdlib_corpus):
  batch = TextTask(stdlib_corpus, seq_len=16, seed=0).train_batch(5, 3)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])


def test_split_is_interleaved_blocks_without_overlap():
  corpus = (np.arange(BLOCK_BYTES * VALIDATION_EVERY * 2 + 100) % 251).astype(np.uint8)
  train, val = split_train_validation(corpus)
  assert train.size + val.size == corpus.size
  assert val.size == 2 * BLOCK_BYTES
  np.testing.assert_array_equal(val[:BLOCK_BYTES], corpus[(VALIDATION_EVERY - 1) * BLOCK_BYTES:
                                                          VALIDATION_EVERY * BLOCK_BYTES])


def test_user_data_folder_skips_binary_files(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n" * 200)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("more text\n" * 100)
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
  corpus = TextCorpus.load([tmp_path])
  assert corpus.train.size + corpus.validation.size == 12 * 200 + 10 * 100


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: _write(d / "e.txt", b""), "empty or binary"),
    (lambda d: _write(d / "b.dat", b"ab\x00cd"), "looks binary"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no files"),
])
def test_bad_data_paths_give_clear_errors(tmp_path, setup, message):
  with pytest.raises(CorpusError, match=message):
    TextCorpus.load([setup(tmp_path)])


def test_too_small_corpus_is_rejected(tmp_path):
  (tmp_path / "t.txt").write_text("tiny")
  with pytest.raises(CorpusError, match="fewer than seq_len"):
    TextCorpus.load([tmp_path / "t.txt"]).check_fits(64)


# ----------------------------------------------------------------------------------------------------------------
# MQAR (Zoology protocol).


@pytest.mark.parametrize("seq_len, pairs", [(64, 4), (128, 8), (256, 16), (64, 16)])
def test_mqar_structure(seq_len, pairs):
  cfg = MQARConfig(vocab_size=8192, seq_len=seq_len, num_kv_pairs=pairs)
  inputs, labels = mqar_examples(cfg, 64, seed=1)
  assert inputs.shape == labels.shape == (64, seq_len)
  half = cfg.vocab_size // 2
  for x, y in zip(inputs, labels):
    keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
    assert len(set(keys)) == pairs and len(set(values)) == pairs  # each key once, distinct values
    assert np.all((keys >= 1) & (keys < half)) and np.all((values >= half) & (values < cfg.vocab_size))
    value_of = dict(zip(keys, values))
    scored = np.flatnonzero(y != IGNORE_LABEL)
    assert len(scored) == pairs
    assert np.all(scored >= 2 * pairs)
    for t in scored:  # the label after a query key is exactly that key's value
      assert x[t] in value_of and y[t] == value_of[x[t]]
    assert np.all(x >= 0) and np.all(x < cfg.vocab_size)


@pytest.mark.parametrize("population, k", [(40, 6), (40, 16)])  # rejection path and Gumbel fallback
def test_distinct_uniform_sampler_is_uniform_without_replacement(population, k):
  draws = _sample_distinct_uniform(np.random.default_rng(0), 20_000, population, k)
  assert draws.shape == (20_000, k) and draws.min() >= 0 and draws.max() < population
  assert all(len(set(row)) == k for row in draws[:2000])
  for column in (0, k - 1):  # every position is uniform over the population
    freq = np.bincount(draws[:, column], minlength=population) / len(draws)
    np.testing.assert_allclose(freq, 1 / population, atol=6 * np.sqrt(1 / population / len(draws)))
  ordered_pairs = np.bincount(draws[:, 0] * population + draws[:, 1], minlength=population**2)
  assert ordered_pairs[:: population + 1].sum() == 0  # never (i, i)


def test_mqar_is_deterministic_in_seed():
  cfg = MQARConfig(seq_len=64, num_kv_pairs=4)
  a, b, c = (mqar_examples(cfg, 8, seed=s) for s in (5, 5, 6))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_mqar_gaps_follow_the_power_law():
  cfg = MQARConfig(vocab_size=1024, seq_len=64, num_kv_pairs=1, power_a=0.01, random_non_queries=False)
  n = 20_000
  inputs, labels = mqar_examples(cfg, n, seed=0)
  query_pos = np.argmax(labels != IGNORE_LABEL, axis=1)  # = context + 2·gap
  gaps = (query_pos - 2) // 2
  space = (cfg.seq_len - 2) // 2
  i = np.arange(1, space + 1)
  p = cfg.power_a * i ** (cfg.power_a - 1)
  p /= p.sum()
  empirical = np.bincount(gaps, minlength=space) / n
  assert 0.5 * np.abs(empirical - p).sum() < 0.02  # total-variation distance


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 63}, "even"), ({"vocab_size": 32, "seq_len": 64}, "exceed"),
    ({"seq_len": 64, "num_kv_pairs": 17}, "num_kv_pairs"),
])
def test_mqar_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MQARConfig(**kwargs)
