"""Train a decoder LM: ``python -m experiments.train --config tiny --workdir runs/tiny``.

Running the same command again resumes from the newest checkpoint in ``--workdir``. Every config field is a flag
(``--steps 500``, ``--layers attn,attn,attn``, ``--data path/to/texts``, ``--dtype bfloat16`` ...); see --help.
"""

from __future__ import annotations

import sys

from experiments.configs import PRESETS
from research.cli import UsageError, fail, parse_run_args
from research.data import CorpusError
from research.train import TrainConfig, TrainError, train_and_evaluate


def main(argv: list[str] | None = None) -> dict:
  try:
    cfg, args = parse_run_args(
        argv, config_cls=TrainConfig, presets=PRESETS, default_preset="tiny",
        description=__doc__.splitlines()[0],
        extra=lambda p: p.add_argument("--workdir", default=None, help="run folder (default: runs/<config>)"))
    return train_and_evaluate(cfg, args.workdir or f"runs/{args.config}")
  except (UsageError, TrainError, CorpusError) as e:
    fail(str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
