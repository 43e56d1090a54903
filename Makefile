# HealthLab — one command surface for people and CI.
#   make demo   set up, then run the walkthrough on the embedded chain
#   make test   set up, lint, check contract artifacts, run the tests
#   make lab    set up, then open JupyterLab on notebooks/
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
export RAY_USAGE_STATS_ENABLED := 0
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo lab node test lint contracts contracts-check constraints bench clean help

help:
	@echo "make setup | demo | test | lab | node | lint | bench | contracts | clean"

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/python -m healthlab.demo
	@for nb in notebooks/*.ipynb; do \
	  $(BIN)/healthlab report $$(basename $$nb .ipynb) --out reports || exit 1; \
	done

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

node: setup
	$(BIN)/healthlab node --port 8545 --state .healthlab/anvil-state.json

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
	$(BIN)/pytest $(PYTEST_ARGS)

# Run the study report notebook headless (papermill) into reports/ as HTML.
.PHONY: report
report: setup
	$(BIN)/healthlab report 06_study_report --out reports

bench: setup
	$(BIN)/python benchmarks/gas.py
	$(BIN)/python benchmarks/encrypted_stats.py
	$(BIN)/python benchmarks/federated.py

clean:
	rm -rf $(VENV) .tools contracts/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Re-resolve the dependencies in a scratch venv and pin them in constraints.txt.
constraints:
	rm -rf /tmp/healthlab-lock && python3 -m venv /tmp/healthlab-lock
	/tmp/healthlab-lock/bin/pip install -q --upgrade pip && /tmp/healthlab-lock/bin/pip install -q -e ".[dev]"
	( echo "# Versions tested together (pip freeze of a fresh 'pip install -e .[dev]', Python 3.11)."; \
	  echo "# Used as: pip install -c constraints.txt -e .[dev]. Regenerate with: make constraints"; \
	  /tmp/healthlab-lock/bin/pip freeze --exclude-editable ) > constraints.txt
