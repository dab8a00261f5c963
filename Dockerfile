# epp, and the vLLM simulator (python -m epp_bench.sim) for CPU-only clusters, in one small image.
#
#   make image                     # docker build -t epp:dev .
#   docker run --rm epp:dev --help
#   docker run --rm --entrypoint python epp:dev -m epp_bench.sim --count 1 --base-port 8000 --host 0.0.0.0
#
# Runs as uid 65532 with a read-only root filesystem: nothing is written at run time except
# under /tmp (mount an emptyDir there) and the TLS certificate directory (deploy/base).

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
RUN pip install --upgrade pip \
 && pip install . ./bench \
 && python -m compileall -q /opt/venv/lib

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# openssl makes the self-signed ext_proc certificate in deploy/base's init container
# (the slim image has it through ca-certificates; install it if a base image lacks it).
RUN command -v openssl >/dev/null \
 || (apt-get update \
     && apt-get install -y --no-install-recommends openssl \
     && rm -rf /var/lib/apt/lists/*)
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
