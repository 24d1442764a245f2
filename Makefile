# One-command set-up: every target that runs code depends on `setup`, which is idempotent.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAKE ?= ./lake
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@bash scripts/setup-system.sh
	@test -x $(BIN)/python || $$(command -v $(PY) || command -v python3) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps clip-retrieval==2.45.0  # its ClipClient + front for the serve tests, not its heavy deps
	@touch $(STAMP)

demo: setup
	$(BIN)/laion-spark demo --lake $(LAKE)

test: setup
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(LAKE) .pytest_cache build *.egg-info
