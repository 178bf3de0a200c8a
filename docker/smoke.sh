#!/usr/bin/env bash
# Run the built images end to end and check that requests are answered AND predicted.
#
#   docker/smoke.sh                   engine = the engine-cpu image (real SGLang 0.5.23 + tap, in a container)
#   docker/smoke.sh --engine host     engine = `lenpred engine` from this checkout's venv (the same
#                                     SGLang + tap, outside a container; what CI uses: no 11 GB image)
#
# Starts, each on its own free port of 127.0.0.1 (host network): Redis with a password (the host's
# redis-server), the sidecar image, the engine, the router image; sends real prompts as chat
# completions through the router (the client runs inside the router image) and checks in Redis
# that the sidecar predicted each one from the engine's hidden states. An emulated engine cannot
# be used: it has no hidden states, so nothing would be predicted.
#
# Containers run with `buildah run` (chroot isolation, host network, the image's own user and
# entrypoint), or `docker run` where a Docker daemon answers. Exit 0 only if every request was
# answered and predicted; the last line is a JSON summary like the demo's, with timings.
#
# Options: --engine image|host   --requests N (4)   --max-tokens N (48)   --keep-logs
set -euo pipefail
LOG_PREFIX=smoke
# shellcheck source=docker/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$LENPRED_ROOT"

engine_mode=image requests=4 max_tokens=48 keep_logs=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --engine) engine_mode=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (--help)" ;;
  esac
done
[[ "$engine_mode" == image || "$engine_mode" == host ]] || die "--engine image|host, got '$engine_mode'"

ROUTER_IMAGE=$(image_ref router)
SIDECAR_IMAGE=$(image_ref sidecar -cpu)
image_exists "$SIDECAR_IMAGE" || SIDECAR_IMAGE=$(image_ref sidecar)
ENGINE_IMAGE=$(image_ref engine -cpu)
for img in "$ROUTER_IMAGE" "$SIDECAR_IMAGE"; do
  image_exists "$img" || die "$img is not in the local store ($BUILDER, storage $STORAGE_DRIVER): docker/build.sh first"
done
if [[ "$engine_mode" == image ]]; then
  image_exists "$ENGINE_IMAGE" || die "$ENGINE_IMAGE is not in the local store: docker/build.sh engine-cpu (or --engine host)"
else
  LENPRED_BIN=${LENPRED_BIN:-$LENPRED_ROOT/${LENPRED_VENV:-.venv}/bin/lenpred}
  [[ -x "$LENPRED_BIN" ]] || die "--engine host needs this checkout's venv (./dev.sh test once) or LENPRED_BIN"
fi
command -v redis-server >/dev/null || die "redis-server not found: apt-get install -y redis-server"

work=$(mktemp -d /tmp/lenpred-smoke.XXXXXX)
ns=smoke
t_start=$SECONDS
pids=() containers=()

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# All processes below a PID (buildah run -> tini -> server -> its workers).
tree() {
  local p kids
  for p in "$@"; do
    echo "$p"
    kids=$(ps -o pid= --ppid "$p" 2>/dev/null || true)
    [[ -z "$kids" ]] || tree $kids
  done
}

