"""Gumbel MuZero search over the true mallocGame (mctx), and whole-episode rollouts.

Danihelka et al., "Policy improvement by planning with Gumbel", ICLR 2022 (mctx ``gumbel_muzero_policy``). The
model is the game itself: ``recurrent_fn`` calls ``env.step``, sets discount 0 on the transition into a terminal
state (whose value is 0; terminal states are absorbing), and masks illegal actions with -1e9 logits at every depth
(``invalid_actions`` covers only the root). mctx threads ``params = (network state, batched EnvParams)`` through its
loops, so one compiled search serves a batch of different instances.

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


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  num_simulations: int = 32
  max_num_considered_actions: int = 16
  gumbel_scale: float = 1.0
  rollout_weight: float = 0.0

  def __post_init__(self):
    if self.num_simulations < 1 or self.max_num_considered_actions < 1:
      raise ValueError(f"SearchConfig needs num_simulations >= 1 and max_num_considered_actions >= 1: {self}.")
    if not 0.0 <= self.rollout_weight <= 1.0:
      raise ValueError(f"SearchConfig.rollout_weight must be in [0, 1], got {self.rollout_weight}.")


def best_fit_rollout(p: env.EnvParams, s: env.State, cfg: env.GameConfig) -> jax.Array:
  """The return of finishing the episode from ``s`` with slot 0 (best fit) at every step: a leaf value estimate."""
  def body(carry):
    st, total = carry
    nxt, r, _, _ = env.step(p, st, jnp.int32(0), cfg)
    return nxt, total + r

  return jax.lax.while_loop(lambda c: ~c[0].terminal, body, (s, jnp.float32(0.0)))[1]


def _evaluate(graphdef, net_state, envp, states, cfg: env.GameConfig, scfg: SearchConfig):
  """Observations, masked prior logits and leaf values (net value mixed with a best-fit rollout, AlphaGo-style)."""
  obs = jax.vmap(lambda p, s: env.observe(p, s, cfg))(envp, states)
  logits, value = nnx.merge(graphdef, net_state)(obs)
  if scfg.rollout_weight > 0:
    rollout = jax.vmap(lambda p, s: best_fit_rollout(p, s, cfg))(envp, states)
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
    ``record``), the search's ``action_weights``, the reward and whether the step was live (before terminal).
  """
  def body(states, key):
    out, obs = search(graphdef, net_state, envp, states, key, cfg, scfg)
    nxt, reward, _, _ = jax.vmap(lambda p, s, a: env.step(p, s, a, cfg))(envp, states, out.action)
    rec = {"weights": out.action_weights, "reward": reward, "live": ~states.terminal}
    if record:
      rec["obs"] = obs
    return nxt, rec

  states = jax.vmap(env.reset)(envp)
  return jax.lax.scan(body, states, jax.random.split(rng, num_steps))
