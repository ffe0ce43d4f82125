# The habits of this repository; CI (.ci/run) runs the README's commands, then lint and typecheck.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup run lint format typecheck test test-fast bench-quick

setup: $(VENV)/bin/embedding-worker
$(VENV)/bin/embedding-worker: pyproject.toml builder/requirements.txt builder/requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -r builder/requirements-dev.txt
	$(VENV)/bin/pip install --no-deps -e .

run: setup  ## the worker on its bundled model, answering test_input.json
	$(PY) handler.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: setup
	$(VENV)/bin/mypy

test: setup  ## everything, as CI runs it
	$(PY) -m pytest

test-fast: setup  ## no subprocess, no model beyond the suite's shared worker
	$(PY) -m pytest -m "not slow" -q

bench-quick: setup  ## the main benchmark, short: handler vs raw engine
	$(PY) -m bench.run --quick
