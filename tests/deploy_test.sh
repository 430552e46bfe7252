#!/usr/bin/env bash
# Checks the deployment files without deploying them: every YAML file under
# deploy/ and docker-compose.yml parses, the JSON files parse, promtool
# accepts the Prometheus configurations, the files docker-compose.yml and the
# kustomizations refer to exist, Compose runs the server on the host's network
# with a GPU profile, the Kubernetes GPU overlay patches the Deployment, the
# Dockerfile builds as CI does (plain syntax, no BuildKit-only features) and
# its runtime stage has packages and LibTorch's libraries that cover what the
# binaries link, and every metric the Grafana dashboard queries is one a real
# zeroq-server exports. Needs no Docker (tests/container_check.sh builds and
# runs the image).
#
#   ZEROQ=build/client/zeroq ZEROQ_SERVER_BIN=build/server/zeroq-server \
#     ZEROQ_WORKER=build/core/worker/zeroq-worker bash tests/deploy_test.sh
#
# Exit 0 all passed, 1 a check failed, 77 skipped (the server has no
# --metrics_listen, and nothing else failed).
set -euo pipefail

: "${ZEROQ:?set ZEROQ to the zeroq binary}"
: "${ZEROQ_SERVER_BIN:?set ZEROQ_SERVER_BIN to the zeroq-server binary}"
: "${ZEROQ_WORKER:?set ZEROQ_WORKER to the zeroq-worker binary}"
PY=/usr/bin/python3
cd "$(dirname "$0")/.."
unset ZEROQ_SERVER ZEROQ_API_KEY

tmp=$(mktemp -d "${TMPDIR:-/tmp}/zeroq_deploy_XXXXXX")
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then kill -KILL "$server_pid" 2> /dev/null || true; fi
  wait 2> /dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

source tests/check_lib.sh

# --- YAML and JSON ------------------------------------------------------------
mapfile -t yamls < <(find deploy -name '*.yml' -o -name '*.yaml' | sort)
yamls+=(docker-compose.yml)
check "there are YAML files under deploy/" test "${#yamls[@]}" -gt 5
for f in "${yamls[@]}"; do
  check "$f parses as YAML" "$PY" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
assert docs, "empty"
' "$f"
done
mapfile -t jsons < <(find deploy -name '*.json' | sort)
for f in "${jsons[@]}"; do
  check "$f parses as JSON" "$PY" -m json.tool "$f" /dev/null
done
check "the tenants ConfigMap holds valid JSON" "$PY" -c '
import json, yaml
cm = yaml.safe_load(open("deploy/k8s/tenants-configmap.yaml"))
t = json.loads(cm["data"]["tenants.json"])
assert t["tenants"] and all(len(h) == 64 for x in t["tenants"] for h in x["api_key_sha256"])
'

# --- Prometheus ---------------------------------------------------------------
if command -v promtool > /dev/null; then
  check "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml
  "$PY" -c '
import sys, yaml
cm = yaml.safe_load(open("deploy/k8s/prometheus-scrape.yaml"))
open(sys.argv[1], "w").write(cm["data"]["prometheus.yml"])
' "$tmp/k8s-prometheus.yml"
  check "promtool check config of the k8s scrape config" \
    promtool check config "$tmp/k8s-prometheus.yml"
else
  fail "promtool is missing (Debian package prometheus; scripts/install-deps.sh)"
fi

# --- What the files refer to --------------------------------------------------
check "docker-compose.yml mounts files that exist, and runs the four services" "$PY" -c '
import os, yaml
c = yaml.safe_load(open("docker-compose.yml"))
s = c["services"]
assert {"zeroq", "zeroq-gpu", "prometheus", "grafana"} <= set(s), s.keys()
assert s["prometheus"]["image"].startswith("prom/prometheus")
assert s["grafana"]["image"].startswith("grafana/grafana")
for svc in s.values():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            assert os.path.exists(src), src
'
check "docker-compose.yml: every service on the host network, no port mappings" "$PY" -c '
import yaml
for name, svc in yaml.safe_load(open("docker-compose.yml"))["services"].items():
    assert svc.get("network_mode") == "host", name
    assert "ports" not in svc, name
