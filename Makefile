# HealthLab — one command surface for people and CI.
#   make demo       set up, then run the walkthrough and every notebook on the
#                   embedded chain (deterministic, self-contained) into reports/
#   make test       set up, lint, check contract artifacts, run the tests
#   make lab        set up, start (or reuse) the shared local node, open JupyterLab
#   make dashboard  set up, start (or reuse) the shared node, serve the owner's
#                   approval notebook (02) with Voilà
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# `make test` runs pytest on this many workers (pytest-xdist), a test file per worker at
# a time (their module fixtures are set up once); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
# The shared local node (anvil) of `make lab` and `make dashboard`: its chain is kept
# in $(CHAIN_DIR)/anvil-state.json across runs; `make chain-down` stops it.
CHAIN_PORT ?= 8545
CHAIN_DIR ?= .healthlab
LAB_PORT ?= 8888
DASHBOARD_PORT ?= 8866
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
export RAY_USAGE_STATS_ENABLED := 0
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo lab dashboard chain chain-status chain-down node test lint \
	contracts contracts-check constraints bench clean help

help:
	@echo "make setup         install Debian packages, .venv, npm tools (idempotent)"
	@echo "make demo          walkthrough + every notebook on the embedded chain -> reports/"
	@echo "make lab           JupyterLab on notebooks/, on the shared local node"
	@echo "make dashboard     the owner's approval page (02) with Voila, on the shared node"
	@echo "make chain         start (or reuse) the shared node; chain-status, chain-down"
	@echo "make node          a local anvil node in the foreground (Ctrl-C stops it)"
	@echo "make test | lint | bench | contracts | report | constraints | clean"
	@echo "Ports: CHAIN_PORT=$(CHAIN_PORT) LAB_PORT=$(LAB_PORT)" \
	  "DASHBOARD_PORT=$(DASHBOARD_PORT); chain state in CHAIN_DIR=$(CHAIN_DIR)"

setup:
	@scripts/setup.sh

# The embedded chain on purpose, so the results are the same everywhere: `healthlab
# demo` ignores HEALTHLAB_RPC_URL, and prints one line per notebook and where the
# reports are.
demo: setup
	$(BIN)/python -m healthlab.demo
	$(BIN)/healthlab demo --out reports

# SHARED_HOST=1: start even where other users run processes (they can reach it)
CHAIN_UP = $(BIN)/healthlab chain up --port $(CHAIN_PORT) --dir $(CHAIN_DIR) \
	$(if $(SHARED_HOST),--shared-host)

lab: setup
	@url=$$($(CHAIN_UP)) && \
	HEALTHLAB_RPC_URL=$$url $(BIN)/jupyter lab --notebook-dir=notebooks \
	  --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) $(ROOT_FLAG)

dashboard: setup
	@url=$$($(CHAIN_UP)) && \
	HEALTHLAB_RPC_URL=$$url $(BIN)/voila notebooks/02_approve_requests.ipynb \
	  --Voila.ip=127.0.0.1 --port=$(DASHBOARD_PORT) --Voila.port_retries=0 \
	  --no-browser --token

chain: setup
	@$(CHAIN_UP) >/dev/null

chain-status:
	@$(BIN)/healthlab chain status --port $(CHAIN_PORT) --dir $(CHAIN_DIR)

chain-down:
	@$(BIN)/healthlab chain down --dir $(CHAIN_DIR)

node: setup
	$(BIN)/healthlab node --port $(CHAIN_PORT) --state $(CHAIN_DIR)/anvil-state.json

contracts: setup
	$(BIN)/python contracts/compile.py

contracts-check:
	$(BIN)/python contracts/compile.py --check

lint: setup
	$(BIN)/ruff check healthlab tests benchmarks contracts/compile.py data_samples/generate.py
	$(BIN)/ruff format --check healthlab tests benchmarks contracts/compile.py data_samples/generate.py
	$(BIN)/mypy
	scripts/slither.sh

test: setup lint contracts-check
	$(BIN)/python data_samples/generate.py --check
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Run the study report notebook headless (papermill) into reports/ as HTML.
.PHONY: report
report: setup
	$(BIN)/healthlab report 06_study_report --out reports

bench: setup
	$(BIN)/python benchmarks/gas.py
	$(BIN)/python benchmarks/encrypted_stats.py
	$(BIN)/python benchmarks/audit.py
	$(BIN)/python benchmarks/glm.py
	$(BIN)/python benchmarks/survival.py
	$(BIN)/python benchmarks/federated.py
	$(BIN)/python benchmarks/storage.py
	$(BIN)/python benchmarks/deploy.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/deployed_stats.py

clean:
	rm -rf $(VENV) .tools contracts/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Re-resolve the dependencies in a scratch venv and pin them in constraints.txt.
constraints:
	rm -rf /tmp/healthlab-lock && python3 -m venv /tmp/healthlab-lock
	/tmp/healthlab-lock/bin/pip install -q --upgrade pip && /tmp/healthlab-lock/bin/pip install -q -e ".[dev]"
	( echo "# Versions tested together (pip freeze of a fresh 'pip install -e .[dev]', Python 3.11)."; \
	  echo "# Used as: pip install -c constraints.txt -e .[dev]. Regenerate with: make constraints"; \
	  /tmp/healthlab-lock/bin/pip freeze --exclude-editable ) > constraints.txt
