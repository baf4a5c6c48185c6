# oneref: common tasks. `make help` lists them.
PYTHON ?= python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-dev demo app train test test-all lint format bench clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## install oneref with its runtime dependencies (editable)
	$(PYTHON) -m pip install -e .

install-dev: ## install oneref with test and lint tools (editable)
	$(PYTHON) -m pip install -e ".[dev]"

demo: install ## train the tiny model on the embedded synthetic dataset (2-core CPU: ~10 min)
	$(PYTHON) -m oneref.train

app: ## serve the demo's model in the browser (python -m oneref.demo; run `make demo` first)
	$(PYTHON) -m pip install -e ".[demo,hf]"
	$(PYTHON) -m oneref.demo

train: demo ## alias of demo

test: install-dev ## run the default test suite (fast; what CI runs)
	WANDB_MODE=disabled $(PYTHON) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install-dev ## run every test, slow ones included
	WANDB_MODE=disabled $(PYTHON) -m pytest $(PYTEST_ARGS)

lint: ## ruff lint and format check
	$(PYTHON) -m ruff check src tests scripts
	$(PYTHON) -m ruff format --check src tests scripts

format: ## apply ruff formatting and autofixes
	$(PYTHON) -m ruff check --fix src tests scripts
	$(PYTHON) -m ruff format src tests scripts

bench: ## run the benchmarks and append to bench.jsonl (see docs/benchmarks.md)
	$(PYTHON) scripts/benchmark.py all --out bench.jsonl

clean: ## remove caches and run outputs
	rm -rf .pytest_cache .ruff_cache logs outputs multirun
