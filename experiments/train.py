"""Train a decoder LM: ``python -m experiments.train --config tiny --workdir runs/tiny``.

Running the same command again resumes from the newest checkpoint in ``--workdir``. Several hosts (or one process
per GPU) run the same command with ``--coordinator HOST:PORT --num-processes N --process-id I``; the mesh (``--mesh``)
then spans every process's devices. Every config field is a flag
(``--steps 500``, ``--layers attn,attn,attn``, ``--dtype bfloat16`` ...), and every plugin's settings are flags named
after it (``--text.data path/to/texts``, ``--mom.dispatch sorted``, ``--galore.rank 64``); see --help.
"""

from __future__ import annotations

import sys

import jax

from experiments.configs import PRESETS
from research.cli import ConfigParser, UsageError, fail
from research.data import CorpusError
from research.train import TrainConfig, TrainError, train_and_evaluate


def parser(**kwargs) -> ConfigParser:
  """The command line of a training entry point: ``--config`` preset, every TrainConfig and plugin flag."""
  return ConfigParser(TrainConfig, presets=PRESETS, usage="%(prog)s [--config NAME] [--workdir DIR] [--FLAG VALUE ...]",
                      **kwargs)


def _run_flags(p) -> None:
  p.add_argument("--workdir", default=None, help="run folder (default: runs/<config>)")
  p.add_argument("--accept-change", action="append", default=[], metavar="KEY",
                 help="resume although the saved run had another value of this run setting (e.g. steps); repeatable")
  multi = p.add_argument_group("multi-process (several hosts, or one process per GPU): every process runs the same "
                               "command with its own --process-id")
  multi.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="address of process 0, for jax.distributed.initialize")
  multi.add_argument("--num-processes", type=int, default=None, help="processes in the run")
  multi.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
  """``jax.distributed.initialize`` when a coordinator is given (all three flags together, checked)."""
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if not any(given):
    return
  if not all(given):
    raise UsageError("--coordinator, --num-processes and --process-id go together")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise UsageError(f"--process-id must be in [0, {num_processes}) and --num-processes >= 1 (got {process_id}, "
                     f"{num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def main(argv: list[str] | None = None) -> dict:
  try:
    cfg, args = parser(description=__doc__.splitlines()[0], default_preset="tiny", prog="python -m experiments.train",
                       extra=_run_flags).parse(argv)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return train_and_evaluate(cfg, args.workdir or f"runs/{args.config}", accept_changes=args.accept_change)
  except (UsageError, TrainError, CorpusError) as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
