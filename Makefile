# Everything a reader needs: `make reproduce`. `make help` lists the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.DEFAULT_GOAL := help
.PHONY: help install test test-gpu bench

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv; install torch (pinned, first) and the project

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

test: install ## run the test suite on CPU
	$(PY) -m pytest

test-gpu: install ## run the GPU-marked tests (needs CUDA)
	$(PY) -m pytest -m gpu

bench: install ## AdaCov vs Adam step time on the 6-conv net -> results/optimizer_step_cpu.md
	$(PY) benchmarks/optimizer_step.py --out results/optimizer_step_cpu.md
