#!/usr/bin/env bash
# The image for real: builds the Dockerfile, runs zeroq-server in it on the
# host's network (the embedded default: SQLite under the data volume, no
# tenants file, loopback ports), quantizes the example model through it with
# the host's `zeroq` command, loads the artifact with the host's torch, stops
# the container with SIGTERM and wants exit status 0; then brings up the
# Compose file's server alone and waits for its health check to say healthy.
# (Prometheus and Grafana are upstream images: tests/deploy_test.sh checks
# their files; `docker-compose config` validates the whole Compose file.)
#
#   bash tests/container_check.sh        # after scripts/build.sh (build/client/zeroq)
#
# Needs root: installs docker.io, debootstrap and docker-compose when missing,
# starts dockerd (without bridge networking: everything uses the host's
# network) when none runs and stops it again at the end, and makes the base
# image from Debian packages when it is missing (scripts/docker_base_image.sh).
# Removes every container, volume and image it made except the base image;
# ZEROQ_CHECK_KEEP_CACHE=1 keeps the build's layers (faster next build).
# Prints a line per check and "N passed, M failed"; exit 0 only if all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/torch_env.sh   # ZEROQ_PYTHON: the host's torch, to load the artifact
source tests/check_lib.sh

BUILD_DIR=${BUILD_DIR:-build}
ZEROQ=$BUILD_DIR/client/zeroq
IMAGE=zeroq:check
PROJECT=zeroqcheck$$
BUILD_TIMEOUT=${ZEROQ_CHECK_BUILD_TIMEOUT:-3600}
t_start=$(date +%s)
unset ZEROQ_SERVER ZEROQ_API_KEY

tmp=$(mktemp -d "${TMPDIR:-/tmp}/zeroq_container_XXXXXX")
dockerd_pid=
container=
compose_up=0
images_before=

log() { echo "container_check: $*"; }
# quietly CMD...: runs CMD with its output in a file, shown only on failure.
quietly() {
  "$@" > "$tmp/cmd.log" 2>&1 && return 0
  local rc=$?
  tail -n 20 "$tmp/cmd.log"
  return "$rc"
}
free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- Docker ---------------------------------------------------------------------
missing=()
for p in docker.io debootstrap docker-compose; do
  dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "ok installed" || missing+=("$p")
done
# With their recommended packages (docker.io brings apparmor, which its
# engine needs on kernels that have AppArmor).
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" > "$tmp/apt.log" 2>&1 ||
    { tail -n 20 "$tmp/apt.log"; fail "install ${missing[*]}"; report_checks; exit 1; }
fi
# Debian's client, which matches its engine (another `docker` on PATH may be
# a newer client that wants the buildx plugin).
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
COMPOSE=(docker-compose -p "$PROJECT")
export DOCKER

