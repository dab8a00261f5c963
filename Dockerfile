# epp, and the vLLM simulator (python -m epp_bench.sim) for CPU-only clusters, in one small image.
#
#   make image                     # docker build -t epp:dev .
#   docker run --rm epp:dev --help
#   docker run --rm --entrypoint python epp:dev -m epp_bench.sim --count 1 --base-port 8000 --host 0.0.0.0
#
# Runs as uid 65532 with a read-only root filesystem: nothing is written at run time except
# under /tmp (mount an emptyDir there). epp makes its self-signed TLS certificate in memory.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: epp, epp-bench and their dependencies as wheels into a venv -------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the package builds read: epp's (pyproject, its readme, epp and scorers) and the bench's
# (bench/: its pyproject, readme and epp_bench; bench/inference-perf comes along, unused).
COPY pyproject.toml README.md ./
COPY epp ./epp
COPY scorers ./scorers
COPY bench ./bench
# The bench distribution without extras (no plots): the simulator (epp_bench.sim) for CPU-only clusters;
# its dependencies (aiohttp, prometheus-client, ...) are epp's own.
# Bytecode is compiled here, since the root filesystem is read-only at run time.
# xds-protos installs an old copy of OpenTelemetry's protos over opentelemetry-proto's (the OTLP
# exporter of --tracing needs the latter): they are put back.
RUN pip install --upgrade pip \
 && pip install . ./bench \
 && pip install --no-deps --force-reinstall \
      "opentelemetry-proto==$(python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')" \
 && python -m compileall -q /opt/venv/lib

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 65532:65532
# ext_proc gRPC, gRPC health, Prometheus metrics
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
