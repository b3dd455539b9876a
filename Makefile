# Everything a reader needs: `make reproduce`. `make help` lists the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# make reproduce settings; e.g. `make reproduce EPOCHS=2 DATA=synthetic` for a quick look
EPOCHS ?= 20
DATA ?= cifar100
OUT ?= $(if $(filter cifar100,$(DATA)),results,results/$(DATA))

.DEFAULT_GOAL := help
.PHONY: help install test test-gpu bench demo demo-fast reproduce data

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv; install torch (pinned, first), the project and its Hydra launchers

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,launchers]"
	@touch $@

test: install ## run the test suite on CPU
	$(PY) -m pytest

test-gpu: install ## run the GPU-marked tests (needs CUDA)
	$(PY) -m pytest -m gpu

bench: install ## the CPU benchmarks (step time vs Adam, profile, direction error, storage) -> results/*_cpu.md
	$(PY) benchmarks/optimizer_step.py --out results/optimizer_step_cpu.md
	$(PY) benchmarks/profile_step.py --out results/profile_step_cpu.md
	$(PY) benchmarks/fast_adacov_direction.py --kernel-sizes 3 5 --epochs 3 --out results/fast_adacov_direction_cpu.md
	$(PY) benchmarks/covariance_storage.py --out results/covariance_storage_cpu.md

data: install ## download and verify CIFAR-100 into data/ (stops with a message where it cannot)
	$(PY) -m adacov.data.prepare --root data

demo: install ## offline CPU demo on scikit-learn digits -> results/demo/figure1.png, table1.md
	rm -rf results/demo/runs
	WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=demo
	$(PY) plot_curves.py results/demo/runs --out results/demo

demo-fast: install ## fast vs exact AdaCov on the demo, 10 seeds -> results/demo_fast/figure1.png
	rm -rf results/demo_fast/runs
	WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=demo_fast
	$(PY) plot_curves.py results/demo_fast/runs --out results/demo_fast

reproduce: install ## the paper's sweep (18 runs) and its Figure 1 / Table 1 -> $(OUT)
	$(if $(filter cifar100,$(DATA)),$(PY) -m adacov.data.prepare --root data,)
	$(PY) train.py -m experiment=paper data=$(DATA) epochs=$(EPOCHS)
	$(PY) plot_curves.py runs/paper/$(DATA) --out $(OUT)
