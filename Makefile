# crossmodal: `make demo`, `make test`, `make ui`. Each sets up .venv first (once; again only
# when pyproject.toml changes). `make lint` checks style (ruff); CI runs it before the tests.
# `make cluster-up` / `make cluster-down`: a local Ray head + MLflow server for `crossmodal submit`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS ?= runs
UI_PORT ?= 5000
# The CPU wheel of torch lies on these machines; installing it first keeps pip from resolving
# a multi-GB CUDA build for the packages that depend on torch.
TORCH := torch==2.13.0
PIP_INSTALL := $(BIN)/python -m pip --disable-pip-version-check install --progress-bar off

.PHONY: setup demo test test-fast drill lint ui clean cluster-up cluster-down

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -q $(TORCH)
	$(PIP_INSTALL) -q -e '.[dev]'
	@touch $@
	@echo "crossmodal installed in $(VENV)"

demo: setup
	$(BIN)/crossmodal run pipelines/configs/demo.yaml

test: setup
	$(BIN)/python -m pytest

# Unit tests only: no Ray cluster, no spawned processes, no multi-minute runs.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not spawn and not ray"

# The reliability drill: bad inputs, bad configs, killed workers and drivers, lost services,
# untrusted files; prints one table (also in $(RUNS)/drill/table.md), fails if any case fails.
drill: setup
	$(BIN)/python -m tests.drill --out $(RUNS)/drill

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui \
		--backend-store-uri sqlite:///$(abspath $(RUNS))/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# A Ray head with its dashboard and an MLflow server on 127.0.0.1, state and logs in runs/cluster
# (ports: RAY_DASHBOARD_PORT, MLFLOW_PORT); `up` prints the exports `crossmodal submit` needs.
cluster-up: setup
	CROSSMODAL_BIN=$(abspath $(BIN)) CLUSTER_DIR=$(abspath $(RUNS))/cluster infra/local/cluster.sh up

cluster-down:
	CROSSMODAL_BIN=$(abspath $(BIN)) CLUSTER_DIR=$(abspath $(RUNS))/cluster infra/local/cluster.sh down

clean:
	rm -rf $(RUNS)
