# Two commands do all set-up on a fresh machine:
#   make run   - create .venv (Python 3.12), install the package with transformers (the main job
#                writes Hugging Face exports), run the main job (conf/tiny.yaml)
#   make test  - also install the test extras and run the whole test suite
# Python 3.12 is found as `python3.12`, or through pyenv when the default interpreter is older.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
PYTEST_ARGS ?=

PYTHON312 := $(shell \
	if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1; then \
		echo python3.12; \
	elif command -v pyenv >/dev/null 2>&1; then \
		v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | sort -V | tail -n1); \
		[ -n "$$v" ] && echo "env PYENV_VERSION=$$v $$(pyenv root)/versions/$$v/bin/python3.12"; \
	fi)

.PHONY: run test install install-test install-nemo test-nemo install-peers bench clean lint

$(VENV)/.installed: setup.py constraints.txt
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (install it, e.g. 'pyenv install 3.12')" >&2; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e ".[hf]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# NeMo tier (optional; not part of `make test`): NeMo-Run (`nemo elastic ...`) and the
# Megatron-Bridge adapter.  megatron-bridge goes in with --no-deps: its declared dependencies
# include GPU-only builds; the `bridge` extra lists what its training modules import.
$(VENV)/.installed-nemo: $(VENV)/.installed-test
	$(PIP) install -c constraints.txt -e ".[nemo,bridge]"
	$(PIP) install -c constraints.txt --no-deps megatron-bridge==0.6.2
	touch $@

install-nemo: $(VENV)/.installed-nemo

test-nemo: install-nemo
	$(PY) -m pytest -q tests/test_nemo_run.py tests/test_bridge.py tests/test_slurm.py $(PYTEST_ARGS)

# Peers tier (optional): NVIDIA ModelOpt's Minitron pruning, the real peer of the elastic family in
# bench/bench_claims.py (tests/test_peers_modelopt.py skips without it).
$(VENV)/.installed-peers: $(VENV)/.installed-test
	$(PIP) install -c constraints.txt -e ".[peers]"
	touch $@

install-peers: $(VENV)/.installed-peers

run: install
	$(VENV)/bin/nemo-elastic run $(ARGS)

test: install-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_elastic.py
	$(PY) bench/bench_masked_vs_sliced.py
	$(PY) bench/bench_importance.py
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_family.py
	$(PY) bench/bench_sliced_step.py
	$(PY) bench/bench_decode.py

# pyflakes-class checks (unused or undefined names, syntax) with ruff, as the sessions run them
lint: install
	$(PIP) install -q -c constraints.txt ruff
	$(VENV)/bin/ruff check --select F,E9 nemo_elastic tests bench examples

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
