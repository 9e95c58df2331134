# Every target sets itself up: the virtualenv (and the offline Fashion-MNIST copy) are made
# when missing. `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
RESULTS ?= results
PRESET  ?= paper
CIFAR10_ZIP ?= ../shared/data/cifar10-jpeg.zip
CIFAR10_DIR ?= $(HOME)/.cache/lcbench/cifar10-jpeg
# the nets the forecast maps after Table 2 (smoke: those its runs trained)
SCALE_paper := lc-vgg resnet101 wrn28-10 --task cifar10
SCALE_smoke :=

.PHONY: help setup data lint test test-all learning-check cifar10 fidelity-check fidelity-gpu dni-recipe \
	dni-comparison reproduce-table2 plan-check plot docs-figures bench clean

help:
	@echo "make setup           create .venv and install lcbench (+ test tools)"
	@echo "make lint            ruff: lint and format check (make test runs it first)"
	@echo "make test            the test suite (what CI runs; < 10 min on 2 CPU cores)"
	@echo "make test-all        also the slow tests"
	@echo "make reproduce-table2 [PRESET=paper|smoke]  the method-comparison table beside the"
	@echo "                     published numbers, and the figures (resumable; smoke: minutes, offline);"
	@echo "                     then the forecast map: where each rule beats DDP and pipelined BP on"
	@echo "                     K = 2..64 GPUs over links of every bandwidth (lcbench scale; paper: lc-vgg,"
	@echo "                     ResNet-101, WRN-28-10 under the shipped profiles; smoke: its own nets)."
	@echo "                     PLAN=1: the plan only (state and price of every run on PROFILE, totals"
	@echo "                     on DEVICES; default h100-sxm-nvlink, 8), nothing run"
	@echo "make plan-check      the plan's price against measured runs: 5 rounds of calibrating this machine"
	@echo "                     and training the smoke preset; the median of each run's measured / forecast over rounds (~17 min)"
	@echo "make plot            the figures of $(RESULTS)/$(PRESET)/table2 into figures/"
	@echo "make docs-figures    the README's figures (docs/figures/) from $(RESULTS)/smoke"
	@echo "make learning-check  every method on Fashion-MNIST, small CNN, K=2, 3 epochs; DNI and cDNI"
	@echo "                     also in bf16 and compiled"
	@echo "make fidelity-check  BP, LC(3), DNI(3), cDNI(3) (the paper's synthesizer and plain L2 fit on"
	@echo "                     DNI's Adam, and on the table's SGD 0.1) and the no-signal floor on lc-vgg and a CIFAR-10"
	@echo "                     slice, with the local-signal diagnostics, beside the published ordering;"
	@echo "                     the five cells again at twice the budget (--preset twice); then why DNI's"
	@echo "                     label-blind synthesizer fails (bench.studies.dni_signal) (~50 min)"
	@echo "make dni-recipe      the study that chose DNI's and cDNI's training recipe: every candidate on"
	@echo "                     the fidelity check's setting and the learning check's (~80 min)"
	@echo "make fidelity-gpu    the same comparison in full on a GPU: lc-vgg, K=4, 20k iterations, bf16"
	@echo "make dni-comparison [PRESET=cpu]  the DGL authors' DNI comparison (BP, DNI, cDNI, DGL on the"
	@echo "                     DNI paper's CNN, Adam 3e-5): in full (GPU hours) or a CPU preset (~15 min)"
	@echo "make bench           step time: lcbench BP vs a plain loop, every method vs BP; speedups"
	@echo "                     of LC, DGL, DNI, pipelined BP on 2 ranks vs BP in 1 process and vs"
	@echo "                     data-parallel BP (DDP) on the same 2 ranks, each run's epoch beside"
	@echo "                     its forecast from this machine's calibration (ResNet-20 and lc-vgg;"
	@echo "                     ~30 min); where CUDA is,"
	@echo "                     BP's samples/s vs a plain loop (fp32, bf16+compile) and every rule's"
	@echo "                     step time vs BP beside its FLOPs, on lc-vgg K=4"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(STAMP)

# Debian's copy of Fashion-MNIST (lcbench finds it there); skipped quietly where apt is not usable.
data:
	@test -d $(FMNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1; } || \
	  echo "note: $(FMNIST) is missing; tests that need Fashion-MNIST will be skipped"

# ruff (configured in pyproject.toml): lint, and the code formatted as ruff formats it
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(STAMP) data
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP) data
	$(BIN)/python -m pytest -q -m "not gpu"

learning-check: $(STAMP) data
	for m in bp dgl lc dni cdni gn infopro; do \
	  $(BIN)/lcbench run --method $$m --groups 2 --task fashion-mnist --epochs 3 \
	    --experiment learning-check --out $(RESULTS) || exit 1; \
	done
	for how in "--precision bf16" "--compile"; do \
	  for m in dni cdni; do \
	    $(BIN)/lcbench run --method $$m --groups 2 --task fashion-mnist --epochs 3 $$how \
	      --experiment learning-check --out $(RESULTS) || exit 1; \
	  done; \
	done

