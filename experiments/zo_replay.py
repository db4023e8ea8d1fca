"""Rebuild a ZO run's parameters from its initial snapshot and its ledger, and print their ``param_sha256``.

``python -m experiments.zo_replay --workdir DIR`` reads ``DIR/config.json``, the initial parameters
``DIR/zo/initial`` and the rounds of ``DIR/zo/ledger.bin`` written by ``--regime zo_spsa`` (:mod:`optim.zo.regime`),
applies every round on one device and prints the parameters' ``param_sha256``: the same as ``summary.json``'s when
replayed on the backend that trained (Just One Byte, Zelikman et al., arXiv 2306.10015: the ledger is the run's
checkpoint). ``--from-checkpoint STEP`` starts instead from the run's checkpoint at STEP and replays the rounds
after it, as a worker joining at that step would. Exits with status 1 if the replay disagrees with the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

import experiments.configs  # noqa: F401  (registers memlab's plugins, the zo_spsa regime among them)
from optim.zo.digest import tree_digest_reference
from optim.zo.ledger import LedgerError, read_ledger
from optim.zo.replay import load_initial, platform_differences, replay
from research.checkpoint import Checkpointer, CheckpointError
from research.cli import fail
from research.config import ConfigError, from_json
from research.train import TrainConfig, TrainError, build_model


def replay_workdir(workdir: Path, from_checkpoint: int | None = None, log=print) -> dict:
  """Replay ``workdir``'s ledger (module docstring); returns {"param_sha256", "rounds", "start_round", ...}."""
  cfg = from_json(TrainConfig, json.loads((workdir / "config.json").read_text()))
  if cfg.regime != "zo_spsa":
    raise TrainError(f"{workdir} holds a {cfg.regime} run, not a zo_spsa one")
  abstract = build_model(cfg, abstract=True).params
  ledger = read_ledger(workdir / "zo" / "ledger.bin")
  if ledger.torn is not None:
    log(f"ledger: ignored a torn last record ({ledger.torn.size} bytes)")
  if differences := platform_differences(ledger.header):
    log(f"warning: the run was trained on another platform ({'; '.join(differences)}): the replay may differ in "
        "the last bits")
  if from_checkpoint is None:
    params, _ = load_initial(workdir, abstract)
    start = 0
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    scalar = jax.ShapeDtypeStruct((), np.int32, sharding=device)
    target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract),
              "round": scalar, "nonfinite": scalar}
    with Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints) as checkpointer:
      state, _ = checkpointer.restore(from_checkpoint, target)
    params, start = state["params"], int(state["round"])
  rounds = [r for r in ledger.rounds if r.step >= start]
  began = time.perf_counter()
  params = replay(params, rounds, ledger.header)
  digest = tree_digest_reference(jax.device_get(params))
  result = {"param_sha256": digest, "start_round": start, "rounds": len(rounds),
            "ledger_bytes": (workdir / "zo" / "ledger.bin").stat().st_size,
            "seconds": time.perf_counter() - began}
  summary_path = workdir / "summary.json"
  if summary_path.exists() and rounds and rounds[-1].step + 1 == cfg.steps:
    result["summary_param_sha256"] = json.loads(summary_path.read_text()).get("param_sha256")
  return result


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m experiments.zo_replay", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="folder of a --regime zo_spsa run")
  parser.add_argument("--from-checkpoint", type=int, default=None, metavar="STEP",
                      help="start from the run's checkpoint at STEP instead of its initial parameters")
  args = parser.parse_args(argv)
  workdir = Path(args.workdir)
  try:
    result = replay_workdir(workdir, args.from_checkpoint)
  except (OSError, ConfigError, TrainError, LedgerError, CheckpointError, KeyError) as e:
    fail(f"{workdir}: {e}")
  start = "the initial parameters" if args.from_checkpoint is None else f"checkpoint {args.from_checkpoint}"
  print(f"replayed {result['rounds']} rounds from {start} (round {result['start_round']}; ledger "
        f"{result['ledger_bytes']} bytes) in {result['seconds']:.1f} s")
  print(f"param_sha256 {result['param_sha256']}")
  expected = result.get("summary_param_sha256")
  if expected is not None:
    same = expected == result["param_sha256"]
    print(f"summary.json param_sha256 {expected}: {'identical' if same else 'DIFFERENT'}")
    if not same:
      raise SystemExit(1)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
