# epp, and the vLLM simulator (python -m bench.sim) for CPU-only clusters, in one small image.
#
#   make image                     # docker build -t epp:dev .
#   docker run --rm epp:dev --help
#   docker run --rm --entrypoint python epp:dev -m bench.sim --count 1 --base-port 8000 --host 0.0.0.0
#
# Runs as uid 65532 with a read-only root filesystem: nothing is written at run time except
# under /tmp (mount an emptyDir there) and the TLS certificate directory (deploy/base).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: epp and its dependencies as wheels into a venv --------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the package build reads (pyproject's readme, the three packages).
COPY pyproject.toml README.md ./
COPY epp ./epp
COPY scorers ./scorers
COPY bench ./bench
# No extras: the simulator needs only epp's own dependencies (aiohttp, prometheus-client, ...).
# Bytecode is compiled here, since the root filesystem is read-only at run time.
RUN pip install --upgrade pip \
 && pip install . \
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
