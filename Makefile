# Make targets for the MNIST pipeline. `make help` lists them.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLOTS_PAGE := .dvc/offline-plots.html
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: help install repro test test-all lint ui serve exp sweep ensemble accuracy accuracy-bf16 bench bench-ddp bench-gpu report compare server server-stop clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) $(PLOTS_PAGE) ## Create .venv with every pinned dependency (quick when already done)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/mnist-pipeline build-kernels || true  # (on failure, training uses the eager modules)
	touch $(STAMP)

# `dvc plots show` with vega inline: every plot draws offline (.dvc/config.local names it).
$(PLOTS_PAGE): $(STAMP) src/mnist_pipeline/plots_page.py
	{ $(VENV)/bin/mnist-pipeline plots-page $@ && \
	  $(VENV)/bin/dvc config --local plots.html_template $(notdir $@); } || \
	  echo "warning: no offline plots page; dvc plots show will load vega from the internet"

repro: install ## Run the pipeline (dvc repro); offline, set MNIST_MIRROR=/path/to/mnist
	dvc repro

test: install ## Run the test suite (not the slow tests)
	$(PY) -m pytest -m "not slow"

test-all: install ## Run every test, the slow accuracy tests included
	$(PY) -m pytest

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check src stages tests bench

ui: install ## Open the MLflow UI on the local store (http://127.0.0.1:5000)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host $(HOST) --port $(PORT)

SERVE_PORT ?= 5001
serve: install ## Serve models:/mnist-cnn@champion on http://127.0.0.1:5001/invocations (SERVE_PORT=P: another port)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db} mlflow models serve \
		-m models:/mnist-cnn@champion --env-manager local --host $(HOST) --port $(SERVE_PORT)

ALLOWED_HOSTS ?=
POSTGRES_PORT ?=
server: install ## Start the shared tracking server in .tracking/ (docs/team.md: HOST, ALLOWED_HOSTS, POSTGRES_PORT)
	mnist-pipeline server start --host $(HOST) --port $(PORT) $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS)) \
		$(if $(POSTGRES_PORT),--postgres-port $(POSTGRES_PORT))

server-stop: ## Stop the shared tracking server
	mnist-pipeline server stop

SET ?=
exp: install ## Run a named recipe as a DVC experiment: make exp RECIPE=best-single [SET="-S k=v"]
	flags=$$($(PY) -m mnist_pipeline.recipes recipes/$(RECIPE).yaml) || exit 1; \
	dvc exp run -n $(RECIPE)-$$(date +%H%M%S) $$flags $(SET)

SWEEP ?= -S 'train.lr=0.001,0.003'
JOBS ?= 2
sweep: install ## Queue an experiment per value of SWEEP (-S 'k=a,b') and run JOBS at a time
	failed=$$(dvc queue status | grep -cE ' Failed *$$'); \
	dvc exp run --queue $(SWEEP) && dvc queue start -j $(JOBS) || exit 1; \
	while dvc queue status | grep -qE ' (Queued|Running) *$$'; do sleep 10; done; \
	dvc queue status; \
	test "$$(dvc queue status | grep -cE ' Failed *$$')" = "$$failed" || \
	{ echo "some experiments failed: dvc queue logs NAME"; exit 1; }

# The metrics and params that differ between experiments; not the dependencies' hashes.
COMPARE := --only-changed --drop 'Created|.*/.*|duration_seconds|train_accuracy|epochs'
compare: install ## Compare experiments: the metrics and the params that differ (120 columns)
	dvc exp show $(COMPARE)

SEEDS ?= 0 1 2 3 4 5 6
MEMBER = $(or $(RECIPE),best-single)
ensemble: install ## The ensemble recipe: RECIPE (best-single) with SEEDS="0 1 2 3 4 5 6" [SET="-S k=v"], averaged, registered
	flags=$$($(PY) -m mnist_pipeline.recipes recipes/$(MEMBER).yaml) || exit 1; \
	stamp=$$(date +%Y%m%d-%H%M%S); names=; \
	for seed in $(SEEDS); do \
		name=$(MEMBER)-seed$$seed-$$stamp; names="$$names $$name"; \
		dvc exp run --queue -n $$name $$flags -S train.seed=$$seed $(SET) || exit 1; \
	done; \
	dvc exp run --run-all -j 1; \
	mnist-pipeline ensemble --experiments $$names

accuracy: install ## Train the recipes over 3 seeds; write bench/results/accuracy.json (long on a CPU)
	$(PY) bench/accuracy.py --recipe reference --recipe best-single --seeds 0 1 2

accuracy-bf16: install ## The default recipe in fp32 and under bf16 autocast, 3 seeds; write bench/results/bf16.json
	$(PY) bench/accuracy.py --recipe best-single --recipe best-single:amp=bf16 --seeds 0 1 2 \
		--json bench/results/bf16.json

bench: install ## Time training against the reference loop, quiet and beside a busy process; profile a step
	$(PY) bench/train_speed.py --device cpu --steps 150 --repeats 3 --variant default \
		--variant unfused --variant plain+channels_last --variant plain --variant bf16 \
		--variant compile --variant longspin --load 1 --loaded reference --loaded default \
		--loaded unfused --loaded bf16 --loaded longspin --convolutions \
		--json bench/results/speed.json
	$(PY) bench/step_profile.py --json bench/results/profile.json

bench-ddp: install ## One training process against two (torchrun); write bench/results/ddp.json
	$(PY) bench/train_speed.py --device cpu --steps 150 --repeats 3 --variant default \
		--variant ddp2 --json bench/results/ddp.json

bench-gpu: install ## On a CUDA GPU: default and bf16 against the reference, and time to 99.5%; write bench/results/cuda.json
	$(PY) bench/train_speed.py --device cuda --repeats 3 --variant default --variant bf16 \
		--recipe-file recipes/best-single.yaml --json bench/results/cuda.json

report: install ## Regenerate bench/RESULTS.md and README.md's accuracy table from bench/results/*.json
	$(PY) bench/report.py --readme README.md > bench/RESULTS.md

clean: ## Remove the virtual environment and caches (not data or runs)
	rm -rf $(VENV) .pytest_cache .ruff_cache
