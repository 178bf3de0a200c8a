# syntax=docker/dockerfile:1.7
# lenpred prediction sidecar: gRPC service hosting the EGTP/PLP heads (GPU optional, CPU fallback).
#
#   # GPU + CPU (PyPI's torch bundles CUDA; several GB):
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/lenpred/lenpred-sidecar:0.1.0 .
#   # CPU only (~1 GB smaller torch from the PyTorch CPU index):
#   docker build -f docker/sidecar.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t ghcr.io/lenpred/lenpred-sidecar:0.1.0-cpu .
#   docker/build.sh sidecar       # picks the CPU torch when one is at hand (a local wheel or that index)
#
# TORCH_REQUIREMENT pins the torch release; a wheel put in docker/wheels/ (build.sh --torch-wheel)
# is offered to pip first, so a CPU wheel kept on disk works without any index but PyPI.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels . \
 && mkdir -p /wheels/extra \
 && if ls docker/wheels/*.whl >/dev/null 2>&1; then cp docker/wheels/*.whl /wheels/extra/; fi

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=""
ARG TORCH_REQUIREMENT="torch==2.14.1"
ARG TORCH_INDEX_URL=""
LABEL org.opencontainers.image.title="lenpred-sidecar" \
      org.opencontainers.image.description="lenpred sidecar: output-length prediction heads (EGTP/PLP) over gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/lenpred/lenpred" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      io.lenpred.torch="${TORCH_REQUIREMENT}"
ENV PATH=/opt/lenpred/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=2 \
    MKL_NUM_THREADS=2
# One layer: tini, the non-root user (uid/gid 10001, as in the chart), torch, lenpred[sidecar],
# the package list. No apt lists, pip caches or compilers stay behind.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 lenpred \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lenpred --shell /usr/sbin/nologin lenpred \
 && python3 -m venv /opt/lenpred \
 && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT"; \
    else pip install --find-links /wheels/extra "$TORCH_REQUIREMENT"; fi \
 && pip install --find-links /wheels/extra "$(ls /wheels/lenpred-*.whl)[sidecar]" \
 && pip freeze --all > /opt/lenpred/sbom.txt \
 && lenpred sidecar --help >/dev/null \
 && python -c 'import torch, lenpred.sidecar.server; print("torch", torch.__version__)' \
 && rm -rf /root/.cache /tmp/*
USER 10001:10001
WORKDIR /home/lenpred
EXPOSE 50061 9091
ENTRYPOINT ["tini", "--", "lenpred"]
CMD ["sidecar", "--host", "0.0.0.0", "--port", "50061", "--metrics-port", "9091"]
