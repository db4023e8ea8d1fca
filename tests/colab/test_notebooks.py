"""Every notebook runs top to bottom on CPU with its TINY setting and shows what it claims; its .ipynb matches its
py:percent twin."""

import json
import runpy
from pathlib import Path

import pytest

COLAB = Path(__file__).resolve().parents[2] / "colab"
SCRIPTS = sorted(COLAB.glob("*.py"))


def _check_quickstart(ns):
  assert ns["summary"]["final_eval_loss"] < ns["summary"]["uniform_loss"]
  assert ns["resumed"]["steps_this_session"] == 2 and len(ns["train_losses"]) == ns["cfg"].steps + 2


def _check_mixture_of_memories(ns):
  assert ns["packed_error"] < 1e-4 and ns["decode_error"] < 1e-4  # the claims printed in the notebook
  assert len(ns["rows"]) == 3 and all(0.0 <= r["accuracy"] <= 1.0 for r in ns["rows"])


CLAIMS = {"quickstart": _check_quickstart, "mixture_of_memories": _check_mixture_of_memories}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_what_it_claims(script):
  namespace = runpy.run_path(str(script), run_name="__main__")
  assert namespace["TINY"] is True
  CLAIMS[script.stem](namespace)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_ipynb_is_paired_and_stripped(script):
  notebook = json.loads(script.with_suffix(".ipynb").read_text())
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] and c["execution_count"] is None for c in code), "outputs must be stripped"
  text = script.read_text()
  for cell in code:
    for line in "".join(cell["source"]).splitlines():
      assert line.removeprefix("%pip") in text, f"{script.name} and its .ipynb disagree on: {line}"
