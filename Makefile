# kron: `make demo` and `make test` set up .venv on first use (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kron-installed

.PHONY: setup test test-all lint bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Locally the fast suite; in CI (CI=true, as .ci/run is run) the slow end-to-end tests too
# (about a minute more on 2 cores).
test: $(STAMP)  ## the test suite (slow end-to-end tests only under CI=true, or `make test-all`)
	WANDB_MODE=disabled $(PY) -m pytest -q $(if $(filter true 1,$(CI)),,-m "not slow")

test-all: $(STAMP)  ## every test, slow ones included
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check kron tests

bench: $(STAMP)  ## the layer benchmark table (CPU, and CUDA when present)
	$(PY) -m kron.bench layers

demo: $(STAMP)  ## synthetic SVHN (hard level) -> the small SVHN table (10 runs: 5 rows x 2 seeds, minutes on 2 CPU cores) -> table + plots
	$(PY) -m kron.tables demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
