"""Multi-query associative recall (MQAR), following the Zoology protocol.

Reference: "Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al., arXiv 2312.04927),
``zoology/data/multiquery_ar.py``. Each example holds D distinct keys from [1, V/2), each paired with a distinct
value from [V/2, V), written as D contiguous (key, value) pairs; then the D keys are queried again at even offsets
``2·gap`` of the remaining sequence, with gaps drawn without replacement from p(i) ∝ a·i^(a−1) (a = 0.01 puts most
queries far from the context). The label after each query key is its value; every other label is -100 (ignored).
With ``random_non_queries`` the empty (0) slots are filled with random tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_LABEL = -100


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """MQAR task shape. ``seq_len`` T must be even, ``vocab_size`` V > T, and ``4·num_kv_pairs ≤ T``."""

  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True

  def __post_init__(self):
    problems = []
    if self.seq_len < 4 or self.seq_len % 2:
      problems.append(f"seq_len must be an even integer >= 4 (got {self.seq_len})")
    if self.vocab_size <= self.seq_len:
      problems.append(f"vocab_size must exceed seq_len (got {self.vocab_size} <= {self.seq_len})")
    if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
      problems.append(f"num_kv_pairs must be in [1, seq_len/4 = {self.seq_len // 4}] (got {self.num_kv_pairs})")
    if self.num_kv_pairs >= self.vocab_size // 2:
      problems.append(f"num_kv_pairs must be < vocab_size/2 (got {self.num_kv_pairs})")
    if not 0.0 < self.power_a <= 1.0:
      problems.append(f"power_a must be in (0, 1] (got {self.power_a})")
    if problems:
      raise ValueError("; ".join(problems))


def _sample_without_replacement(rng: np.random.Generator, n_rows: int, population: int, k: int,
                                log_p: np.ndarray | None = None) -> np.ndarray:
  """[n_rows, k] draws from range(population) without replacement (weighted by exp(log_p) if given).

  Gumbel-top-k: the k largest of log p_i + Gumbel_i are an ordered sample without replacement ∝ p.
  """
  scores = rng.gumbel(size=(n_rows, population))
  if log_p is not None:
    scores += log_p
  return np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < population else np.argsort(-scores, axis=1)


def _sample_distinct_uniform(rng: np.random.Generator, n_rows: int, population: int, k: int) -> np.ndarray:
  """[n_rows, k] uniform draws from range(population) without replacement.

  Draws with replacement and redraws the rows that repeat a value: conditioned on being distinct, every ordered
  k-tuple is equally likely, the same law as Gumbel-top-k with equal weights but O(k) per row instead of
  O(population) (the key/value vocabularies are thousands wide, a row holds tens of pairs). Rows repeat with
  probability about 1 - exp(-k²/(2·population)); past k² = 6·population (a row is distinct with probability e⁻³)
  it falls back to Gumbel-top-k.
  """
  if k * k > 6 * population:
    return _sample_without_replacement(rng, n_rows, population, k)
  draws = rng.integers(0, population, size=(n_rows, k))
  pending = np.arange(n_rows)  # rows that may still repeat a value: only those redrawn in the last round
  while True:
    ordered = np.sort(draws[pending], axis=1)
    pending = pending[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
    if not pending.size:
      return draws
    draws[pending] = rng.integers(0, population, size=(pending.size, k))


def mqar_examples(cfg: MQARConfig, num_examples: int, seed: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """``num_examples`` MQAR sequences. Returns (inputs int32 [n, T], labels int32 [n, T]); labels[t] is the target
  for position t (already shifted), -100 where nothing is scored."""
  rng = np.random.default_rng(seed)
  n, t, d, v = num_examples, cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
  context = 2 * d
  key_vocab = v // 2
  keys = 1 + _sample_distinct_uniform(rng, n, key_vocab - 1, d)
  values = key_vocab + _sample_distinct_uniform(rng, n, v - key_vocab, d)
  kvs = np.zeros((n, context), np.int64)
  kvs[:, 0::2], kvs[:, 1::2] = keys, values

  space = (t - context) // 2
  gap_ids = np.arange(1, space + 1)
  log_p = np.log(cfg.power_a) + (cfg.power_a - 1.0) * np.log(gap_ids)
  gaps = _sample_without_replacement(rng, n, space, d, log_p=log_p)
  queries = np.zeros((n, t - context + 1), np.int64)
  np.put_along_axis(queries, gaps * 2, keys, axis=1)
  sequence = np.concatenate([kvs, queries], axis=1)  # [n, T + 1]
  targets = np.full((n, t + 1), IGNORE_LABEL, np.int64)
  np.put_along_axis(targets, gaps * 2 + context + 1, values, axis=1)

  inputs, labels = sequence[:, :-1], targets[:, 1:]
  if cfg.random_non_queries:
    fill = rng.integers(0, v, size=inputs.shape)
    inputs = np.where(inputs == 0, fill, inputs)
  return inputs.astype(np.int32), labels.astype(np.int32)

