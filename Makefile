# The newcomer's contract: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Extra arguments for run.py, e.g. make run ARGS="paths.root=/data/artifacts"
ARGS   ?=

.PHONY: run test lint bench install install-dev clean

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
install-dev: $(VENV)/.installed-dev

# Today's most complete end-to-end path: the pipeline (base data plus any labelled production
# data -> validate -> split -> train -> evaluate -> gate -> register -> propose; cached when
# nothing changed), then serve production with capture, feedback and drift monitoring.
run: install
	$(BIN)/python run.py +mode=pipeline $(ARGS)
	$(BIN)/python run.py +mode=serve $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .

bench: install-dev
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_drift.py

clean:
	rm -rf artifacts outputs .pytest_cache .ruff_cache
