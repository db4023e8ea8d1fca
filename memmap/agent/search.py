"""Gumbel MuZero search over the true mallocGame (mctx), and whole-episode rollouts.

Danihelka et al., "Policy improvement by planning with Gumbel", ICLR 2022 (mctx ``gumbel_muzero_policy``). The
model is the game itself: ``recurrent_fn`` calls ``env.step``, sets discount 0 on the transition into a terminal
state (whose value is 0; terminal states are absorbing), and masks illegal actions with -1e9 logits at every depth
(``invalid_actions`` covers only the root). mctx threads ``params = (network state, batched EnvParams)`` through its
loops, so one compiled search serves a batch of different instances.

Fortified rollout (Bertsekas, Tsitsiklis & Wu, "Rollout algorithms for combinatorial optimization", J. Heuristics
1997): with ``fortify``, every root state of the played episode is also finished by the base heuristics (best fit and
first fit) and the best complete episode seen is kept; the episode returned is the better of the searched one and
that incumbent, so it is never worse than either heuristic in the order played (at t = 0 the completions *are* the
heuristics).

Shapes: B instances padded to N buffers; actions A = K + 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import mctx
from flax import nnx

from memmap import env

FITS = ("best", "first")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """``rollout_weight`` w mixes a heuristic rollout into leaf values: ``(1 - w) * v_net + w * max over
  rollout_fits`` of the completion's return; ``fortify`` keeps the best heuristic completion along the episode."""
  num_simulations: int = 32
  max_num_considered_actions: int = 16
  gumbel_scale: float = 1.0
  rollout_weight: float = 0.0
  rollout_fits: tuple[str, ...] = ("best",)
  fortify: bool = False

  def __post_init__(self):
    if self.num_simulations < 1 or self.max_num_considered_actions < 1:
      raise ValueError(f"SearchConfig needs num_simulations >= 1 and max_num_considered_actions >= 1: {self}.")
    if not 0.0 <= self.rollout_weight <= 1.0:
      raise ValueError(f"SearchConfig.rollout_weight must be in [0, 1], got {self.rollout_weight}.")
    if not self.rollout_fits or set(self.rollout_fits) - set(FITS):
      raise ValueError(f"SearchConfig.rollout_fits={self.rollout_fits!r}: give one or more of {FITS}.")


def complete(p: env.EnvParams, s: env.State, cfg: env.GameConfig, fit: str = "best") -> tuple[env.State, jax.Array]:
  """Finishes the episode from ``s`` with a greedy heuristic; returns (terminal state, return from ``s``).

  ``best`` plays slot 0 (XLA's best fit); ``first`` plays the legal candidate with the lowest offset (first fit),
  ranking all N + 1 candidates since the lowest offset may fall outside the K best-fit-ranked slots.
  """
  if fit not in FITS:
    raise ValueError(f"unknown fit {fit!r}; allowed: {', '.join(FITS)}.")
  full = dataclasses.replace(cfg, num_slots=p.size.shape[0] + 1) if fit == "first" else cfg

  def body(carry):
    st, total = carry
    action = jnp.int32(0)
    if fit == "first":
      off, _, ok = env.candidates(p, st, full.num_slots)
      action = jnp.argmin(jnp.where(ok, off, jnp.iinfo(jnp.int32).max)).astype(jnp.int32)
    nxt, r, _, _ = env.step(p, st, action, full)
    return nxt, total + r

  return jax.lax.while_loop(lambda c: ~c[0].terminal, body, (s, jnp.float32(0.0)))


def keep_better(envp: env.EnvParams, a: env.State, b: env.State, cfg: env.GameConfig) -> env.State:
  """Per instance of the batch, ``a`` where it is terminal and strictly better than ``b`` (or ``b`` is not
  terminal), else ``b``."""
  score = jax.vmap(lambda p, s: env.outcome(p, s, cfg))
  take = a.terminal & (~b.terminal | (score(envp, a) > score(envp, b)))
  return jax.tree.map(lambda x, y: jnp.where(take.reshape(take.shape + (1,) * (x.ndim - 1)), x, y), a, b)


def _evaluate(graphdef, net_state, envp, states, cfg: env.GameConfig, scfg: SearchConfig):
  """Observations, masked prior logits and leaf values (net value mixed with heuristic rollouts, AlphaGo-style)."""
  obs = jax.vmap(lambda p, s: env.observe(p, s, cfg))(envp, states)
  logits, value = nnx.merge(graphdef, net_state)(obs)
  if scfg.rollout_weight > 0:
    rollout = jnp.max(jnp.stack([jax.vmap(lambda p, s: complete(p, s, cfg, fit)[1])(envp, states)
                                 for fit in scfg.rollout_fits]), axis=0)
    value = (1.0 - scfg.rollout_weight) * value + scfg.rollout_weight * rollout
  return obs, logits, jnp.where(states.terminal, 0.0, value)


def search(graphdef, net_state, envp: env.EnvParams, states: env.State, rng: jax.Array, cfg: env.GameConfig,
           scfg: SearchConfig):
  """One Gumbel MuZero decision per instance; returns (mctx.PolicyOutput, observations of the roots)."""
  obs, logits, value = _evaluate(graphdef, net_state, envp, states, cfg, scfg)

  def recurrent_fn(params, _, action, emb):
    net, ep = params
    nxt, reward, _, _ = jax.vmap(lambda p, s, a: env.step(p, s, a, cfg))(ep, emb, action)
    _, lg, v = _evaluate(graphdef, net, ep, nxt, cfg, scfg)
    discount = jnp.where(nxt.terminal, 0.0, 1.0)
    return mctx.RecurrentFnOutput(reward=reward, discount=discount, prior_logits=lg, value=v), nxt

  root = mctx.RootFnOutput(prior_logits=logits, value=value, embedding=states)
  out = mctx.gumbel_muzero_policy(
      params=(net_state, envp), rng_key=rng, root=root, recurrent_fn=recurrent_fn,
      num_simulations=scfg.num_simulations, invalid_actions=~obs["legal"],
      max_num_considered_actions=scfg.max_num_considered_actions, gumbel_scale=scfg.gumbel_scale)
  return out, obs


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "scfg", "num_steps", "record"))
def rollout(graphdef, net_state, envp: env.EnvParams, rng: jax.Array, cfg: env.GameConfig, scfg: SearchConfig,
            num_steps: int, record: bool = True):
  """Plays ``num_steps`` searched moves on every instance of the batch.

  Returns:
    (final states, trajectory) where the trajectory holds, per step [num_steps, B, ...], the root observation (when
    ``record``), the search's ``action_weights``, the reward and whether the step was live (before terminal). With
    ``scfg.fortify`` a final state is the better of the searched episode and the best heuristic completion of any
    root along it (then it need not extend the trajectory).
  """
  def body(carry, key):
    states, best = carry
    if scfg.fortify:
      for fit in FITS:
        done = jax.vmap(lambda p, s: complete(p, s, cfg, fit)[0])(envp, states)
        best = keep_better(envp, done, best, cfg)
    out, obs = search(graphdef, net_state, envp, states, key, cfg, scfg)
    nxt, reward, _, _ = jax.vmap(lambda p, s, a: env.step(p, s, a, cfg))(envp, states, out.action)
    rec = {"weights": out.action_weights, "reward": reward, "live": ~states.terminal}
    if record:
      rec["obs"] = obs
    return (nxt, best), rec

  states = jax.vmap(env.reset)(envp)
  (final, best), traj = jax.lax.scan(body, (states, states), jax.random.split(rng, num_steps))
  return (keep_better(envp, best, final, cfg) if scfg.fortify else final), traj
