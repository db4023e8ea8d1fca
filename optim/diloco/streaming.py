"""(Streaming) DiLoCo per replica: inner steps, fragment capture, the outer step on the mean Δ, and the merge.

"DiLoCo: Distributed Low-Communication Training of Language Models" (Douillard et al., arXiv:2311.08105), Alg. 1:
M replicas start from the global params θ_g and each takes H inner steps on its own data; then, with the
pseudo-gradient Δ_m = θ_g − θ_m (θ_g minus the replica's params, the sign torchft #233 fixed),

  Δ̄ = mean_m Δ_m;   θ_g ← OuterOpt(θ_g, Δ̄);   θ_m ← θ_g            (the inner optimizer state is kept)

with outer Nesterov SGD (lr 0.7, momentum 0.9: v ← βv + Δ̄, θ_g ← θ_g − η(Δ̄ + βv), as torch ``SGD(nesterov=True)``
and ``optax.sgd(nesterov=True)``). "Streaming DiLoCo with overlapping communication" (arXiv:2501.18512) syncs one
fragment p of the params at a time on a staggered schedule (:mod:`optim.diloco.fragments`), lets τ inner steps run
while the fragment's Δ is in flight, merges θ_m,p ← α·θ_m,p + (1−α)·θ_g,p (α = 0 overwrites: an exact copy, not
θ + (θ_g − θ), which rounds), and sends Δ in a low-bit wire format (:mod:`optim.diloco.wire`); accumulation and
the outer step stay float32. Each fragment has its own outer optimizer state (torchft PR #230).

:class:`DiLoCo` is the per-replica algorithm, to be called inside ``shard_map`` manual over ``axis_name``: its
:meth:`DiLoCo.step` takes an ``inner_step(local, inner_state) -> (local, inner_state, metrics)`` (any optax
optimizer; gradients reduced within the replica only). It is not an ``optax.GradientTransformation``: a merge
overwrites params (no additive update reproduces a copy bit for bit), and with τ >= 1 the reduction of the in-flight
Δ is issued in the same branch as the inner step so that XLA may run the collective beside that step's compute.
With τ = 0 the reduction sits between the inner step and the merge, on the critical path, as in DiLoCo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.diloco.fragments import FragmentPlan, SyncSchedule
from optim.diloco.wire import FORMATS, WireFormat, quantized_mean

InnerStep = Callable[[Any, Any], tuple[Any, Any, dict[str, jax.Array]]]


class DiLoCoState(NamedTuple):
  """One replica's view of the DiLoCo state (inside ``shard_map``).

  Attributes:
    count: int32 [], inner steps taken.
    local: this replica's params θ_m.
    inner_state: this replica's inner optimizer state.
    global_params: θ_g, bit-identical on every replica (checked at each merge).
    outer_states: per fragment, the outer optimizer's state over that fragment's leaves (a list).
    inflight: f32 [max_rows, W], the in-flight fragment's Δ as rows: this replica's own after the capture, the
      replicas' mean once reduced.
    inflight_fragment: int32 [], the fragment in flight, or −1.
  """

  count: jax.Array
  local: Any
  inner_state: Any
  global_params: Any
  outer_states: tuple[Any, ...]
  inflight: jax.Array
  inflight_fragment: jax.Array


def outer_sgd(learning_rate: float = 0.7, momentum: float = 0.9, nesterov: bool = True
              ) -> optax.GradientTransformation:
  """DiLoCo's outer optimizer on Δ̄ (arXiv:2311.08105 §3: Nesterov momentum, lr 0.7, β 0.9)."""
  return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov and momentum > 0)


