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

# The UI tests drive Debian's chromium (never a downloaded browser): installed here when missing and we are root;
# otherwise the suite still runs and the UI tests fail with the command to run.
CHROMIUM_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

test: $(STAMP)
	@test -x /usr/bin/chromium || if [ "$$(id -u)" = 0 ]; then \
		$(CHROMIUM_INSTALL) || { apt-get update && $(CHROMIUM_INSTALL); } || echo "make test: chromium did not install"; \
	else echo "make test: /usr/bin/chromium is missing; the UI tests need: sudo apt-get install -y chromium"; fi
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway admin tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python tests/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .credgate .pytest_cache .mypy_cache .ruff_cache