cleanup() {
  local rc=$? all=() p
  for p in ${pids[@]+"${pids[@]}"}; do all+=($(tree "$p")); done
  if [[ ${#all[@]} -gt 0 ]]; then
    kill -TERM "${all[@]}" 2>/dev/null || true
    for _ in $(seq 1 20); do
      kill -0 "${all[@]}" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
  fi
  for c in ${containers[@]+"${containers[@]}"}; do buildah rm "$c" >/dev/null 2>&1 || true; done
  if [[ $rc -ne 0 || $keep_logs -eq 1 ]]; then
    for f in "$work"/*.log; do [[ -f "$f" ]] && { log "--- tail of $f"; tail -n 25 "$f" >&2; }; done
    log "logs kept in $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run_image NAME IMAGE [-e K=V ...] [-v SRC:DST:ro ...] -- ARGS...: the image's entrypoint + ARGS,
# in the background, as the image's user, on the host network; output in $work/NAME.log.
run_image() {
  local name=$1 image=$2; shift 2
  local opts=()
  while [[ $1 != -- ]]; do opts+=("$1" "$2"); shift 2; done
  shift
  case "$BUILDER" in
    docker)
      docker run --rm --name "lenpred-smoke-$name-$$" --network host "${opts[@]}" "$image" "$@" > "$work/$name.log" 2>&1 &
      ;;
    *)
      local ctr entry
      ctr=$(buildah from --pull=never --quiet --name "lenpred-smoke-$name-$$" "$image")
      containers+=("$ctr")
      entry=$(buildah inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$image")
      # shellcheck disable=SC2086  # the entrypoint is a plain word list (tini -- lenpred)
      buildah run --isolation chroot --network host "${opts[@]}" "$ctr" -- $entry "$@" > "$work/$name.log" 2>&1 &
      ;;
  esac
  pids+=($!)
}

wait_for() {  # wait_for WHAT SECONDS CMD...
  local what=$1 secs=$2; shift 2
  local end=$(( SECONDS + secs ))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < end )) || die "$what not ready within ${secs}s"
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || die "$what: a process exited early (see logs)"; done
    sleep 1
  done
  log "$what ready after $(( SECONDS - t_start ))s"
}
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { curl -fsS --max-time 5 -o /dev/null "$1"; }

# --- Redis, with a password (AUTH on, as the chart's bundled Redis)
redis_port=$(free_port) redis_pw=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --requirepass "$redis_pw" \
  --dir "$work" > "$work/redis.log" 2>&1 &
pids+=($!)
redis_url="redis://:$redis_pw@127.0.0.1:$redis_port/0"
wait_for redis 20 tcp_open "$redis_port"

# --- sidecar image (CPU fallback, one compute thread on a small box)
sc_port=$(free_port) sc_metrics=$(free_port)
run_image sidecar "$SIDECAR_IMAGE" -e TINI_SUBREAPER=1 -e "LENPRED_REDIS_URL=$redis_url" -e OMP_NUM_THREADS=1 -e MKL_NUM_THREADS=1 -- \
  sidecar --host 127.0.0.1 --port "$sc_port" --metrics-port "$sc_metrics" --namespace "$ns" --device cpu --threads 1
wait_for sidecar 120 http_ok "http://127.0.0.1:$sc_metrics/metrics"

# --- engine: real SGLang 0.5.23 on CPU with the tap -> sidecar
eng_port=$(free_port)
if [[ "$engine_mode" == image ]]; then
  # The image's default arguments, on our port (what helm/examples/cpu-only.yaml runs).
  run_image engine "$ENGINE_IMAGE" -e TINI_SUBREAPER=1 -e "LENPRED_SIDECAR=127.0.0.1:$sc_port" -- \
    --model-path /opt/models/smollm2-135m-instruct --host 127.0.0.1 --port "$eng_port" \
    --device cpu --attention-backend torch_native --disable-cuda-graph --sleep-on-idle \
    --mem-fraction-static 0.3 --max-total-tokens 20000 \
    --return-hidden-states-mode full --enable-metrics --enable-priority-scheduling
else
  "$LENPRED_BIN" engine --port "$eng_port" --sidecar "127.0.0.1:$sc_port" --log "$work/engine.log" --timeout 300 \
    > "$work/engine-launcher.log" 2>&1 &
  pids+=($!)
fi
wait_for "engine ($engine_mode)" 400 http_ok "http://127.0.0.1:$eng_port/health"

# --- router image; with an API key when the router knows --api-keys-file
rt_port=$(free_port)
router_opts=(-e TINI_SUBREAPER=1 -e "LENPRED_REDIS_URL=$redis_url")
router_args=(router serve --host 127.0.0.1 --port "$rt_port" --backends "http://127.0.0.1:$eng_port" --namespace "$ns")
api_key=""
if in_image "$ROUTER_IMAGE" lenpred router serve --help 2>/dev/null | grep -q -- --api-keys-file; then
  api_key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
  mkdir -p "$work/keys"
  printf 'keys:\n  - name: smoke\n    key_sha256: %s\n    scopes: [inference, admin]\n' \
    "$(printf %s "$api_key" | sha256sum | cut -d' ' -f1)" > "$work/keys/keys.yaml"
  chmod -R a+rX "$work/keys"
  router_opts+=(-v "$work/keys:/etc/lenpred/api-keys:ro")
  router_args+=(--api-keys-file /etc/lenpred/api-keys/keys.yaml)
fi
run_image router "$ROUTER_IMAGE" "${router_opts[@]}" -- "${router_args[@]}"
wait_for router 60 http_ok "http://127.0.0.1:$rt_port/health"
t_ready=$(( SECONDS - t_start ))

# --- requests through the router; the client runs in the router image
log "sending $requests chat completions (max_tokens $max_tokens)${api_key:+ with an API key}"
client=(python /smoke/check.py --router "http://127.0.0.1:$rt_port" --redis-url "$redis_url" --namespace "$ns"
        --requests "$requests" --max-tokens "$max_tokens")
[[ -z "$api_key" ]] || client+=(--api-key "$api_key")
mount=(-v "$LENPRED_ROOT/docker/smoke_check.py:/smoke/check.py:ro")
rc=0
case "$BUILDER" in
  docker)
    docker run --rm --network host "${mount[@]}" --entrypoint "${client[0]}" "$ROUTER_IMAGE" "${client[@]:1}" \
      > "$work/check.out" || rc=$? ;;
  *)
    ctr=$(buildah from --pull=never --quiet "$ROUTER_IMAGE")
    containers+=("$ctr")
    buildah run --isolation chroot --network host "${mount[@]}" "$ctr" -- "${client[@]}" > "$work/check.out" || rc=$? ;;
esac
summary=$(tail -1 "$work/check.out")
python3 - "$summary" "$engine_mode" "$t_ready" "$(( SECONDS - t_start ))" "$SIDECAR_IMAGE" "$ROUTER_IMAGE" \
  "$([[ $engine_mode == image ]] && echo "$ENGINE_IMAGE" || echo "lenpred engine (host venv)")" "${api_key:+1}" <<'EOF'
import json, sys
try:
    s = json.loads(sys.argv[1])
except ValueError:
    s = {"requests": 0, "ok": 0, "predicted": 0, "error": "the client printed no summary (see logs)"}
s.update({"engine": sys.argv[2], "ready_s": int(sys.argv[3]), "total_s": int(sys.argv[4]),
          "images": {"sidecar": sys.argv[5], "router": sys.argv[6], "engine": sys.argv[7]},
          "api_key": bool(sys.argv[8])})
print(json.dumps(s))
EOF
exit "$rc"
