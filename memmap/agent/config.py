"""The agent's settings (``python -m memmap train-agent`` flags), importable without jax.

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning" (arXiv 2305.07440); the game is
``memmap.env``, the search ``memmap.agent.search`` (Gumbel MuZero, Danihelka et al., ICLR 2022) and the self-play
loop ``memmap.agent.train``, which are imported only when a game or a search is built from this config.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from memmap.orders import ORDERS
from research.config import Config, Problem, option

if TYPE_CHECKING:
  from memmap import env
  from memmap.agent.search import SearchConfig

OBJECTIVES = ("height", "benefit")  # memmap.env.OBJECTIVES (the game checks it again when it is built)


@dataclasses.dataclass(frozen=True)
class AgentConfig(Config):
  """Game, search and self-play settings of the agent (``python -m memmap train-agent``); ``tiny()`` trains in
  seconds on CPU.

  Attributes:
    objective: what the game optimises: height (place everything, minimise the peak) or benefit (fill capacity C).
    order: the order in which the game presents buffers (memmap.orders).
    num_slots: candidate offsets per move (K); the policy has K + 1 actions.
    grid: side of the time x address occupancy grid the network sees.
    width: hidden width of the policy/value network.
    n_min, n_max: buffers per generated training instance (guillotine cuts), inclusive.
    pack_width, pack_height: time x address size of the rectangle the guillotine cuts (the optimum height).
    batch_envs: instances played per self-play iteration.
    num_simulations: Gumbel MuZero simulations per move in self-play.
    max_num_considered_actions: actions Sequential Halving considers at the root.
    replay_size: positions kept in the FIFO replay.
    train_batch: positions per AdamW step.
    updates_per_iter: AdamW steps per self-play iteration.
    iterations: self-play iterations.
    learning_rate: AdamW learning rate.
    value_weight: weight of the value MSE against the policy cross-entropy.
    seed: seed of the instances, the network and the search.
  """
  objective: str = option("height", choices=OBJECTIVES)
  order: str = option("spatial", choices=ORDERS)
  num_slots: int = option(32, minimum=1)
  grid: int = option(32, minimum=4)
  width: int = option(128, minimum=1)
  n_min: int = option(8, minimum=1)
  n_max: int = option(40, minimum=1)
  pack_width: int = option(32, minimum=1)
  pack_height: int = option(32, minimum=1)
  batch_envs: int = option(16, minimum=1)
  num_simulations: int = option(16, minimum=1)
  max_num_considered_actions: int = option(16, minimum=1)
  replay_size: int = option(65536, minimum=1)
  train_batch: int = option(256, minimum=1)
  updates_per_iter: int = option(8, minimum=1)
  iterations: int = option(50, minimum=1)
  learning_rate: float = option(3e-4, minimum=0.0)
  value_weight: float = option(1.0, minimum=0.0)
  seed: int = option(0, minimum=0)

  def check(self):
    if self.n_min > self.n_max:
      yield Problem("n_min", f"must be <= n_max ({self.n_max}) (got {self.n_min})")
    if self.n_max > self.pack_width * self.pack_height:
      yield Problem("n_max", f"must be <= pack_width * pack_height ({self.pack_width * self.pack_height}), the "
                    f"pieces a guillotine can cut (got {self.n_max})")

  @property
  def game(self) -> env.GameConfig:
    from memmap import env  # jax only when a game is built
    return env.GameConfig(objective=self.objective, order=self.order, num_slots=self.num_slots, grid=self.grid)

  def search(self, train: bool, num_simulations: int | None = None, rollout_weight: float = 0.0,
             rollout_fits: tuple[str, ...] = ("best",), fortify: bool = False) -> SearchConfig:
    from memmap.agent.search import SearchConfig  # jax and mctx only when a search is built
    return SearchConfig(num_simulations=self.num_simulations if num_simulations is None else num_simulations,
                        max_num_considered_actions=self.max_num_considered_actions,
                        gumbel_scale=1.0 if train else 0.0, rollout_weight=rollout_weight,
                        rollout_fits=tuple(rollout_fits), fortify=fortify)

  @classmethod
  def tiny(cls) -> AgentConfig:
    return cls(n_min=4, n_max=8, pack_width=8, pack_height=8, batch_envs=8, num_simulations=8, num_slots=8,
               grid=8, width=32, train_batch=64, updates_per_iter=4, iterations=4)
