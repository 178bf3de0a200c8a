# syntax=docker/dockerfile:1.7
# SGLang engine with the lenpred tap plugin (entry point sglang.srt.plugins:lenpred_tap).
#
#   docker build -f docker/engine.Dockerfile -t ghcr.io/lenpred/lenpred-engine:0.1.0 .
#   # CPU (Intel Xeon) engines: first build SGLang's own CPU image from its repo
#   #   (docker build -f docker/xeon.Dockerfile -t sglang-cpu:v0.5.23 . in sgl-project/sglang@v0.5.23), then
#   docker build -f docker/engine.Dockerfile --build-arg SGLANG_IMAGE=sglang-cpu:v0.5.23 \
#     -t ghcr.io/lenpred/lenpred-engine:0.1.0-cpu .
#
# The plugin activates only when SGLANG_PLUGINS=lenpred_tap is set (the Helm chart sets it together
# with LENPRED_TAP_* / LENPRED_SIDECAR). Nothing of the base image is upgraded: every package
# already installed is pinned as a constraint, so the build fails loudly instead of replacing
# SGLang's torch or SGLang itself.
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23

FROM ${SGLANG_IMAGE} AS build
ENV PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /src
COPY . .
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${SGLANG_IMAGE}
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
