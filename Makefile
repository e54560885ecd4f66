# Two commands matter: `make demo` and `make test`. Both install what they need and are idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PKGS   := runtime/modelops_runtime operator/modelops_operator localcluster/modelops_local

.PHONY: test lint unit demo deps kubernetes cluster-up cluster-down bench bench-operator clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[runtime,operator,dev]'
	@touch $@

deps: $(STAMP)

# Kubernetes 1.20 control-plane binaries, built once into ~/.cache/modelops (about 10 minutes).
kubernetes:
	bash localcluster/build-kubernetes.sh

lint: deps
	$(BIN)/ruff check .
	$(BIN)/mypy $(PKGS)
	$(BIN)/lint-imports

unit: deps
	$(BIN)/pytest tests/unit tests/component

test: deps kubernetes lint
	$(BIN)/pytest

cluster-up: deps kubernetes
	$(BIN)/modelops local up

cluster-down: deps
	$(BIN)/modelops local down

demo: deps kubernetes
	$(BIN)/python -m modelops_local.demo

bench: deps
	bash benchmarks/runtime_bench.sh

bench-operator: deps kubernetes
	$(BIN)/python benchmarks/operator_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
