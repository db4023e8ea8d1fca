# Two commands on a fresh machine:  `make train` (the main job) and `make test` (the test suite).
# Both create .venv with a Python >= 3.12 found on PATH or in pyenv, and install memlab with its test extras.
PYTHON ?= $(shell sh .ci/find_python.sh)
VENV := .venv
PY := $(VENV)/bin/python
WORKERS ?= 2

.PHONY: setup train test clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found (see .ci/find_python.sh)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m experiments.train --config tiny --workdir runs/tiny

test: setup
	$(PY) -m pytest -n $(WORKERS) tests

clean:
	rm -rf $(VENV) runs
