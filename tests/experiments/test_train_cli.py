"""The main job's command line: one-line errors with a non-zero exit, and a real run from the shell."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.train import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "error: --steps must be a positive integer (got -3)"),
    (["--config", "nope"], "error: unknown --config 'nope'; choose one of: gpu, mqar_gpu, mqar_tiny, small, tiny"),
    (["--text.data", "/no/such/path"], "error: data path '/no/such/path' does not exist"),
    (["--layers", "attn,nope"], "error: --layers names an unknown layer 'nope'; registered layers:"),
    (["--d-model", "wide"], "error: argument --d-model: --d-model takes an integer, got 'wide'"),
    (["--optimizer", "adamax"], "error: --optimizer names an unknown optimizer 'adamax'; registered optimizers:"),
    (["--learning-rate", "-1"], "error: --learning-rate must be >= 0"),
    (["--learning-rate", "nan"], "error: --learning-rate must be a finite number (got nan)"),
    (["--grad-clip", "inf"], "error: --grad-clip must be a finite number (got inf)"),
    (["--unknown-flag", "1"], "error: unrecognized arguments: --unknown-flag 1"),
    # plugin flags: one line naming the plugin, the flag and what is allowed
    (["--layers", "mom,attn", "--mom.dispatch", "fast"],
     "error: layer mom: --mom.dispatch must be one of packed, sorted, dense (got 'fast')"),
    (["--layers", "mom", "--mom.top-k", "9"], "error: layer mom: --mom.top-k must be in [1, num_memories=4] (got 9)"),
    (["--optimizer", "galore", "--galore.rank", "0"], "error: optimizer galore: --galore.rank must be a positive"),
    (["--galore.rank", "8"], "error: --galore.rank is set but the run uses no optimizer 'galore' (select it with "
                             "--optimizer)"),
    (["--layers", "gdn", "--gdn.chunk-size", "48"], "error: layer gdn: --gdn.chunk-size must be one of 16, 32, 64"),
])
def test_bad_flags_exit_non_zero_with_one_line(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv + ["--workdir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(message), err
  assert err.count("\n") == 1  # exactly one line


def test_help_lists_every_plugin_flag_with_default_and_choices(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["--help"])
  assert exit_info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for group in ("layer mom (layers.mom.MoMConfig)", "optimizer galore (optim.registry.GaLoreConfig)",
                "task mqar (research.data.MQARTaskConfig)", "layer longgen (layers.longgen.LongGenConfig)"):
    assert group in text
  assert "--mom.dispatch STR how the memories run" in text and "(default: packed; one of packed, sorted, dense)" in text
  assert "--galore.rank INT r, the projected rank; None means d_model / 4. (default: None)" in text
  assert "--mom.memory.chunk-size INT" in text and "--adamw.weight-decay FLOAT" in text


def test_plugin_flags_reach_the_configs_and_underscores_work():
  from experiments.train import parser
  cfg, _ = parser(default_preset="tiny").parse(["--layers", "mom,attn", "--mom.num_memories", "3", "--mom.top-k", "1",
                                         "--mom.memory.chunk-size=32", "--optimizer", "galore", "--galore.rank", "8",
                                         "--task", "mqar", "--mqar.num-kv-pairs", "2", "--vocab-size", "512"])
  mom = cfg.model.mixers["mom"]
  assert (mom.num_memories, mom.top_k, mom.memory.chunk_size) == (3, 1, 32)
  assert cfg.optimizer_config.rank == 8 and cfg.task_config.num_kv_pairs == 2
  assert set(cfg.plugins) == {"galore", "mqar", "first_order"}  # the preset's adamw and text are not chosen
  assert set(cfg.model.mixers) == {"mom", "attn"}


def _train_command(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", "--config", "tiny", "--workdir", str(workdir),
          "--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2", "--seq-len", "32", *extra]


def test_shell_error_has_no_traceback(tmp_path):
  result = subprocess.run(_train_command(tmp_path, "--steps", "-3"), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == "error: --steps must be a positive integer (got -3)"
  assert "Traceback" not in result.stderr + result.stdout


def _flag_values():
  from hypothesis import strategies as st
  from experiments.train import parser
  names = [f.name for f in parser(default_preset="tiny").flags] + ["--config", "--layers", "--optimizer", "--task"]
  value = st.one_of(st.text(max_size=12), st.integers(-10**25, 10**25).map(str),
                    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0", "none", "attn,mom", "galore", "mqar",
                                     "1e-300", "", ",", "sorted", "packed", "True"]))
  return st.lists(st.tuples(st.sampled_from(names), value), max_size=6)


def test_random_flag_values_parse_or_fail_with_one_line():
  """Property: any sequence of known flags with arbitrary values yields a config or a one-line UsageError."""
  from hypothesis import HealthCheck, example, given, settings
  from experiments.train import parser
  from research.cli import UsageError
  from research.config import flatten, to_json

  @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
  @given(_flag_values())
  @example([("--mqar.random-non-queries", "\n")])  # a boolean flag's stray value, echoed in argparse's message
  def check(pairs):
    argv = [token for name, value in pairs for token in (name, value)]
    try:
      cfg, _ = parser(default_preset="tiny").parse(argv)
    except UsageError as e:
      assert "\n" not in str(e) and str(e)
    except SystemExit as e:  # argparse's own exit for a value that looks like a flag (e.g. "-inf" after --x)
      assert e.code == 2
    else:  # an accepted config holds only valid values: positive step counts, finite floats
      floats = [v for v in flatten(to_json(cfg)).values() if isinstance(v, float)]
      assert cfg.steps >= 1 and cfg.batch_size % cfg.grad_accum == 0 and all(math.isfinite(v) for v in floats)

  check()