@dataclasses.dataclass(frozen=True)
class DiLoCo:
  """The per-replica (Streaming) DiLoCo algorithm (module docstring).

  Attributes:
    outer: the outer optimizer (applied to Δ̄ as its "gradient").
    plan: the fragments and their row layout.
    schedule: H, P and τ.
    alpha: α, the local share kept at a merge (0: replace by the new global params).
    wire: how Δ is sent.
    axis_name: the replica mesh axis; replicas: its size M.
    check_axes: the mesh axes over which every device must hold the same global params after a merge (default:
      the replica axis; add a data axis inside the replicas to check every copy, and every device then reports
      the same verdict).
  """

  outer: optax.GradientTransformation
  plan: FragmentPlan
  schedule: SyncSchedule
  alpha: float = 0.0
  wire: WireFormat = FORMATS["fp32"]
  axis_name: str = "diloco"
  replicas: int = 1
  check_axes: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.plan.fragments != self.schedule.fragments:
      raise ValueError(f"the plan has {self.plan.fragments} fragments, the schedule {self.schedule.fragments}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1] (got {self.alpha})")

  def init(self, params: Any, inner_state: Any) -> DiLoCoState:
    """Every replica starts from ``params`` (global = local) with its inner optimizer state ``inner_state``."""
    leaves = jax.tree.leaves(params)
    return DiLoCoState(
        count=jnp.zeros((), jnp.int32), local=params, inner_state=inner_state,
        global_params=jax.tree.map(jnp.copy, params),
        outer_states=tuple(self.outer.init(self.plan.select(p, leaves)) for p in range(self.plan.fragments)),
        inflight=jnp.zeros((self.plan.max_rows, self.plan.row_size), jnp.float32),
        inflight_fragment=jnp.full((), -1, jnp.int32))

  def step(self, state: DiLoCoState, inner_step: InnerStep) -> tuple[DiLoCoState, dict[str, jax.Array]]:
    """One inner step and whatever the schedule does after it. Returns the new state and the inner step's
    metrics plus ``synced_fragment`` (int32, −1 if none merged) and ``replicas_agree`` (the merged fragment's
    global params and outer state are bit-identical on every replica; True when nothing merged)."""
    schedule, s = self.schedule, state.count + 1

    def train(reduce: bool):
      inflight = self._reduce(state.inflight, schedule.reduced(s)) if reduce else state.inflight
      local, inner_state, metrics = inner_step(state.local, state.inner_state)
      return inflight, local, inner_state, metrics

    if schedule.overlap:
      inflight, local, inner_state, metrics = jax.lax.cond(schedule.reduced(s) >= 0, lambda: train(True),
                                                           lambda: train(False))
    else:
      inflight, local, inner_state, metrics = train(False)
    state = state._replace(count=s, local=local, inner_state=inner_state, inflight=inflight)
    if schedule.overlap:
      state = jax.lax.cond(schedule.captured(s) >= 0, self._capture, lambda st: st, state)
    merged = schedule.merged(s)
    state, agree = jax.lax.cond(merged >= 0, self._merge, lambda st: (st, jnp.bool_(True)), state)
    return state, {**metrics, "synced_fragment": merged, "replicas_agree": agree}

  def _delta_rows(self, p: int, state: DiLoCoState) -> jax.Array:
    """This replica's Δ_p = θ_g,p − θ_m,p as rows f32 [max_rows, W]."""
    glob, local = (self.plan.select(p, jax.tree.leaves(t)) for t in (state.global_params, state.local))
    return self.plan.pack(p, [g.astype(jnp.float32) - m.astype(jnp.float32) for g, m in zip(glob, local)])

  def _mean_rows(self, p: int, rows: jax.Array) -> jax.Array:
    """The replicas' mean of fragment p's rows (only its R_p rows travel)."""
    used = self.plan.rows[p]
    return rows.at[:used].set(quantized_mean(rows[:used], self.wire, self.axis_name, self.replicas))

  def _reduce(self, inflight: jax.Array, fragment: jax.Array) -> jax.Array:
    branches = [lambda rows, p=p: self._mean_rows(p, rows) for p in range(self.plan.fragments)]
    return jax.lax.switch(jnp.maximum(fragment, 0), branches, inflight)

  def _capture(self, state: DiLoCoState) -> DiLoCoState:
    fragment = self.schedule.captured(state.count)
    branches = [lambda st, p=p: self._delta_rows(p, st) for p in range(self.plan.fragments)]
    return state._replace(inflight=jax.lax.switch(fragment, branches, state), inflight_fragment=fragment)

  def _merge(self, state: DiLoCoState) -> tuple[DiLoCoState, jax.Array]:
    branches = [lambda st, p=p: self._merge_fragment(p, st) for p in range(self.plan.fragments)]
    return jax.lax.switch(self.schedule.merged(state.count), branches, state)

  def _merge_fragment(self, p: int, state: DiLoCoState) -> tuple[DiLoCoState, jax.Array]:
    """Outer step on fragment p with the replicas' mean Δ, then the α-merge into the local params."""
    plan = self.plan
    rows = state.inflight if self.schedule.overlap else self._mean_rows(p, self._delta_rows(p, state))
    delta = plan.unpack(p, rows)
    glob_leaves, local_leaves = jax.tree.leaves(state.global_params), jax.tree.leaves(state.local)
    glob = plan.select(p, glob_leaves)
    updates, outer_state = self.outer.update(delta, state.outer_states[p], glob)
    glob = optax.apply_updates(glob, updates)
    local = [self._mix(m, g) for m, g in zip(plan.select(p, local_leaves), glob, strict=True)]
    treedef = jax.tree.structure(state.global_params)
    outer_states = tuple(outer_state if q == p else s for q, s in enumerate(state.outer_states))
    new = state._replace(
        global_params=jax.tree.unflatten(treedef, plan.replace(p, glob_leaves, glob)),
        local=jax.tree.unflatten(treedef, plan.replace(p, local_leaves, local)),
        outer_states=outer_states, inflight_fragment=jnp.full((), -1, jnp.int32))
    return new, replicas_agree((glob, outer_state), self.check_axes or self.axis_name)

  def _mix(self, local: jax.Array, glob: jax.Array) -> jax.Array:
    if self.alpha == 0.0:
      return glob.astype(local.dtype)
    if self.alpha == 1.0:
      return local
    mixed = self.alpha * local.astype(jnp.float32) + (1 - self.alpha) * glob.astype(jnp.float32)
    return mixed.astype(local.dtype)


def fingerprint(tree: Any) -> jax.Array:
  """int32 [leaves]: per leaf, Σ_i bytes_i·(2i+1) mod 2³² over its bytes (as uint32 words for 4-byte dtypes).

  Any change of one word changes the sum (an odd weight is invertible mod 2³²), so replicas whose fingerprints agree
  hold the same bits up to a multi-word collision; comparing fingerprints costs one tiny collective per check.
  """
  def one(leaf):
    leaf = jnp.asarray(leaf)
    if leaf.dtype == jnp.bool_:
      leaf = leaf.astype(jnp.uint8)
    words = (jax.lax.bitcast_convert_type(leaf, jnp.uint32) if leaf.dtype.itemsize == 4 else
             jax.lax.bitcast_convert_type(leaf, jnp.uint8).astype(jnp.uint32)).reshape(-1)
    weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jax.lax.bitcast_convert_type(jnp.sum(words * weights, dtype=jnp.uint32), jnp.int32)

  leaves = jax.tree.leaves(tree)
  return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.int32)


def replicas_agree(tree: Any, axis_name: str | tuple[str, ...]) -> jax.Array:
  """bool []: ``tree`` has the same :func:`fingerprint` on every device of the mesh axes ``axis_name`` (inside
  shard_map); the same verdict on each of them."""
  prints = fingerprint(tree)
  return jnp.all(jax.lax.pmax(prints, axis_name) == jax.lax.pmin(prints, axis_name))
