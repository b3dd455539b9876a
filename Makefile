# Everything a reader needs: `make reproduce`. `make help` lists the rest.
PYTHON ?= python3
comma := ,
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# make reproduce settings; e.g. `make reproduce EPOCHS=2 DATA=synthetic` for a quick look, or
# `make reproduce DATA=fashion_mnist RESUME=true` to finish a sweep that was stopped
EPOCHS ?=
DATA ?= cifar100
RESUME ?= false
OUT ?= $(if $(filter cifar100,$(DATA)),results,results/$(DATA))
# The paper's sweep for DATA: its experiment config, where its runs go, and its environment
ifeq ($(DATA),fashion_mnist)
PAPER_EXPERIMENT := fashion_mnist
PAPER_RUNS := results/fashion_mnist/runs
PAPER_ENV := OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
# Table 1 timed alone after the sweep (configs/experiment/time_fashion_mnist.yaml says why)
PAPER_TIMING := results/fashion_mnist/timing
else
PAPER_EXPERIMENT := paper
PAPER_RUNS := runs/paper/$(DATA)
PAPER_ENV :=
endif

.DEFAULT_GOAL := help
.PHONY: help install test test-numerics test-gpu bench demo demo-fast tune compare report loop-methods reproduce data

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv; install torch (pinned, first), the project, its Hydra launchers and baselines

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,launchers,baselines]"
	@touch $@

test: install ## run the test suite on CPU
	$(PY) -m pytest

BENCH_OPTIMIZERS := adam adacov adacov_fast adacov_fast_compiled adacov_fast_t10 adacov_fast_t10_drift adacov_fast_t5_drift eadam mbf kfac ekfac tkfac tekfac soap shampoo kron adahessian sophia
# The Fashion-MNIST comparison's optimizers at its net's widths, one thread as its runs have, interleaved in one
# process: the comparison's step time vs Adam (plot_curves.py --bench) comes from this CSV.
FASHION_BENCH_CSV := results/optimizer_step_fashion_mnist_cpu.csv
FASHION_BENCH = OMP_NUM_THREADS=1 $(PY) benchmarks/optimizer_step.py --optimizers adam adacov adacov_fast adacov_fast_t5_drift mbf eadam kfac ekfac \
	tkfac tekfac soap shampoo kron whitening whitening_recursive sgd seng kld_wrm_so kld_wrm_q rs_kfac sre_kfac b_kfac b_r_kfac b_kfac_c --widths 16 16 32 32 64 64 --in-channels 1 --classes 10 --ddp-ranks \
	--out results/optimizer_step_fashion_mnist_cpu.md --csv $(FASHION_BENCH_CSV)

# Each CPU class in turn: torch's vectorized kernels (ATen), MKL's BLAS/LAPACK and oneDNN's convolutions
# dispatch on the CPU separately, and their float32 rounding differs; the three switches emulate a CPU
# without AVX2 (portable/SSE4), one with AVX2, and one with AVX-512, as far as this CPU has them.
KERNEL_SETS := default:SSE4_2:SSE41 avx2:AVX2:AVX2 avx512:AVX512:AVX512_CORE

