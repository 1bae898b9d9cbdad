# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make test runs the tests on WORKERS processes (pytest-xdist, a test file per worker at a time):
# the machine's cores, at most 4 (each worker holds torch, ~0.7 GB). WORKERS=0: one process.
WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

.PHONY: demo test test-fast lint completions bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash examples/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

completions: $(STAMP)
	$(BIN)/tvedit completions bash > completions/tvedit.bash
	$(BIN)/tvedit completions zsh > completions/_tvedit
	$(BIN)/tvedit completions fish > completions/tvedit.fish

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_add.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
