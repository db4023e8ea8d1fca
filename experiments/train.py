"""Train a decoder LM: ``python -m experiments.train --config tiny --workdir runs/tiny``.

Running the same command again resumes from the newest checkpoint in ``--workdir``. Every config field is a flag
(``--steps 500``, ``--layers attn,attn,attn``, ``--dtype bfloat16`` ...), and every plugin's settings are flags named
after it (``--text.data path/to/texts``, ``--mom.dispatch sorted``, ``--galore.rank 64``); see --help.
"""

from __future__ import annotations

import sys

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


def main(argv: list[str] | None = None) -> dict:
  try:
    cfg, args = parser(description=__doc__.splitlines()[0], default_preset="tiny", prog="python -m experiments.train",
                       extra=_run_flags).parse(argv)
    return train_and_evaluate(cfg, args.workdir or f"runs/{args.config}", accept_changes=args.accept_change)
  except (UsageError, TrainError, CorpusError) as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