test-numerics: install ## the numerically sensitive tests under each CPU kernel set this CPU has, then with 1 thread
	@best=$$($(PY) -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	for set in $(KERNEL_SETS); do \
		aten=$${set%%:*}; rest=$${set#*:}; mkl=$${rest%%:*}; onednn=$${rest#*:}; \
		case "$$aten:$$best" in avx2:default|avx512:default|avx512:avx2) echo "skip $$aten: this CPU has $$best"; continue;; esac; \
		echo "== ATEN_CPU_CAPABILITY=$$aten MKL_ENABLE_INSTRUCTIONS=$$mkl ONEDNN_MAX_CPU_ISA=$$onednn"; \
		ATEN_CPU_CAPABILITY=$$aten MKL_ENABLE_INSTRUCTIONS=$$mkl ONEDNN_MAX_CPU_ISA=$$onednn \
			$(PY) -m pytest -q -m "numerics and not gpu" || exit 1; \
	done; \
	echo "== OMP_NUM_THREADS=1"; OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "numerics and not gpu"

test-gpu: install ## run the GPU-marked tests (needs CUDA)
	$(PY) -m pytest -m gpu

bench: install ## the CPU benchmarks (step time vs Adam with DDP rows and goals, Fashion-MNIST's net, K-FAC cost, profile and floor, direction error, storage) -> results/*_cpu.md
	$(PY) benchmarks/optimizer_step.py --optimizers $(BENCH_OPTIMIZERS) --out results/optimizer_step_cpu.md
	$(FASHION_BENCH)
	$(PY) benchmarks/kfac_cost.py --out results/kfac_cost_cpu.md
	$(PY) benchmarks/profile_step.py --compile --out results/profile_step_cpu.md
	$(PY) benchmarks/fast_adacov_direction.py --kernel-sizes 3 5 --epochs 3 --out results/fast_adacov_direction_cpu.md
	$(PY) benchmarks/covariance_storage.py --out results/covariance_storage_cpu.md

data: install ## get and verify DATA=cifar100|fashion_mnist into data/ (stops with a message where it cannot)
ifeq ($(DATA),fashion_mnist)
	@$(PY) -m adacov.data.prepare --dataset fashion_mnist --root data --no-download 2>/dev/null || \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "apt-get failed: trying the official download"; \
	fi
endif
	$(PY) -m adacov.data.prepare --dataset $(DATA) --root data

demo: install ## offline CPU demo on scikit-learn digits -> results/demo/figure1.png, table1.md
	rm -rf results/demo/runs
	WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=demo
	$(PY) plot_curves.py results/demo/runs --out results/demo

# Fast AdaCov under two other refresh rules beside its default (each kernel every 50 steps, unchecked), each run
# labelled by its optimizer_name; the checked 5-step cycle was the default before issue 23's measurements.
DEMO_FAST_RULE = WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=demo_fast optimizer=adacov_fast model.kernel_size=3,5 'seed=range(10)'
FAST_T5_RULE := optimizer_name=adacov_fast_t5_drift optimizer.basis_refresh_every=5 optimizer.basis_drift_threshold=0.2

demo-fast: install ## fast (three refresh rules) vs exact AdaCov on the demo, 10 seeds -> results/demo_fast/figure1.png
	rm -rf results/demo_fast/runs
	WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=demo_fast
	$(DEMO_FAST_RULE) optimizer_name=adacov_fast_t10_drift optimizer.basis_refresh_every=10 optimizer.basis_drift_threshold=0.2
	$(DEMO_FAST_RULE) $(FAST_T5_RULE)
	$(PY) plot_curves.py results/demo_fast/runs --out results/demo_fast

# The learning-rate sweep: every optimizer's 5 grid points, then, where the best one lay on an edge of its
# grid, 2 more beyond that edge (half a decade apart, once); the report picks over all of them.
TUNE := OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=tune hydra/launcher=joblib hydra.launcher.n_jobs=2
EXTEND := $(TUNE) tune_trial=0 seed=0,1,2

# Fashion-MNIST's tuned comparison: two single-thread runs side by side (the experiments' joblib launcher);
# RESUME=true continues a stopped sweep instead of starting it over.
FASHION_SWEEP = OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m resume=$(RESUME)
FASHION_TUNE := results/fashion_mnist/tune
FASHION_COMPARE := results/fashion_mnist/compare

tune: install ## the lr sweep on the demo (~2 h) -> results/tune/; DATA=fashion_mnist: 23 optimizers on Fashion-MNIST (the first 12 optimizers' 72 grid runs took about 2 h 15 min here, with other jobs sharing the CPU; RESUME=true trains only the missing runs) -> results/fashion_mnist/tune/
ifeq ($(DATA),fashion_mnist)
	$(MAKE) --no-print-directory data DATA=fashion_mnist
	$(if $(filter true,$(RESUME)),,rm -rf $(FASHION_TUNE)/runs)
	$(FASHION_SWEEP) experiment=tune_fashion_mnist
	while ext="$$($(PY) tune_report.py $(FASHION_TUNE)/runs --out $(FASHION_TUNE) --extensions --classes 10)" && [ -n "$$ext" ]; do \
		echo "$$ext" | while read -r args; do $(FASHION_SWEEP) experiment=tune_fashion_mnist $$args </dev/null || exit 1; done || exit 1; \
	done
	$(PY) tune_report.py $(FASHION_TUNE)/runs --out $(FASHION_TUNE)
else
	rm -rf results/tune/runs
	$(TUNE)
	$(EXTEND) optimizer=kfac,tkfac,tekfac model.kernel_size=3,5 optimizer.lr=0.0001,0.0003
	$(EXTEND) optimizer=ekfac model.kernel_size=3 optimizer.lr=0.0001,0.0003
	$(EXTEND) optimizer=shampoo model.kernel_size=3,5 optimizer.lr=0.00001,0.00003
	$(EXTEND) optimizer=eadam model.kernel_size=3,5 optimizer.lr=0.03,0.1
	$(EXTEND) optimizer=sgd model.kernel_size=5 optimizer.lr=0.0003,0.001
	$(EXTEND) optimizer=seng model.kernel_size=3,5 optimizer.lr=0.00001,0.00003
	$(PY) tune_report.py results/tune/runs --out results/tune
endif

compare: install ## every optimizer at its tuned lr, seeds 3-5, 3x3/5x5 on the demo (~20 min) -> results/compare/; DATA=fashion_mnist (~2 h) -> results/fashion_mnist/compare/
ifeq ($(DATA),fashion_mnist)
	$(MAKE) --no-print-directory data DATA=fashion_mnist
	$(if $(filter true,$(RESUME)),,rm -rf $(FASHION_COMPARE)/runs)
	$(FASHION_SWEEP) experiment=compare_fashion_mnist
	$(FASHION_BENCH)
	$(PY) plot_curves.py $(FASHION_COMPARE)/runs --out $(FASHION_COMPARE) --bench $(FASHION_BENCH_CSV)
else
	rm -rf results/compare/runs
	OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m experiment=compare hydra/launcher=joblib hydra.launcher.n_jobs=2
	$(PY) plot_curves.py results/compare/runs --out results/compare
endif

# The methods around the optimizer (docs/loop-methods.md): three studies that share runs (resume=true trains each once)
LOOP_DATA := $(if $(filter fashion_mnist,$(DATA)),fashion_mnist,digits)
LOOP := OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) train.py -m resume=true experiment=loop_methods_$(LOOP_DATA)

