"""FIFO replay of self-play positions: root observation, search policy target and Monte-Carlo return-to-go."""

from __future__ import annotations

import jax
import numpy as np


class Replay:
  """A ring buffer of pytrees of numpy arrays with a leading position axis."""

  def __init__(self, capacity: int):
    if capacity < 1:
      raise ValueError(f"Replay capacity must be >= 1, got {capacity}.")
    self.capacity, self.size, self._next, self._data = capacity, 0, 0, None

  def add(self, items) -> None:
    """Adds a pytree whose leaves are [M, ...]; the oldest positions are overwritten once full."""
    leaves = jax.tree.leaves(items)
    m = leaves[0].shape[0]
    if self._data is None:
      self._data = jax.tree.map(lambda x: np.zeros((self.capacity,) + x.shape[1:], x.dtype), items)
    idx = (self._next + np.arange(m)) % self.capacity
    jax.tree.map(lambda buf, x: buf.__setitem__(idx, np.asarray(x)), self._data, items)
    self._next = int((self._next + m) % self.capacity)
    self.size = min(self.capacity, self.size + m)

  def sample(self, rng: np.random.Generator, batch: int):
    if self.size == 0:
      raise ValueError("cannot sample from an empty replay buffer.")
    idx = rng.integers(0, self.size, batch)
    return jax.tree.map(lambda x: x[idx], self._data)


def returns_to_go(rewards: np.ndarray, live: np.ndarray) -> np.ndarray:
  """[T, B] undiscounted sums of the live rewards from each step to the end of the episode."""
  r = np.where(live, rewards, 0.0)
  return np.flip(np.cumsum(np.flip(r, 0), 0), 0)