'
check "docker-compose.yml: the server on loopback by default, with tenants and a health check address" "$PY" -c '
import yaml
z = yaml.safe_load(open("docker-compose.yml"))["services"]["zeroq"]
args = z["command"]
assert args[0] == "zeroq-server", args
assert "--listen=${ZEROQ_LISTEN_HOST:-127.0.0.1}:${ZEROQ_PORT:-50051}" in args, args
assert "--metrics_listen=${ZEROQ_LISTEN_HOST:-127.0.0.1}:${ZEROQ_METRICS_PORT:-9464}" in args, args
assert "--http_listen=${ZEROQ_LISTEN_HOST:-127.0.0.1}:${ZEROQ_HTTP_PORT:-8080}" in args, args
assert "--tenants_file=/etc/zeroq/tenants.json" in args and "--data_dir=/var/lib/zeroq" in args
assert z["environment"]["ZEROQ_SERVER"] == "127.0.0.1:${ZEROQ_PORT:-50051}"
assert "profiles" not in z
'
check "docker-compose.yml: the gpu profile server reserves NVIDIA GPUs" "$PY" -c '
import yaml
s = yaml.safe_load(open("docker-compose.yml"))["services"]
g = s["zeroq-gpu"]
assert g["profiles"] == ["gpu"]
d = g["deploy"]["resources"]["reservations"]["devices"]
assert any(x["driver"] == "nvidia" and "gpu" in x["capabilities"] for x in d), d
assert g["command"] == s["zeroq"]["command"] and g["image"] == s["zeroq"]["image"]
'
check "Prometheus scrapes the server on the host network" "$PY" -c '
import yaml
p = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
assert p["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))
assert ds["datasources"][0]["url"] == "http://127.0.0.1:9090"
'
for k in deploy/k8s deploy/k8s/gpu; do
  check "the kustomization $k lists files that exist" "$PY" -c '
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
for r in k["resources"]:
    p = os.path.join(d, r)
    assert os.path.isfile(p) or os.path.isfile(os.path.join(p, "kustomization.yaml")), r
for p in k.get("patches", []):
    assert os.path.isfile(os.path.join(d, p["path"])), p
' "$k"
done
check "the Deployment: one replica, no GPU, gRPC probes, its three ports" "$PY" -c '
import yaml
d = yaml.safe_load(open("deploy/k8s/deployment.yaml"))
assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
c = d["spec"]["template"]["spec"]["containers"][0]
for kind in ("requests", "limits"):
    assert "nvidia.com/gpu" not in c["resources"].get(kind, {}), kind
assert c["readinessProbe"]["grpc"]["port"] == 50051
assert c["livenessProbe"]["grpc"]["port"] == 50051
assert {p["containerPort"] for p in c["ports"]} == {50051, 9464, 8080}
assert "--http_listen=0.0.0.0:8080" in c["args"]
assert "--metrics_listen=0.0.0.0:9464" in c["args"]
assert "--devices=auto" in c["args"]
'
check "the GPU overlay: one nvidia.com/gpu for the server container of that Deployment" "$PY" -c '
import yaml
k = yaml.safe_load(open("deploy/k8s/gpu/kustomization.yaml"))
assert k["resources"] == ["../"], k["resources"]
base = yaml.safe_load(open("deploy/k8s/deployment.yaml"))
patch = yaml.safe_load(open("deploy/k8s/gpu/" + k["patches"][0]["path"]))
assert (patch["kind"], patch["metadata"]["name"], patch["metadata"]["namespace"]) == \
       (base["kind"], base["metadata"]["name"], base["metadata"]["namespace"])
c = patch["spec"]["template"]["spec"]["containers"][0]
assert c["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"], c["name"]
assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
'
check "the Grafana datasource is the one the dashboard uses" "$PY" -c '
import json, yaml
ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))
uids = {d["uid"] for d in ds["datasources"]}
dash = json.load(open("deploy/grafana/dashboards/zeroq.json"))
used = {p["datasource"]["uid"] for p in dash["panels"]}
assert used <= uids, (used, uids)
'

# --- Dockerfile ---------------------------------------------------------------
# The stages, as "name<TAB>instruction line" (continuations joined).
"$PY" - Dockerfile > "$tmp/docker.tsv" << 'EOF'
import re, sys
stage, lines, cur = "", [], ""
for raw in open(sys.argv[1]):
    line = raw.rstrip("\n")
    if not cur and (not line.strip() or line.lstrip().startswith("#")):
        continue
    if line.lstrip().startswith("#"):
        continue
    cur += line[:-1] + " " if line.endswith("\\") else line
    if line.endswith("\\"):
        continue
    m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", cur, re.I)
    if m:
        stage = m.group(1) or "runtime"
    print(f"{stage}\t{' '.join(cur.split())}")
    cur = ""
