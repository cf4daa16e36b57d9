# Every target creates (or reuses) its own virtual environment in .venv, so on a fresh machine
# `make demo` and `make test` do all the set-up. TORCH pins the wheel installed first; override
# it to use another build, e.g. `make test TORCH="torch==2.13.0+cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sharpgen-installed

.PHONY: demo test lint format docs docs-serve bench clean ci

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]" "$(TORCH)"  # TORCH again: no extra may move torch
	touch $(STAMP)

## demo: the main job -- reproduce the paper's Table 1 (quick preset) and print the report
demo: $(STAMP)
	$(BIN)/sharpgen reproduce --preset quick --out results/quick

## test: the whole test suite (unit, statistical, doctests, README/docs snippets, notebooks)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff (style, imports, docstrings, complexity <= 15) and mypy on the package
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

## bench: benchmarks against the anchor libraries (separate env .venv-bench, see benchmarks/README.md)
bench:
	bash benchmarks/setup_bench_env.sh
	for f in benchmarks/bench_*.py; do .venv-bench/bin/python $$f || exit 1; done

ci: test lint docs

clean:
	rm -rf $(VENV) site build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