loop-methods: install ## SALR, data orders and the batch-size lr rule on the demo (~55 min; DATA=fashion_mnist ~3.5 h) -> results/loop_methods/
	$(LOOP) lr_step=-1,0
	$(LOOP) salr.enabled=false data_order=rr,so,ig
	$(LOOP) salr.enabled=false optimizer=adam,adacov,sgd batch_size=32,64,128,256,512 lr_step=-2,-1,0,1,2 seed=$(if $(filter fashion_mnist,$(DATA)),0 epochs=1,0$(comma)1)
	$(PY) loop_methods_report.py results/loop_methods/$(LOOP_DATA)/runs --out results/loop_methods/$(LOOP_DATA) --measure $(if $(filter fashion_mnist,$(DATA)),--images 512,)

report: install ## rebuild every committed figure and table from the recorded runs in results/ (seconds; no training)
	$(PY) plot_curves.py results/demo/runs --out results/demo
	$(PY) plot_curves.py results/demo_fast/runs --out results/demo_fast
	$(PY) tune_report.py results/tune/runs --out results/tune
	$(PY) plot_curves.py results/compare/runs --out results/compare
	$(PY) plot_curves.py results/fashion_mnist/runs --out results/fashion_mnist
	$(PY) plot_curves.py results/fashion_mnist/timing/runs --out results/fashion_mnist/timing
	$(PY) tune_report.py $(FASHION_TUNE)/runs --out $(FASHION_TUNE)
	$(PY) plot_curves.py $(FASHION_COMPARE)/runs --out $(FASHION_COMPARE) --bench $(FASHION_BENCH_CSV)

reproduce: install ## the paper's sweep (CIFAR-100: 18 runs; DATA=fashion_mnist: 24 runs, ~2 h on 2 cores) and its Figure 1 / Table 1 -> $(OUT)
	$(if $(filter cifar100 fashion_mnist,$(DATA)),$(MAKE) --no-print-directory data DATA=$(DATA),)
	$(if $(filter true,$(RESUME)),,rm -rf $(PAPER_RUNS))
	$(PAPER_ENV) $(PY) train.py -m experiment=$(PAPER_EXPERIMENT) data=$(DATA) resume=$(RESUME) $(if $(EPOCHS),epochs=$(EPOCHS))
	$(PY) plot_curves.py $(PAPER_RUNS) --out $(OUT)
ifdef PAPER_TIMING
	rm -rf $(PAPER_TIMING)/runs
	$(PAPER_ENV) $(PY) train.py -m experiment=time_fashion_mnist
	$(PY) plot_curves.py $(PAPER_TIMING)/runs --out $(PAPER_TIMING)
endif
