# The newcomer's contract: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Extra arguments for run.py, e.g. make run ARGS="paths.root=/data/artifacts"
ARGS   ?=

.PHONY: run test test-fast lint bench install install-dev prometheus clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" setuptools wheel

# Reinstall only when the project's dependency files change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev prometheus

# promtool and prometheus for tests/test_alerts.py, from Debian's package when missing. The
# package would start a system Prometheus: policy-rc.d refuses that during the install (a
# policy-rc.d already there is left as it is), and any server it started anyway is stopped.
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ADDED=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && \
	    $$SUDO chmod +x /usr/sbin/policy-rc.d && ADDED=1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends prometheus; rc=$$?; \
	  [ -n "$$ADDED" ] && $$SUDO rm -f /usr/sbin/policy-rc.d; \
	  for pid in $$(pgrep -x prometheus); do $$SUDO kill $$pid; done; \
	  exit $$rc; }

# Today's most complete end-to-end path: the pipeline (base data plus any labelled production
# data -> validate -> split -> train -> evaluate -> gate -> register -> propose; cached when
# nothing changed), then serve production with capture, feedback and drift monitoring.
run: install
	$(BIN)/python run.py +mode=pipeline $(ARGS)
	$(BIN)/python run.py +mode=serve $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit loop: every test that needs no Ray (under 2 minutes on 2 cores); `make test` runs all.
test-fast: install-dev
	$(BIN)/python -m pytest -m "not ray" $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .

bench: install-dev
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_drift.py
	$(BIN)/python bench/bench_cluster.py

clean:
	rm -rf artifacts outputs .pytest_cache .ruff_cache