cleanup() {
  if [[ -n $container ]]; then "$DOCKER" rm -f -v "$container" > /dev/null 2>&1; fi
  if [[ $compose_up -eq 1 ]]; then
    ZEROQ_IMAGE=$IMAGE timeout 120 "${COMPOSE[@]}" down -v > /dev/null 2>&1
  fi
  if [[ -n $images_before ]]; then
    "$DOCKER" rmi "$IMAGE" > /dev/null 2>&1
    # Unless the cache is kept: the other images the build made (the
    # builder's layers), never the base image. A layer goes once its
    # children have: a few rounds.
    if [[ ${ZEROQ_CHECK_KEEP_CACHE:-0} != 1 ]]; then
      for _ in 1 2 3 4 5; do
        mapfile -t made < <(comm -13 <(sort <<< "$images_before") \
                                     <("$DOCKER" images -aq --no-trunc | sort -u))
        [[ ${#made[@]} -eq 0 ]] && break
        "$DOCKER" rmi "${made[@]}" > /dev/null 2>&1
      done
    fi
  fi
  if [[ -n $dockerd_pid ]]; then
    kill -TERM "$dockerd_pid" 2> /dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2> /dev/null || break; sleep 0.5; done
    kill -KILL "$dockerd_pid" 2> /dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

if ! "$DOCKER" info > /dev/null 2>&1; then
  log "starting dockerd (log: $tmp/dockerd.log)"
  # No bridge and no iptables rules: containers and builds use the host's
  # network (--network host, network_mode: host).
  dockerd --bridge=none --iptables=false > "$tmp/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 120); do
    "$DOCKER" info > /dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2> /dev/null || break
    sleep 0.5
  done
fi
if ! check "the host's zeroq command is built ($ZEROQ)" test -x "$ZEROQ"; then
  report_checks
  exit 1
fi
if ! check "the Docker engine answers" quietly "$DOCKER" info; then
  tail -n 20 "$tmp/dockerd.log" 2> /dev/null
  report_checks
  exit 1
fi

# --- Base image, build -------------------------------------------------------
base=$(awk 'toupper($1) == "FROM" {print $2; exit}' Dockerfile)
check "the base image $base is present or made from Debian packages" \
  quietly bash scripts/docker_base_image.sh "$base"
check "the base image's apt reaches its mirror" \
  quietly timeout 300 "$DOCKER" run --rm --network host "$base" apt-get update

images_before=$("$DOCKER" images -aq --no-trunc | sort -u)
images_before=${images_before:-none}
log "docker build --network host -t $IMAGE . (log: $tmp/build.log; a cold build compiles the project: 10+ minutes)"
t0=$(date +%s)
DOCKER_BUILDKIT=0 timeout "$BUILD_TIMEOUT" "$DOCKER" build --network host -t "$IMAGE" . \
  > "$tmp/build.log" 2>&1
build_rc=$?
build_seconds=$(($(date +%s) - t0))
if ! check "docker build ($build_seconds s)" test "$build_rc" -eq 0; then
  tail -n 40 "$tmp/build.log"
  report_checks
  exit 1
fi
size=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((size / 1000000)) MB"

# --- What the image holds ------------------------------------------------------
site=$(grep -o 'TORCH_SITE=[^ ]*' Dockerfile | head -n 1 | cut -d= -f2)
for b in zeroq-server zeroq-worker zeroq; do
  check "$b finds every library it links in the image" bash -c '
    out=$("$1" run --rm --network host --entrypoint ldd "$2" -r "/usr/local/bin/$3" 2>&1) || exit 1
    ! grep -E "not found|undefined symbol" <<< "$out"' _ "$DOCKER" "$IMAGE" "$b"
done
check "LibTorch's CUDA library finds the wheel's CUDA libraries in the image" bash -c '
  out=$("$1" run --rm --network host --entrypoint ldd "$2" -r "$3/torch/lib/libtorch_cuda.so" 2>&1) || exit 1
  ! grep -E "not found|undefined symbol" <<< "$out" && grep -q "/torch/lib/../../nvidia/cudnn/lib/libcudnn.so" <<< "$out"' \
  _ "$DOCKER" "$IMAGE" "$site"
check "the image has no Python" bash -c '
  ! "$1" run --rm --network host --entrypoint sh "$2" -c "command -v python3"' _ "$DOCKER" "$IMAGE"

# --- The server in the container -------------------------------------------------
port=$(free_port)
metrics_port=$(free_port)
http_port=$(free_port)
container=$("$DOCKER" run -d --network host --name "zeroq-check-$$" \
  -e ZEROQ_SERVER="127.0.0.1:$port" "$IMAGE" \
  zeroq-server --listen="127.0.0.1:$port" --metrics_listen="127.0.0.1:$metrics_port" \
  --http_listen="127.0.0.1:$http_port" --data_dir=/var/lib/zeroq)
ready() {
  for _ in $(seq 120); do
    "$ZEROQ" --server "127.0.0.1:$port" --connect_timeout 2 models > /dev/null 2>&1 && return 0
    [[ $("$DOCKER" inspect --format '{{.State.Running}}' "$container" 2> /dev/null) == true ]] || return 1
    sleep 0.5
  done
  return 1
}
if check "zeroq-server in the container answers $ZEROQ on 127.0.0.1:$port" ready; then
  check "its metrics are served on 127.0.0.1:$metrics_port" bash -c '
    /usr/bin/python3 -c "
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
" "http://127.0.0.1:$1/metrics" | grep -q "^zeroq_slots"' _ "$metrics_port"
  check "its HTTP API and dashboard are served on 127.0.0.1:$http_port" bash -c '
    /usr/bin/python3 -c "
import json, sys, urllib.request
page = urllib.request.urlopen(sys.argv[1] + \"/\", timeout=10).read().decode()
assert \"<html\" in page.lower()
jobs = json.load(urllib.request.urlopen(sys.argv[1] + \"/v1/jobs\", timeout=10))
assert isinstance(jobs, dict)
" "http://127.0.0.1:$1"' _ "$http_port"
  out=$tmp/out
  t0=$(date +%s)
  timeout 900 "$ZEROQ" --server "127.0.0.1:$port" quantize tests/models/fashion_cnn.pt \
    --input_shape 1,28,28 --weight_bits 8 --activation_bits 8 --iterations 20 -o "$out" \
    > "$tmp/quantize.log" 2>&1
  rc=$?
  if ! check "zeroq quantize through the container's server ($(($(date +%s) - t0)) s)" test "$rc" -eq 0; then
    tail -n 20 "$tmp/quantize.log"
  fi
  check "the artifact model.zeroq.pt was downloaded" test -s "$out/model.zeroq.pt"
  check "model.zeroq.pt loads with torch.jit.load and gives [N, 10]" "$ZEROQ_PYTHON" -W ignore -c '
import sys, torch
m = torch.jit.load(sys.argv[1])
with torch.no_grad():
    y = m(torch.randn(4, 1, 28, 28))
assert tuple(y.shape) == (4, 10), y.shape
' "$out/model.zeroq.pt"
else
  "$DOCKER" logs --tail 20 "$container" 2>&1
fi
"$DOCKER" kill -s TERM "$container" > /dev/null 2>&1
exit_code=$(timeout 60 "$DOCKER" wait "$container")
check "SIGTERM stops the container's server with exit status 0 (got ${exit_code:-none})" \
  test "${exit_code:-x}" = 0
"$DOCKER" rm -v "$container" > /dev/null 2>&1 && container=

# --- Compose ---------------------------------------------------------------------
check "docker-compose config accepts docker-compose.yml" quietly "${COMPOSE[@]}" config -q
check "docker-compose config accepts it with the gpu profile" quietly "${COMPOSE[@]}" --profile gpu config -q
port=$(free_port)
metrics_port=$(free_port)
export ZEROQ_IMAGE=$IMAGE ZEROQ_PORT=$port ZEROQ_METRICS_PORT=$metrics_port
compose_up=1
if check "docker-compose up -d zeroq (host network, 127.0.0.1:$port)" \
     quietly timeout 120 "${COMPOSE[@]}" up -d --no-build zeroq; then
  cid=$("${COMPOSE[@]}" ps -q zeroq)
  healthy() {
    local status=
    for _ in $(seq 60); do   # the first check runs 15 s after the start
      status=$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$cid" 2> /dev/null)
      [[ $status == healthy ]] && return 0
      [[ $status == unhealthy || -z $status ]] && break
      sleep 2
    done
    echo "health: ${status:-none}"
    "$DOCKER" logs --tail 20 "$cid" 2>&1
    return 1
  }
  check "the Compose server's health check says healthy" healthy
fi
check "docker-compose down" quietly timeout 120 "${COMPOSE[@]}" down -v
compose_up=0
unset ZEROQ_IMAGE ZEROQ_PORT ZEROQ_METRICS_PORT

log "docker build: $build_seconds s; image: $((size / 1000000)) MB; whole check: $(($(date +%s) - t_start)) s"
report_checks
