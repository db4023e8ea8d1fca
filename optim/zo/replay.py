"""Rebuilding a ZO run from its initial parameters and its ledger: the header, the initial snapshot, the replay.

Just One Byte (Zelikman et al., arXiv 2306.10015): a round is determined by (t, lr, active workers, codes) and the
run's constants, so initial weights + the rounds = the trained weights, bit for bit, on the backend that trained
them (same JAX/XLA version, PRNG implementation and ``jax_threefry_partitionable``, all recorded in the header). A
worker joining at round k starts from a checkpoint of round k and replays ``rounds[k:]`` (:func:`replay`).

The initial snapshot is an orbax checkpoint (:class:`research.checkpoint.Checkpointer`) of ``{"params": θ₀}`` at
``<workdir>/zo/initial``, its meta holding θ₀'s ``param_sha256`` and the ledger header.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from optim.zo.codec import get_codec
from optim.zo.digest import tree_digest_reference
from optim.zo.ledger import LedgerError, RoundRecord
from optim.zo.rounds import RoundSpec, apply_round
from research.checkpoint import Checkpointer, abstract_like
from research.optimizers import decay_mask

FORMAT = 1


def ledger_header(spec: RoundSpec, num_workers: int, seed: int) -> dict[str, Any]:
  """The constants of a run's rounds and of the platform its bits depend on."""
  return {"format": FORMAT, "num_workers": num_workers, "seed": seed, **spec._asdict(),
          "prng": str(jax.config.jax_default_prng_impl),
          "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
          "jax": jax.__version__, "backend": jax.default_backend()}


def spec_from_header(header: dict[str, Any]) -> RoundSpec:
  return RoundSpec(**{k: header[k] for k in RoundSpec._fields})


def platform_differences(header: dict[str, Any]) -> list[str]:
  """What differs between the platform that wrote ``header`` and this one (bit-identity needs none)."""
  here = ledger_header(spec_from_header(header), header["num_workers"], header["seed"])
  return [f"{k} {header.get(k)} (now {here[k]})" for k in ("prng", "threefry_partitionable", "jax", "backend")
          if header.get(k) != here[k]]


def initial_dir(workdir: str | Path) -> Path:
  return Path(workdir) / "zo" / "initial"


def initial_exists(workdir: str | Path) -> bool:
  directory = initial_dir(workdir)
  return directory.is_dir() and Checkpointer(directory, keep=1, async_save=False).latest_step() == 0


def save_initial(workdir: str | Path, params: Any, header: dict[str, Any]) -> None:
  """Save θ₀ (host or device arrays) as the run's initial snapshot (every process calls this: orbax saves
  collectively)."""
  with Checkpointer(initial_dir(workdir), keep=1, async_save=False) as checkpointer:
    checkpointer.save(0, {"params": params}, {"param_sha256": tree_digest_reference(params), "header": header})


def load_initial(workdir: str | Path, abstract_params: Any) -> tuple[Any, dict[str, Any]]:
  """(θ₀, meta) of ``workdir``; ``abstract_params`` gives the tree, shapes and dtypes. Checks θ₀'s hash."""
  if not initial_exists(workdir):
    raise LedgerError(f"{initial_dir(workdir)} holds no initial parameters")
  with Checkpointer(initial_dir(workdir), keep=1, async_save=False) as checkpointer:
    state, meta = checkpointer.restore(0, abstract_like({"params": abstract_params}))
  if tree_digest_reference(state["params"]) != meta["param_sha256"]:
    raise LedgerError(f"the initial parameters in {initial_dir(workdir)} do not match their recorded hash")
  return state["params"], meta


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def _apply(params: Any, codes: jax.Array, active: jax.Array, lr: jax.Array, step: jax.Array, root: jax.Array,
           spec: RoundSpec) -> Any:
  values, _ = get_codec(spec.codec).decode(codes)
  return apply_round(params, values, active, lr, root, step, spec, decay_mask(params))


def replay(params: Any, rounds: Iterable[RoundRecord], header: dict[str, Any], *,
           progress: Callable[[int], None] | None = None) -> Any:
  """θ after applying ``rounds`` (consecutive, starting at the round ``params`` is at) to ``params``.

  Args:
    params: θ_k (host or device arrays; they are donated).
    rounds: the ledger's rounds k, k + 1, ...
    header: the ledger's header.
    progress: called with each round index after it is applied.
  """
  spec, root, workers = spec_from_header(header), jax.random.key(header["seed"]), header["num_workers"]
  params = jax.device_put(params)
  expected = None
  for record in rounds:
    if expected is not None and record.step != expected:
      raise LedgerError(f"the ledger skips from round {expected - 1} to {record.step}")
    codes, active = record.full(workers)
    params = _apply(params, codes, active, np.float32(record.lr), np.int32(record.step), root, spec)
    expected = record.step + 1
    if progress is not None:
      progress(record.step)
  return params