EOF
builder_runs=$(awk -F'\t' '$1 == "builder" && $2 ~ /^RUN/ {print $2}' "$tmp/docker.tsv")
check "Dockerfile: the builder is debian:12" grep -q $'^builder\tFROM debian:12 AS builder' "$tmp/docker.tsv"
check "Dockerfile: the builder runs scripts/install-deps.sh" grep -q "bash scripts/install-deps.sh" <<< "$builder_runs"
check "Dockerfile: the builder runs scripts/build.sh" grep -q "bash scripts/build.sh" <<< "$builder_runs"
# install-deps.sh runs before the sources are copied: it needs the files it
# reads copied ahead of it.
deps_copy=$(awk -F'\t' '$1 == "builder" && $2 ~ /^COPY / && $2 ~ /install-deps.sh/ {print $2}' "$tmp/docker.tsv")
for f in scripts/install-deps.sh $(grep -v '^[[:space:]]*#' scripts/install-deps.sh |
                                   grep -o 'scripts/[A-Za-z0-9_.-]*' | sort -u); do
  check "Dockerfile: the builder copies $f before running scripts/install-deps.sh" \
    grep -q " $f " <<< "$deps_copy "
done
runtime=$(awk -F'\t' '$1 == "runtime" {print $2}' "$tmp/docker.tsv")
check "Dockerfile: the runtime stage is debian:12" grep -q "^FROM debian:12$" <<< "$runtime"
check "Dockerfile: plain syntax (no BuildKit-only RUN --mount, no syntax directive)" \
  bash -c '! grep -Eq -- "^RUN --mount|^# *syntax=" Dockerfile'
# The LibTorch environment: a fixed path in the builder, its torch/lib and
# nvidia/ (side by side, for libtorch's $ORIGIN/../../nvidia RPATH) copied
# to the same path in the runtime stage.
venv=$(awk -F'\t' '$1 == "builder" && $2 ~ /^ENV/' "$tmp/docker.tsv" | grep -o 'ZEROQ_VENV=[^ ]*' | cut -d= -f2)
check "Dockerfile: the builder puts the torch environment at a fixed path ($venv)" \
  test "${venv:0:1}" = /
site=$(grep -o 'TORCH_SITE=[^ ]*' <<< "$runtime" | head -n 1 | cut -d= -f2)
check "Dockerfile: the runtime stage's torch path is in that environment ($site)" \
  test -n "$venv" -a "${site#"$venv"/lib/python3}" != "$site"
for d in torch/lib nvidia; do
  check "Dockerfile: the runtime stage copies the environment's $d to the same path" \
    grep -q "^COPY --from=builder \${TORCH_SITE}/$d \${TORCH_SITE}/$d$" <<< "$runtime"
done
for b in build/server/zeroq-server build/core/worker/zeroq-worker build/client/zeroq; do
  check "Dockerfile: the runtime stage copies $b" grep -q "COPY --from=builder .*/$b" <<< "$runtime"
