# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EMACS ?= emacs
EL := editor_bridge/emacs

.PHONY: demo test lint typecheck pytest emacs-test bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dovecote demo

test: lint typecheck emacs-test pytest

lint: $(STAMP)
	$(BIN)/ruff check flows adapters editor_bridge tests bench examples
	$(BIN)/ruff format --check flows adapters editor_bridge tests bench examples
	$(BIN)/python -m flows.diagrams --check

typecheck: $(STAMP)
	$(BIN)/mypy flows adapters editor_bridge

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# The Emacs client (editor_bridge/emacs): byte-compile with warnings as errors,
# checkdoc, then the ERT suite against the real `dovecote serve --stdio`.
# A missing Emacs is installed when running as root, else this fails (never skips).
emacs-test: $(STAMP)
	@command -v $(EMACS) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "emacs-test: $(EMACS) not found; installing emacs-nox" >&2; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y --no-install-recommends emacs-nox || exit 1; \
	  else \
	    echo "emacs-test: $(EMACS) not found and not root: install Emacs >= 28.1" \
	      "(apt-get install emacs-nox) or set EMACS=/path/to/emacs" >&2; \
	    exit 1; \
	  fi; }
	@command -v $(EMACS) >/dev/null 2>&1 || { echo "emacs-test: $(EMACS) is still missing" >&2; exit 1; }
	@$(EMACS) --batch -Q --eval '(unless (>= emacs-major-version 28) (message "emacs-test: Emacs %s is too old: dovecote.el needs 28.1" emacs-version) (kill-emacs 1))'
	trap 'rm -f $(EL)/*.elc' EXIT; \
	$(EMACS) --batch -Q -L $(EL) --eval '(setq byte-compile-error-on-warn t)' \
	  -f batch-byte-compile $(EL)/dovecote.el $(EL)/dovecote-tests.el && \
	$(EMACS) --batch -Q --eval '(let ((n 0)) (advice-add (quote checkdoc-error) :before (lambda (&rest _) (setq n (1+ n)))) (dolist (f command-line-args-left) (checkdoc-file f)) (setq command-line-args-left nil) (when (> n 0) (message "checkdoc: %d complaint(s)" n) (kill-emacs 1)))' \
	  $(EL)/dovecote.el $(EL)/dovecote-tests.el && \
	DOVECOTE=$(abspath $(BIN)/dovecote) $(EMACS) --batch -Q -L $(EL) \
	  -l dovecote-tests -f ert-run-tests-batch-and-exit

# The protocol fuzzer (tests/test_fuzz_protocol.py) for as long as asked;
# what it finds is kept in tests/fuzz-corpus and tried first by every run.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_protocol.py

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .dovecote .pytest_cache .mypy_cache .ruff_cache
