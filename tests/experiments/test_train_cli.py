"""The main job's command line: one-line errors with a non-zero exit, and a real run from the shell."""

import os
import signal
import subprocess
import sys
import time
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


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path):
  """Kill the job (SIGKILL) once a checkpoint exists, restart it, and check it resumes and finishes."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  command = _train_command(tmp_path, "--steps", "4000", "--checkpoint-every", "5", "--eval-every", "4000",
                           "--log-every", "5", "--batch-size", "8")
  job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  checkpoints = tmp_path / "checkpoints"
  deadline = time.time() + 120
  while time.time() < deadline and len([p for p in checkpoints.glob("*") if p.name.isdigit()]) < 2:
    time.sleep(0.2)
  job.send_signal(signal.SIGKILL)
  job.wait(timeout=30)
  assert job.returncode == -signal.SIGKILL
  complete = sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
  assert complete, "no checkpoint was written before the kill"

  resumed = subprocess.run(command[:command.index("--steps") + 1] + [str(complete[-1] + 5)] +
                           command[command.index("--steps") + 2:],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"resumed from checkpoint at step {complete[-1]}" in resumed.stdout
  assert "done: step" in resumed.stdout
  assert not list(checkpoints.glob("*tmp*")), "a half-written checkpoint was left behind"
