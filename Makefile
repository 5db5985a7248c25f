# Two commands from nothing: `make run` (the pipeline) and `make test` (the suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help install run experiments test test-ci test-all lint serve team-up team-down bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# uv installs the pinned set (constraints.txt, uv included) in well under a minute where pip takes minutes;
# INSTALLER=pip, or any failure of uv, installs the same set with plain pip.
INSTALLER ?= uv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install --quiet -c constraints.txt uv && \
	    $(BIN)/python -m uv pip install --quiet --python $(BIN)/python -c constraints.txt -e '.[dev]'; then :; \
	else \
	  [ "$(INSTALLER)" = pip ] || echo "uv could not install the project: installing with pip"; \
	  $(BIN)/python -m pip install --quiet --upgrade pip && \
	  $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'; \
	fi
	@touch $@

install: $(STAMP) ## Create .venv and install the project with the verified versions (constraints.txt)

run: $(STAMP) ## Run the whole pipeline on the embedded synthetic dataset
	$(BIN)/rain run

experiments: $(STAMP) ## Run the paper's experiment grid (Tables 1-4, Figure 5); finished runs are kept
	$(BIN)/rain experiments

# The suite waits on servers, clusters and subprocesses more than it computes: two processes (pytest-xdist) on
# 2 cores. Tests that read the session's trained project share one process (tests/conftest.py). Every run
# prints its slowest 15.
TEST_WORKERS ?= 2
PYTEST := PYTHONFAULTHANDLER=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15

test: $(STAMP) ## Run the default test suite (heavy and slow tests excluded)
	$(PYTEST) -m "not slow and not heavy"

test-ci: $(STAMP) ## Run CI's tier: the default suite and the heavy e2e tests (slow ones excluded)
	$(PYTEST) -m "not slow"

test-all: $(STAMP) ## Run every test, slow ones included
	$(PYTEST)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy

serve: $(STAMP) ## Serve Prefect deployments rain/full and rain-grid/experiments (server on 127.0.0.1:4200)
	$(BIN)/rain serve

TEAM_DIR ?= .team

team-up: $(STAMP) ## Start the team's PostgreSQL, MLflow and Prefect servers in TEAM_DIR (README: Working as a team)
	$(BIN)/rain team up --dir $(TEAM_DIR)

team-down: $(STAMP) ## Stop the team's services of TEAM_DIR (their data stays)
	$(BIN)/rain team down --dir $(TEAM_DIR)

bench: $(STAMP) ## Run the benchmarks under bench/
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean: ## Remove generated data, models, reports, runs and local tracking state (keeps .venv)
	rm -rf data models reports runs experiments mlflow.db mlartifacts .prefect .dvc/cache .dvc/tmp
