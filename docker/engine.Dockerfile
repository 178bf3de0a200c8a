# syntax=docker/dockerfile:1.7
# GPU SGLang engine with the lenpred tap plugin (entry point sglang.srt.plugins:lenpred_tap), built
# FROM the official SGLang image. Needs a registry that serves it (Docker Hub); the machines this
# project is developed on reach none, so this image is built by users (docs/DEPLOY.md):
#
#   docker build -f docker/engine.Dockerfile -t ghcr.io/lenpred/lenpred-engine:0.1.0 .
#   docker/build.sh engine          # the same, with labels and the package list
#
# (SGLang's own Xeon CPU image works as SGLANG_IMAGE too; for a CPU engine built anywhere, without a
# registry, see docker/engine-cpu.Dockerfile.)
#
# The plugin activates only when SGLANG_PLUGINS=lenpred_tap is set (the Helm chart sets it together
# with LENPRED_TAP_* / LENPRED_SIDECAR). Nothing of the base image is upgraded: every package
# already installed is pinned as a constraint, so the build fails loudly instead of replacing
# SGLang's torch or SGLang itself.
ARG SGLANG_IMAGE=docker.io/lmsysorg/sglang:v0.5.23

FROM ${SGLANG_IMAGE} AS build
ENV PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /src
COPY . .
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${SGLANG_IMAGE}
ARG SGLANG_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=""
LABEL org.opencontainers.image.title="lenpred-engine" \
      org.opencontainers.image.description="SGLang 0.5.23 with the lenpred tap plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/lenpred/lenpred" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${SGLANG_IMAGE}"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/lenpred \
    HF_HOME=/models/hf
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lenpred needs Python >= 3.11 in the SGLang base image")' \
 && python3 -c 'import sglang, sys; v = sglang.__version__; sys.exit(0 if v == "0.5.23" else f"base image has sglang {v}, lenpred[sglang] pins 0.5.23")' \
 && python3 -m pip list --format=freeze > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt "$(ls /wheels/lenpred-*.whl)[sglang]" \
 && rm -f /tmp/base-constraints.txt \
 && mkdir -p /opt/lenpred && python3 -m pip freeze --all > /opt/lenpred/sbom.txt \
 && python3 -c 'from importlib.metadata import entry_points as e; assert any(p.name == "lenpred_tap" for p in e(group="sglang.srt.plugins")), "lenpred_tap entry point missing"'
# Non-root user matching the chart's securityContext (uid/gid 10001); home and model cache are
# writable mounts in the pod (emptyDir or PVC), created here too for plain `docker run`.
RUN (getent group 10001 >/dev/null || groupadd --gid 10001 lenpred) \
 && (getent passwd 10001 >/dev/null || useradd --uid 10001 --gid 10001 --home-dir /home/lenpred --shell /usr/sbin/nologin lenpred) \
 && mkdir -p /home/lenpred /models/hf \
 && chown -R 10001:10001 /home/lenpred /models
USER 10001:10001
WORKDIR /home/lenpred
EXPOSE 30000
ENTRYPOINT []
CMD ["python3", "-m", "sglang.launch_server", "--help"]
