# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EMACS ?= emacs
EL := editor_bridge/emacs

.PHONY: demo test lint typecheck pytest emacs-test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dovecote demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check flows adapters editor_bridge tests bench examples
	$(BIN)/ruff format --check flows adapters editor_bridge tests bench examples
	$(BIN)/python -m flows.diagrams --check

typecheck: $(STAMP)
	$(BIN)/mypy flows adapters editor_bridge

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .dovecote .pytest_cache .mypy_cache .ruff_cache
