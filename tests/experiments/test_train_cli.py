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
    (["--steps", "-3"], "error: steps must be a positive integer (got -3)"),
    (["--config", "nope"], "error: unknown --config 'nope'; choose one of: tiny, small, gpu, mqar_tiny, mqar_gpu"),
    (["--data", "/no/such/path"], "error: data path '/no/such/path' does not exist"),
    (["--layers", "attn,nope"], "error: unknown layer 'nope'; registered layers:"),
    (["--d-model", "wide"], "error: argument --d-model: --d-model takes an integer, got 'wide'"),
    (["--optimizer", "adamax"], "error: optimizer must be one of"),
    (["--learning-rate", "-1"], "error: learning_rate must be >= 0"),
    (["--unknown-flag", "1"], "error: unrecognized arguments: --unknown-flag 1"),
])
def test_bad_flags_exit_non_zero_with_one_line(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv + ["--workdir", str(tmp_path / "run")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(message), err
  assert err.count("\n") == 1  # exactly one line


def _train_command(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", "--config", "tiny", "--workdir", str(workdir),
          "--d-model", "32", "--num-heads", "2", "--num-kv-heads", "2", "--seq-len", "32", *extra]


def test_shell_error_has_no_traceback(tmp_path):
  result = subprocess.run(_train_command(tmp_path, "--steps", "-3"), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == "error: steps must be a positive integer (got -3)"
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
