# syntax=docker/dockerfile:1.7
# lenpred router: OpenAI-compatible front door over N SGLang replicas (CPU only).
#
#   docker build -f docker/router.Dockerfile -t ghcr.io/lenpred/lenpred-router:0.1.0 .
#
# The router runs no model, so torch (a dependency of the lenpred package) comes from the CPU
# index to keep the image small.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1
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
EXPOSE 8080
ENTRYPOINT ["tini", "--", "lenpred"]
CMD ["router", "serve", "--host", "0.0.0.0", "--port", "8080"]
