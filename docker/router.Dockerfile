# syntax=docker/dockerfile:1.7
# lenpred router: the OpenAI-compatible front door over N SGLang replicas. CPU only, no torch.
#
#   docker build -f docker/router.Dockerfile -t ghcr.io/lenpred/lenpred-router:0.1.0 .
#   docker/build.sh router        # the same with docker or buildah, labels and package list
#
# PYTHON_IMAGE: any Debian-based image with Python 3.11 and its venv module (the default, or the
# debootstrapped base docker/build.sh makes when no registry is reachable).
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=""
LABEL org.opencontainers.image.title="lenpred-router" \
      org.opencontainers.image.description="lenpred router: length-aware OpenAI-compatible router over SGLang replicas" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/lenpred/lenpred" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/lenpred/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1
# One layer: tini (PID 1 that forwards SIGTERM and reaps), the non-root user the chart runs as
# (uid/gid 10001), the venv with lenpred[router]; then the package list and a check that torch
# did not sneak in. No apt lists, pip caches or compilers stay behind.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 lenpred \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lenpred --shell /usr/sbin/nologin lenpred \
 && python3 -m venv /opt/lenpred \
 && pip install "$(ls /wheels/lenpred-*.whl)[router]" \
 && pip freeze --all > /opt/lenpred/sbom.txt \
 && if python -c 'import torch' 2>/dev/null; then echo "torch must not be in the router image" >&2; exit 1; fi \
 && lenpred router serve --help >/dev/null \
 && rm -rf /root/.cache /tmp/*
USER 10001:10001
WORKDIR /home/lenpred
EXPOSE 8080
ENTRYPOINT ["tini", "--", "lenpred"]
CMD ["router", "serve", "--host", "0.0.0.0", "--port", "8080"]
