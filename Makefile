# One command per step. `make test` builds .venv from nothing (pinned, ~7 GB, ~3 min) and runs
# the whole suite; `make demo` runs the offline Fashion-MNIST quickstart.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint typecheck demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev,tpu]'
	touch $(STAMP)

test: lint typecheck
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check aff_lightning tests benchmarks cli.py
	$(VENV)/bin/ruff format --check aff_lightning tests benchmarks cli.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) -m aff_lightning.demo

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo_out
