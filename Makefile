# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit readme bench bench-peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m edge

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check edge tests bench
	$(BIN)/ruff format --check edge tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

readme: $(STAMP)
	$(BIN)/python -m edge settings-table --write README.md

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-peers: $(STAMP)
	$(BIN)/python bench/run.py --peers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
