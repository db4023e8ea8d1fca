"""The mallocGame: place buffers one at a time on the time x address plane (pure, jittable, vmappable).

Wang et al., "Optimizing Memory Mapping Using Deep Reinforcement Learning", arXiv 2305.07440. Buffers come in a fixed
order (``memmap.orders``); an action puts the current buffer at one of ``K`` candidate offsets or (``benefit``
objective) leaves it in slow memory, which is always legal, so every episode is exactly ``n_valid`` steps.

Candidates (spec "candidates" mode): offset 0 and the aligned top edges ``o_j + z_j`` of placed, time-overlapping
buffers, kept only when legal, de-duplicated and ranked by (gap asc, offset asc), where gap = (the next placed
overlapping offset above, or the capacity) - candidate. Slot 0 is therefore XLA's best fit.

Objectives and rewards:
  height: no slow memory, capacity = sum of sizes; ``r_t = -(H_t - H_{t-1}) / L`` so the return is ``-H_final / L``
    (L = the load bound; MiniMalloc instances are judged by height).
  benefit: capacity C; ``r_t`` = the placed buffer's benefit ``w_i`` (additive reward, e.g. area or access-time
    saved), or with ``exact`` the drop in the modelled program time ``(T_{t-1} - T_t) / T_slow`` where
    ``T = sum_k mult_k * max(c_k, mem_k)`` (``memmap.cost_model``).
An illegal action acts as slow memory (benefit) or as slot 0 (height) and sets ``info["illegal"]``; a terminal state
is absorbing (reward 0, same state).

Shapes: N = padded buffer count, K = num_slots, P = program ops (1 when there is no program), G = grid cells.

Size limit: the game keeps a dense ``[N, N]`` time-overlap matrix and a step compares every candidate with every
buffer (``[N + 1, N]``), which is what makes it a fixed-shape jittable function. ``make_game`` therefore refuses
instances above ``MAX_BUFFERS`` buffers (4,096: a 16 MiB matrix, ~17 M comparisons per step) with one line
naming the methods that scale (the heuristics, ``exact`` and the network-free ``agent`` use sweep-line structures).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memmap.cost_model import Program
from memmap.instance import MAX_DENSE, SLOW, Instance, compress_times, load_bound, time_overlap
from memmap.orders import ORDERS, buffer_order

UNDECIDED, SLOW_STATE = -1, -2
MAX_BUFFERS = MAX_DENSE
OBJECTIVES = ("height", "benefit")
REWARDS = ("additive", "exact")
LOOKAHEAD = 8


@dataclasses.dataclass(frozen=True)
class GameConfig:
  """Static game settings (hashable: they select the compiled program)."""
  objective: str = "height"
  reward: str = "additive"
  order: str = "spatial"
  num_slots: int = 32
  grid: int = 32

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"GameConfig.objective={self.objective!r}; allowed: {OBJECTIVES}.")
    if self.reward not in REWARDS:
      raise ValueError(f"GameConfig.reward={self.reward!r}; allowed: {REWARDS}.")
    if self.order not in ORDERS:
      raise ValueError(f"GameConfig.order={self.order!r}; allowed: {ORDERS}.")
    if self.reward == "exact" and self.objective != "benefit":
      raise ValueError("GameConfig.reward='exact' needs objective='benefit' (height has its own reward).")
    if self.num_slots < 1 or self.grid < 4:
      raise ValueError(f"GameConfig.num_slots ({self.num_slots}) must be >= 1 and grid ({self.grid}) >= 4.")

  @property
  def num_actions(self) -> int:
    return self.num_slots + 1


class EnvParams(NamedTuple):
  """One instance in buffer order, sizes in units of ``unit`` bytes, times rank-compressed (all int32 / float32)."""
  lower: jax.Array      # int32[N]
  upper: jax.Array      # int32[N]
  size: jax.Array       # int32[N]
  valid: jax.Array      # bool[N]
  overlap: jax.Array    # bool[N, N]
  weight: jax.Array     # float32[N], additive reward for placing each buffer
  saved: jax.Array      # float32[P, N], per-op time saved by each buffer in fast memory
  compute: jax.Array    # float32[P]
  mult: jax.Array       # float32[P]
  mem_slow: jax.Array   # float32[P], per-op memory time with everything slow
  t_slow: jax.Array     # float32[]
  n_valid: jax.Array    # int32[]
  capacity: jax.Array   # int32[]
  alignment: jax.Array  # int32[]
  load: jax.Array       # float32[], L in units
  t_max: jax.Array      # float32[], number of compressed time points
  addr_scale: jax.Array  # float32[], address range of the observation grid


class State(NamedTuple):
  cursor: jax.Array    # int32[]
  offset: jax.Array    # int32[N], UNDECIDED / SLOW_STATE / offset in units
  height: jax.Array    # int32[]
  mem: jax.Array       # float32[P]
  terminal: jax.Array  # bool[]


@dataclasses.dataclass(frozen=True, eq=False)
class Game:
  """Host-side handle: the jax params plus what maps them back to the instance (order, byte unit)."""
  params: EnvParams
  order: np.ndarray
  unit: int
  inst: Instance

  def offsets_bytes(self, state: State) -> np.ndarray:
    """int64[n] instance-ordered byte offsets (``SLOW`` for slow memory) from a final state."""
    off = np.asarray(state.offset)[: self.inst.n].astype(np.int64)
    out = np.full(self.inst.n, SLOW, dtype=np.int64)
    placed = off >= 0
    out[self.order[placed]] = off[placed] * self.unit
    return out


def make_game(inst: Instance, cfg: GameConfig, n_max: int | None = None, program: Program | None = None) -> Game:
  """Builds the padded jax arrays for ``inst`` (padding buffers are invalid and never presented)."""
  n = inst.n
  n_max = n if n_max is None else n_max
  if max(n, n_max) > MAX_BUFFERS:
    raise ValueError(f"the jittable mallocGame holds an N x N overlap matrix and takes at most {MAX_BUFFERS} "
                     f"buffers (got {max(n, n_max)}); use a heuristic, --method exact or the network-free agent.")
  if n_max < n:
    raise ValueError(f"n_max={n_max} is smaller than the instance's {n} buffers.")
  if cfg.reward == "exact" and program is None:
    raise ValueError("reward='exact' needs a Program (per-op accesses); MiniMalloc files have none.")
  order = buffer_order(inst, cfg.order)
  comp = compress_times(inst)
  unit = math.gcd(*inst.size.tolist(), inst.alignment, inst.capacity) if n else 1
  size = inst.size // unit
  total = int(size.sum())
  cap = total if cfg.objective == "height" else inst.capacity // unit
  if max(total, cap) >= 2**30:
    raise ValueError(f"instance too large for int32 offsets: {total} units of {unit} bytes.")
  load = max(load_bound(inst) // unit, 1)

  def pad(x, fill=0):
    x = np.asarray(x)
    return np.concatenate([x[order], np.full((n_max - n,) + x.shape[1:], fill, x.dtype)])

  ov = np.zeros((n_max, n_max), bool)
  ov[:n, :n] = time_overlap(inst)[np.ix_(order, order)]
  if program is not None:
    saved = program.saved_per_buffer()
    weight = (program.mult[:, None] * saved).sum(0) / program.t_slow
    prog = (np.pad(saved[:, order], ((0, 0), (0, n_max - n))), program.compute, program.mult,
            program.mem_slow, program.t_slow)
  else:
    w = inst.benefit / max(inst.benefit.sum(), 1e-30)
    weight = w
    prog = (np.zeros((1, n_max)), np.zeros(1), np.zeros(1), np.zeros(1), 1.0)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  params = EnvParams(
      lower=jnp.asarray(pad(comp.lower), jnp.int32), upper=jnp.asarray(pad(comp.upper, 1), jnp.int32),
      size=jnp.asarray(pad(size, 1), jnp.int32), valid=jnp.asarray(pad(np.ones(n, bool), False)),
      overlap=jnp.asarray(ov), weight=f32(pad(weight)), saved=f32(prog[0]), compute=f32(prog[1]), mult=f32(prog[2]),
      mem_slow=f32(prog[3]), t_slow=f32(prog[4]), n_valid=jnp.int32(n), capacity=jnp.int32(cap),
      alignment=jnp.int32(max(inst.alignment // unit, 1)), load=f32(load),
      t_max=f32(max(int(comp.upper.max()) if n else 1, 1)),
      addr_scale=f32(cap if cfg.objective == "benefit" else 2 * load))
  return Game(params, order, unit, inst)


def reset(p: EnvParams) -> State:
  return State(cursor=jnp.int32(0), offset=jnp.full(p.size.shape, UNDECIDED, jnp.int32), height=jnp.int32(0),
               mem=p.mem_slow, terminal=p.n_valid <= 0)


def candidates(p: EnvParams, s: State, num_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(offset int32[K], gap int32[K], legal bool[K]) for the current buffer, ranked best fit first."""
  k = jnp.minimum(s.cursor, p.size.shape[0] - 1)
  z = p.size[k]
  placed = s.offset >= 0
  nb = p.overlap[k] & placed
  top = s.offset + p.size
  a = p.alignment
  cand = jnp.concatenate([jnp.zeros(1, jnp.int32), (top + a - 1) // a * a])
  ok = jnp.concatenate([jnp.ones(1, bool), nb])
  below = (cand[:, None] + z <= s.offset[None, :]) | (top[None, :] <= cand[:, None])
  ok = ok & (cand + z <= p.capacity) & jnp.all(below | ~nb[None, :], axis=1)
  m = cand.shape[0]
  dup = (cand[:, None] == cand[None, :]) & ok[None, :] & (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])
  ok = ok & ~jnp.any(dup, axis=1)
  above = jnp.where(nb[None, :] & (s.offset[None, :] >= cand[:, None]), s.offset[None, :], p.capacity)
  gap = jnp.min(above, axis=1) - cand
  _, gap_s, off_s, ok_s = jax.lax.sort((~ok, jnp.where(ok, gap, 0), cand, ok), num_keys=3)
  pad = max(num_slots - m, 0)
  take = lambda x, fill: jnp.concatenate([x, jnp.full((pad,), fill, x.dtype)])[:num_slots]
  return take(off_s, 0), take(gap_s, 0), take(ok_s, False)


def legal_mask(p: EnvParams, s: State, cfg: GameConfig) -> jax.Array:
  """bool[K+1]: legal slots, then SLOW (legal in the benefit game). A terminal state allows only slot 0."""
  _, _, ok = candidates(p, s, cfg.num_slots)
  mask = jnp.concatenate([ok, jnp.array([cfg.objective == "benefit"])])
  return jnp.where(s.terminal, jnp.arange(cfg.num_actions) == 0, mask)


def program_time(p: EnvParams, mem: jax.Array) -> jax.Array:
  return jnp.sum(p.mult * jnp.maximum(p.compute, mem))


def step(p: EnvParams, s: State, action: jax.Array, cfg: GameConfig) -> tuple[State, jax.Array, jax.Array, dict]:
  """Applies ``action`` (int32 in [0, K]) and returns (state', reward, done, info)."""
  off, _, ok = candidates(p, s, cfg.num_slots)
  k = jnp.minimum(s.cursor, p.size.shape[0] - 1)
  is_slot = action < cfg.num_slots
  slot = jnp.clip(action, 0, cfg.num_slots - 1)
  legal = jnp.where(is_slot, ok[slot], cfg.objective == "benefit")
  if cfg.objective == "height":
    slot = jnp.where(legal, slot, 0)
    place = jnp.bool_(True)
  else:
    place = legal & is_slot
  new_off = jnp.where(place, off[slot], SLOW_STATE)
  height = jnp.where(place, jnp.maximum(s.height, new_off + p.size[k]), s.height)
  mem = s.mem - jnp.where(place, p.saved[:, k], 0.0)
  if cfg.objective == "height":
    reward = -(height - s.height).astype(jnp.float32) / p.load
  elif cfg.reward == "exact":
    reward = (program_time(p, s.mem) - program_time(p, mem)) / p.t_slow
  else:
    reward = jnp.where(place, p.weight[k], 0.0)
  nxt = State(cursor=s.cursor + 1, offset=s.offset.at[k].set(new_off), height=height, mem=mem,
              terminal=s.cursor + 1 >= p.n_valid)
  nxt = jax.tree.map(lambda a, b: jnp.where(s.terminal, a, b), s, nxt)
  reward = jnp.where(s.terminal, 0.0, reward)
  return nxt, reward, nxt.terminal, {"illegal": ~legal & ~s.terminal}


def outcome(p: EnvParams, s: State, cfg: GameConfig) -> jax.Array:
  """What an episode maximises, read exactly off a terminal state (so episodes compare without float drift):
  ``-height`` (int32) in the height game, the benefit placed (additive) or ``-T`` (exact) in the benefit game."""
  if cfg.objective == "height":
    return -s.height
  if cfg.reward == "exact":
    return -program_time(p, s.mem)
  return jnp.sum(jnp.where(s.offset >= 0, p.weight, 0.0))


def observe(p: EnvParams, s: State, cfg: GameConfig) -> dict[str, jax.Array]:
  """Fixed-size encoding: ``grid`` [G, G, 2] (occupancy of time x address, current buffer's time mask),
  ``feats`` [F] (current and next buffers, progress), ``slots`` [K, 6] (per candidate), ``legal`` [K+1]."""
  g = cfg.grid
  edges = jnp.arange(g + 1, dtype=jnp.float32)
  tcell = p.t_max / g
  t0, t1 = edges[:-1] * tcell, edges[1:] * tcell
  lo, up = p.lower.astype(jnp.float32), p.upper.astype(jnp.float32)
  tfrac = jnp.clip(jnp.minimum(up[:, None], t1) - jnp.maximum(lo[:, None], t0), 0, None) / tcell   # [N, G]
  acell = p.addr_scale / g
  a0, a1 = edges[:-1] * acell, edges[1:] * acell
  o = s.offset.astype(jnp.float32)
  afrac = jnp.clip(jnp.minimum(o[:, None] + p.size[:, None], a1) - jnp.maximum(o[:, None], a0), 0, None) / acell
  afrac = afrac * (s.offset >= 0)[:, None]
  occ = tfrac.T @ afrac                                                                              # [G, G]
  k = jnp.minimum(s.cursor, p.size.shape[0] - 1)
  grid = jnp.stack([occ, jnp.broadcast_to(tfrac[k][:, None], (g, g))], axis=-1)
  idx = jnp.minimum(s.cursor + jnp.arange(LOOKAHEAD + 1), p.size.shape[0] - 1)
  present = (s.cursor + jnp.arange(LOOKAHEAD + 1) < p.n_valid).astype(jnp.float32)
  z = p.size.astype(jnp.float32)
  nxt = jnp.stack([z[idx] / p.addr_scale, lo[idx] / p.t_max, up[idx] / p.t_max, p.weight[idx] * p.n_valid, present],
                  -1) * present[:, None]
  h = s.height.astype(jnp.float32)
  progress = jnp.stack([s.cursor / jnp.maximum(p.n_valid, 1), h / p.addr_scale, p.load / p.addr_scale,
                        p.capacity / (p.addr_scale * 4.0), program_time(p, s.mem) / p.t_slow])
  feats = jnp.concatenate([nxt.reshape(-1), progress])
  off, gap, ok = candidates(p, s, cfg.num_slots)
  offf, gapf = off.astype(jnp.float32), gap.astype(jnp.float32)
  rise = jnp.maximum(offf + z[k] - h, 0.0)
  slots = jnp.stack([offf / p.addr_scale, jnp.minimum(gapf, p.addr_scale) / p.addr_scale,
                     jnp.minimum(gapf - z[k], p.addr_scale) / p.addr_scale, rise / p.addr_scale,
                     ok.astype(jnp.float32), jnp.arange(cfg.num_slots) / cfg.num_slots], -1) * ok[:, None]
  return {"grid": grid, "feats": feats, "slots": slots, "legal": legal_mask(p, s, cfg)}


def num_features() -> int:
  return (LOOKAHEAD + 1) * 5 + 5


_step_jit = jax.jit(step, static_argnames="cfg")


def play(game: Game, cfg: GameConfig, actions, jit: bool = True) -> tuple[State, float, bool]:
  """Replays host-side actions; returns the final state, the return and whether any move was illegal."""
  s, total, illegal = reset(game.params), 0.0, False
  fn = _step_jit if jit else step
  for a in actions:
    s, r, _, info = fn(game.params, s, jnp.int32(a), cfg=cfg)
    total += float(r)
    illegal |= bool(info["illegal"])
  return s, total, illegal
