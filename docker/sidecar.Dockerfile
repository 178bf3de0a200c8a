# syntax=docker/dockerfile:1.7
# lenpred prediction sidecar: gRPC service hosting the EGTP/PLP heads (GPU optional, CPU fallback).
#
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/lenpred/lenpred-sidecar:0.1.0 .
#   # CPU-only image (smaller torch):
#   docker build -f docker/sidecar.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t ghcr.io/lenpred/lenpred-sidecar:0.1.0-cpu .
#
# The default torch is PyPI's (Linux x86_64 wheels bundle the CUDA runtime), so one image serves
# GPU nodes (--device auto|cuda) and CPU nodes (--device auto|cpu).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=2 \
    MKL_NUM_THREADS=2
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 lenpred \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lenpred --shell /usr/sbin/nologin lenpred
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    if [ -n "$TORCH_INDEX_URL" ]; then python -m pip install --index-url "$TORCH_INDEX_URL" torch; fi \
 && python -m pip install /wheels/lenpred-*.whl \
 && lenpred --help >/dev/null
USER 10001:10001
WORKDIR /home/lenpred
EXPOSE 50061 9091
# tini as PID 1 forwards SIGTERM to the server and reaps children.
ENTRYPOINT ["tini", "--", "lenpred"]
CMD ["sidecar", "--host", "0.0.0.0", "--port", "50061", "--metrics-port", "9091"]
