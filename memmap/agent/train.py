"""Self-play training of the mallocGame agent, and solving an instance with it.

Gumbel MuZero (Danihelka et al., ICLR 2022) with the true game as the model (Wang et al., arXiv 2305.07440, use
MuZero the same way). Each iteration plays a batch of freshly generated guillotine instances (perfect packings, so
the optimum is known) with search, stores (root observation, search policy ``action_weights``, Monte-Carlo return)
in a FIFO replay, and takes a few AdamW steps on masked cross-entropy + value MSE. Checkpoints go through
``research.checkpoint.Checkpointer`` (params, optimizer state; meta: step, seed, config).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memmap import env
from memmap.agent.config import AgentConfig
from memmap.agent.network import PolicyValueNet
from memmap.agent.replay import Replay, returns_to_go
from memmap.agent.search import rollout
from memmap.generators import guillotine
from memmap.instance import Instance
from research.checkpoint import Checkpointer, abstract_like


def make_net(cfg: AgentConfig, seed: int) -> PolicyValueNet:
  return PolicyValueNet(cfg.grid, env.num_features(), width=cfg.width, rngs=nnx.Rngs(seed))


def stack_games(insts: list[Instance], cfg: env.GameConfig, n_max: int) -> env.EnvParams:
  games = [env.make_game(i, cfg, n_max=n_max).params for i in insts]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *games)


def _loss(graphdef, params, batch, value_weight):
  logits, value = nnx.merge(graphdef, params)(batch["obs"])
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.sum(jnp.where(batch["obs"]["legal"], batch["weights"] * logp, 0.0), -1)
  mse = jnp.square(value - batch["return"])
  return jnp.mean(ce + value_weight * mse), (jnp.mean(ce), jnp.mean(mse))


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "value_weight"), donate_argnames=("params", "opt"))
def _update(graphdef, params, opt, batch, tx, value_weight):
  (_, aux), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(graphdef, params, batch, value_weight)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt, aux


def train(cfg: AgentConfig, workdir: str | Path | None = None, *,
          log: Callable[[str], None] = print) -> tuple[PolicyValueNet, list[dict]]:
  """Runs self-play; returns the trained network and per-iteration metrics (height / optimum, losses)."""
  rng = np.random.default_rng(cfg.seed)
  key = jax.random.key(cfg.seed)
  net = make_net(cfg, cfg.seed)
  graphdef, params = nnx.split(net)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.learning_rate))
  opt = tx.init(params)
  ckpt = None
  if workdir is not None:
    save_config(cfg, workdir)
    ckpt = Checkpointer(workdir, keep=2)
  start = 0
  if ckpt is not None and ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    (params, opt), _ = ckpt.restore(start, abstract_like((params, opt)))
    log(f"resumed from iteration {start}")
  replay = Replay(cfg.replay_size)
  game, scfg = cfg.game, cfg.search(train=True)
  history = []
  t0 = time.perf_counter()
  for it in range(start, cfg.iterations):
    it_rng = np.random.default_rng([cfg.seed, it])
    insts = [guillotine(int(it_rng.integers(cfg.n_min, cfg.n_max + 1)), it_rng, cfg.pack_width, cfg.pack_height)
             for _ in range(cfg.batch_envs)]
    envp = stack_games(insts, game, cfg.n_max)
    final, traj = rollout(graphdef, params, envp, jax.random.fold_in(key, it), game, scfg, cfg.n_max)
    traj = jax.device_get(traj)
    live = traj["live"]
    rtg = returns_to_go(traj["reward"], live)
    positions = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                             {"obs": traj["obs"], "weights": traj["weights"], "return": rtg})
    replay.add(jax.tree.map(lambda x: x[live.reshape(-1)], positions))
    for _ in range(cfg.updates_per_iter):
      batch = replay.sample(rng, cfg.train_batch)
      params, opt, (ce, mse) = _update(graphdef, params, opt, batch, tx, cfg.value_weight)
    ratio = float(np.mean(np.asarray(final.height) / cfg.pack_height))
    rate = (it + 1 - start) / (time.perf_counter() - t0)
    history.append({"iteration": it + 1, "height_over_opt": ratio, "optimal": float(np.mean(
        np.asarray(final.height) == cfg.pack_height)), "ce": float(ce), "mse": float(mse),
                    "seconds": time.perf_counter() - t0})
    log(f"iter {it + 1}/{cfg.iterations}  height/opt {ratio:.3f}  optimal {history[-1]['optimal']:.2f}  "
        f"ce {float(ce):.3f}  mse {float(mse):.4f}  {rate:.2f} it/s  ETA {(cfg.iterations - it - 1) / rate:.0f}s")
    if ckpt is not None:
      ckpt.save(it + 1, (params, opt), {"step": it + 1, "seed": cfg.seed, "config": dataclasses.asdict(cfg)})
  if ckpt is not None:
    ckpt.close()
  return nnx.merge(graphdef, params), history


CONFIG_FILE = "agent_config.json"


def save_config(cfg: AgentConfig, workdir: str | Path) -> None:
  Path(workdir).mkdir(parents=True, exist_ok=True)
  (Path(workdir) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def load_agent(workdir: str | Path) -> tuple[PolicyValueNet, AgentConfig]:
  """The newest checkpointed network of a ``train`` run and its config."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{workdir} holds no trained agent ({CONFIG_FILE} missing); run train-agent first.")
  cfg = AgentConfig(**json.loads(path.read_text()))
  graphdef, params = nnx.split(make_net(cfg, cfg.seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.learning_rate))
  with Checkpointer(workdir) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir} holds no checkpoint; run train-agent first.")
    (params, _), _ = ckpt.restore(step, abstract_like((params, tx.init(params))))
  return nnx.merge(graphdef, params), cfg


def solve(net: PolicyValueNet, cfg: AgentConfig, inst: Instance, num_simulations: int = 64, seed: int = 0,
          rollout_weight: float = 0.0, order: str | tuple[str, ...] | None = None,
          rollout_fits: tuple[str, ...] = ("best",), fortify: bool = True) -> np.ndarray:
  """Plays one searched episode (gumbel_scale 0) per buffer order on ``inst``; returns the byte offsets (``SLOW``
  where left slow) of the best episode.

  Args:
    rollout_weight: mixes a heuristic rollout into the leaf values (0: the network's value alone).
    order: a buffer order or a tuple of them, played one after the other; the best result is kept, as XLA's
      ``ChooseBestHeapAlgorithm`` keeps the best of its heaps (time grows linearly with the number of orders).
      None: the order the network was trained with.
    rollout_fits: the leaf rollout's heuristics, best of them (``memmap.agent.search.FITS``).
    fortify: keep the best best-fit / first-fit completion of every root along the episode (``SearchConfig``), so
      the result is never worse than those heuristics in any order played.
  """
  orders = (cfg.order,) if order is None else (order,) if isinstance(order, str) else tuple(order)
  if not orders:
    raise ValueError("solve needs at least one buffer order.")
  graphdef, params = nnx.split(net)
  scfg = cfg.search(False, num_simulations, rollout_weight, rollout_fits, fortify)
  best = None
  for o in orders:
    game_cfg = dataclasses.replace(cfg.game, order=o)
    game = env.make_game(inst, game_cfg)
    envp = jax.tree.map(lambda x: x[None], game.params)
    final, _ = rollout(graphdef, params, envp, jax.random.key(seed), game_cfg, scfg, inst.n, record=False)
    final = jax.tree.map(lambda x: x[0], final)
    score = env.outcome(game.params, final, game_cfg)
    if best is None or score > best[0]:
      best = (score, game.offsets_bytes(final))
  return best[1]