done
check "Dockerfile: runs as user zeroq" grep -q "^USER zeroq$" <<< "$runtime"
check "Dockerfile: exposes 50051, 9464 and 8080" grep -q "^EXPOSE 50051 9464 8080$" <<< "$runtime"
check "Dockerfile: the health check runs zeroq" grep -q "^HEALTHCHECK .*CMD zeroq " <<< "$runtime"
check "Dockerfile: the server's data is /var/lib/zeroq" grep -q "data_dir=/var/lib/zeroq" <<< "$runtime"
# The packages the runtime stage installs.
mapfile -t runtime_packages < <("$PY" -c '
import re, sys
for cmd in sys.stdin.read().splitlines():
    for m in re.finditer(r"apt-get install((?:\s+[^&;]+)+)", cmd):
        for tok in m.group(1).split():
            if not tok.startswith("-"):
                print(tok)
' <<< "$runtime")
check "Dockerfile: the runtime stage installs packages" test "${#runtime_packages[@]}" -gt 3
if apt-cache show libc6 > /dev/null 2>&1; then
  for p in "${runtime_packages[@]}"; do
    check "runtime package $p exists in apt" bash -c "apt-cache show '$p' > /dev/null 2>&1"
  done
else
  echo "NOTE: no apt package lists here (apt-get update); the apt-cache checks are left out"
fi
# Each library a binary links directly comes from a runtime package, or from
# one the base image has.
base_packages=" libc6 libgcc-s1 libstdc++6 "
for b in "$ZEROQ_SERVER_BIN" "$ZEROQ_WORKER" "$ZEROQ"; do
  missing=()
  while read -r lib; do
    path=$(ldd "$b" | awk -v l="$lib" '$1 == l {print $3}')
    # dpkg knows a file by one of its names (/lib or /usr/lib, the link or
    # its target): try them in turn.
    pkg=
    for candidate in "$path" "$(readlink -f "$path")" "${path/#\/usr\/lib\//\/lib\/}"; do
      [[ -n $pkg || -z $candidate ]] && continue
      pkg=$(dpkg -S "$candidate" 2> /dev/null | head -n 1 | cut -d: -f1) || pkg=
    done
    if [[ $path == */site-packages/torch/lib/* ]]; then
      continue   # LibTorch's own folder, which the runtime stage copies
    elif [[ -z $pkg ]]; then
      missing+=("$lib(no package)")
    elif [[ " ${runtime_packages[*]} " != *" $pkg "* && $base_packages != *" $pkg "* ]]; then
      missing+=("$lib($pkg)")
    fi
  done < <(readelf -d "$b" | awk '/NEEDED/ {gsub(/[][]/, "", $5); print $5}')
  check "the runtime packages provide every library $(basename "$b") links${missing:+ (missing: ${missing[*]})}" \
    test "${#missing[@]}" -eq 0
done

# --- The dashboard's metrics against a real server ----------------------------
mapfile -t wanted < <("$PY" -c '
import json, re
dash = json.load(open("deploy/grafana/dashboards/zeroq.json"))
names = set()
for p in dash["panels"]:
    for t in p.get("targets", []):
        for n in re.findall(r"zeroq_[a-z_]+", t["expr"]):
            names.add(re.sub(r"_(bucket|sum|count)$", "", n))
print("\n".join(sorted(names)))
')
check "the dashboard queries zeroq metrics" test "${#wanted[@]}" -ge 5
for panel in "queue depth" "jobs finished by result" "stage durations" "busy slots per device" "worker crashes"; do
  check "the dashboard has a panel: $panel" "$PY" -c '
import json, sys
dash = json.load(open("deploy/grafana/dashboards/zeroq.json"))
assert any(sys.argv[1] in p["title"].lower() for p in dash["panels"]), sys.argv[1]
' "$panel"
done

metrics_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$ZEROQ_SERVER_BIN" --data_dir="$tmp/data" --listen=127.0.0.1:0 --http_listen= \
  --port_file="$tmp/port" --worker="$ZEROQ_WORKER" \
  --metrics_listen="127.0.0.1:$metrics_port" 2> "$tmp/server.log" &
server_pid=$!
for _ in $(seq 400); do
  [[ -s $tmp/port ]] && break
  kill -0 "$server_pid" 2> /dev/null || break
  sleep 0.025
done
skipped=0
if [[ ! -s $tmp/port ]]; then
  if grep -q "metrics_listen" "$tmp/server.log"; then
    skipped=1
  else
    fail "zeroq-server did not start: $(tail -n 3 "$tmp/server.log")"
  fi
else
  # A few calls, so that the per-method RPC series exist.
  "$ZEROQ" --server "127.0.0.1:$(cat "$tmp/port")" models > /dev/null
  "$ZEROQ" --server "127.0.0.1:$(cat "$tmp/port")" get j-none > /dev/null 2>&1 || true
  "$PY" -c '
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
' "http://127.0.0.1:$metrics_port/metrics" > "$tmp/metrics.txt"
  # Names the server exports: TYPE lines and samples, suffixes stripped.
  exported=$("$PY" -c '
import re, sys
names = set()
for line in open(sys.argv[1]):
    m = re.match(r"# TYPE (\S+)", line) or re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
    if m:
        names.add(re.sub(r"_(bucket|sum|count)$", "", m.group(1)))
print(" ".join(sorted(names)))
' "$tmp/metrics.txt")
  for name in "${wanted[@]}"; do
    check "the server exports $name (the dashboard queries it)" \
      grep -qw -- "$name" <<< "$exported"
  done
  kill -TERM "$server_pid"
  rc=0
  wait "$server_pid" || rc=$?
  server_pid=
  check "zeroq-server stops cleanly" test "$rc" -eq 0
fi

report_checks || exit 1
if [[ $skipped -eq 1 ]]; then
  echo "SKIPPED: server has no --metrics_listen yet"
  exit 77
fi
