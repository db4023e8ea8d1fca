"""Every notebook runs top to bottom on CPU with its TINY setting, and its .ipynb matches its py:percent twin."""

import json
import runpy
from pathlib import Path

import pytest

COLAB = Path(__file__).resolve().parents[2] / "colab"
SCRIPTS = sorted(COLAB.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_runs(script):
  namespace = runpy.run_path(str(script), run_name="__main__")
  assert namespace["TINY"] is True


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_ipynb_is_paired_and_stripped(script):
  notebook = json.loads(script.with_suffix(".ipynb").read_text())
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert all(not c["outputs"] and c["execution_count"] is None for c in code), "outputs must be stripped"
  text = script.read_text()
  for cell in code:
    for line in "".join(cell["source"]).splitlines():
      assert line.removeprefix("%pip") in text, f"{script.name} and its .ipynb disagree on: {line}"