# The shared JPEG copy of CIFAR-10, unpacked once; the targets that need it are skipped with
# one line where it is absent.
cifar10:
	@test -d $(CIFAR10_DIR)/cifar10 || { \
	  rm -rf $(CIFAR10_DIR).tmp && $(BIN)/python -m zipfile -e $(CIFAR10_ZIP) $(CIFAR10_DIR).tmp && \
	  mkdir -p $(CIFAR10_DIR) && mv $(CIFAR10_DIR).tmp/cifar10 $(CIFAR10_DIR)/ && rm -rf $(CIFAR10_DIR).tmp; }

fidelity-check: $(STAMP)
	@if [ ! -f $(CIFAR10_ZIP) ]; then echo "fidelity-check: skipped, $(CIFAR10_ZIP) is absent"; exit 0; fi; \
	set -e; $(MAKE) -s cifar10; \
	$(BIN)/lcbench sweep bench/experiments/fidelity.toml --out $(RESULTS) --data-dir $(CIFAR10_DIR) || test $$? -eq 1; \
	$(BIN)/lcbench table fidelity $(RESULTS); \
	$(BIN)/lcbench plot $(RESULTS)/fidelity --out figures/fidelity; \
	$(BIN)/lcbench sweep bench/experiments/fidelity.toml --preset twice --out $(RESULTS) \
	  --data-dir $(CIFAR10_DIR) || test $$? -eq 1; \
	$(BIN)/lcbench table fidelity $(RESULTS)/fidelity-twice; \
	$(BIN)/python -m bench.studies.dni_signal --data-dir $(CIFAR10_DIR) --out $(RESULTS)/fidelity-dni-signal.csv

# Which recipe makes DNI and cDNI learn where the LC tables state none: every candidate on the
# fidelity check's setting and the learning check's (bench.studies.dni_recipe; ~80 min).
dni-recipe: $(STAMP) data
	@if [ ! -f $(CIFAR10_ZIP) ]; then echo "dni-recipe: skipped, $(CIFAR10_ZIP) is absent"; exit 0; fi; \
	set -e; $(MAKE) -s cifar10; \
	$(BIN)/python -m bench.studies.dni_recipe --data-dir $(CIFAR10_DIR) \
	  --out $(RESULTS)/dni-recipe.csv --figure figures/dni-recipe.png

fidelity-gpu: $(STAMP)
	@if [ ! -f $(CIFAR10_ZIP) ]; then echo "fidelity-gpu: skipped, $(CIFAR10_ZIP) is absent"; exit 0; fi; \
	set -e; $(MAKE) -s cifar10; \
	$(BIN)/lcbench sweep bench/experiments/fidelity-gpu.toml --out $(RESULTS)/gpu --data-dir $(CIFAR10_DIR) || test $$? -eq 1; \
	$(BIN)/lcbench table fidelity $(RESULTS)/gpu

dni-comparison: $(STAMP)
	@if [ ! -f $(CIFAR10_ZIP) ]; then echo "dni-comparison: skipped, $(CIFAR10_ZIP) is absent"; exit 0; fi; \
	set -e; $(MAKE) -s cifar10; \
	$(BIN)/lcbench sweep bench/experiments/dni-comparison.toml $(if $(filter cpu,$(PRESET)),--preset cpu) \
	  --out $(RESULTS) --data-dir $(CIFAR10_DIR) || test $$? -eq 1; \
	$(BIN)/lcbench table dni-comparison $(RESULTS)

# A sweep exits with 1 when some runs failed: they are recorded, and the table shows what ran.
# PLAN=1: the preset's plan (each run's state and price on PROFILE, totals on DEVICES), nothing run.
PROFILE ?= h100-sxm-nvlink
DEVICES ?= 8
reproduce-table2: $(STAMP) data
ifdef PLAN
	$(BIN)/lcbench sweep bench/experiments/table2.toml --preset $(PRESET) --out $(RESULTS)/$(PRESET) \
	  --plan --profile $(PROFILE) --devices $(DEVICES)
else
	$(BIN)/lcbench sweep bench/experiments/table2.toml --preset $(PRESET) --out $(RESULTS)/$(PRESET) \
	  || test $$? -eq 1
	$(BIN)/lcbench table table2 $(RESULTS)/$(PRESET)
	$(BIN)/lcbench plot $(RESULTS)/$(PRESET)/table2 --out figures
	$(BIN)/lcbench scale $(SCALE_$(PRESET)) --results $(RESULTS)/$(PRESET)/table2 \
	  --out $(RESULTS)/$(PRESET)/scale
endif

plot: $(STAMP)
	$(BIN)/lcbench plot $(RESULTS)/$(PRESET)/table2 --out figures

# The README's two figures, from the smoke preset's results (make reproduce-table2 PRESET=smoke)
docs-figures: $(STAMP)
	$(BIN)/lcbench plot $(RESULTS)/smoke/table2 --out $(RESULTS)/smoke/figures
	cp $(RESULTS)/smoke/figures/accuracy.png docs/figures/accuracy.png
	cp $(RESULTS)/smoke/scale/scale-small-cnn-h100-25gbe.png docs/figures/scale-map.png

# The GPU part runs where CUDA is (one line saying it was skipped elsewhere).
plan-check: $(STAMP) data
	$(BIN)/python -m bench.cluster.plan_check --preset smoke --rounds 5 --out $(RESULTS)/plan-check

bench: $(STAMP) data
	$(BIN)/python -m bench.perf.benchmark
	$(BIN)/python -m bench.perf.gpu

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
