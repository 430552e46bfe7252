#!/usr/bin/env bash
# Checks the deployment files without deploying them: every YAML file under
# deploy/ and docker-compose.yml parses, the JSON files parse, promtool
# accepts the Prometheus configurations, the files docker-compose.yml and the
# kustomizations refer to exist (and every manifest is in a kustomization, no
# overlay inside its base's folder), Compose runs the server on the host's
# network with a GPU profile and a "replicas" profile (PostgreSQL and two
# servers with their own replica ids and ports on one shared data volume),
# the Kubernetes GPU overlay patches the Deployment, the replicas overlay
# runs two replicas with the store from the Secret zeroq-postgres, the pod's
# name as replica id, a ReadWriteMany volume and an example PostgreSQL 15
# (kubectl kustomize and docker-compose config also run where installed;
# neither is needed), the Dockerfile builds as CI does (plain syntax, no BuildKit-only features) and
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
cm = yaml.safe_load(open("deploy/k8s/base/tenants-configmap.yaml"))
t = json.loads(cm["data"]["tenants.json"])
assert t["tenants"] and all(len(h) == 64 for x in t["tenants"] for h in x["api_key_sha256"])
'

# --- Prometheus ---------------------------------------------------------------
if command -v promtool > /dev/null; then
  check "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml
  for f in deploy/k8s/base/prometheus-scrape.yaml deploy/k8s/replicas/prometheus-scrape.yaml; do
    "$PY" -c '
import sys, yaml
cm = yaml.safe_load(open(sys.argv[1]))
open(sys.argv[2], "w").write(cm["data"]["prometheus.yml"])
' "$f" "$tmp/k8s-prometheus.yml"
    check "promtool check config of the k8s scrape config in $f" \
      promtool check config "$tmp/k8s-prometheus.yml"
  done
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
mapfile -t kustomizations < <(find deploy/k8s -name kustomization.yaml -printf '%h\n' | sort)
check "the kustomizations: deploy/k8s, its base, the gpu and replicas overlays" \
  "$PY" -c 'import sys; assert {"deploy/k8s", "deploy/k8s/base", "deploy/k8s/gpu",
    "deploy/k8s/replicas", "deploy/k8s/replicas/postgres"} <= set(sys.argv[1:]), sys.argv[1:]' \
  "${kustomizations[@]}"
for k in "${kustomizations[@]}"; do
  # Kustomize refuses a directory resource that contains the kustomization
  # itself (an overlay inside its base's folder: "cycle detected").
  check "the kustomization $k lists files that exist, and no folder above it" "$PY" -c '
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
for r in k["resources"]:
    p = os.path.join(d, r)
    assert os.path.isfile(p) or os.path.isfile(os.path.join(p, "kustomization.yaml")), r
    if os.path.isdir(p):
        base, here = os.path.realpath(p), os.path.realpath(d)
        assert os.path.commonpath([base, here]) != base, f"{r} contains {d}"
for p in k.get("patches", []):
    assert os.path.isfile(os.path.join(d, p["path"])), p
' "$k"
done
check "every manifest under deploy/k8s is a resource or a patch of a kustomization" "$PY" -c '
import os, sys, yaml
used = set()
for d in sys.argv[1:]:
    k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
    used |= {os.path.normpath(os.path.join(d, r)) for r in k["resources"]}
    used |= {os.path.normpath(os.path.join(d, p["path"])) for p in k.get("patches", [])}
for root, _, files in os.walk("deploy/k8s"):
    for f in files:
        p = os.path.normpath(os.path.join(root, f))
        if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml":
            assert p in used, p
' "${kustomizations[@]}"
if command -v kubectl > /dev/null; then
  for k in "${kustomizations[@]}"; do
    check "kubectl kustomize $k" bash -c 'kubectl kustomize "$1" > /dev/null' _ "$k"
  done
else
  echo "NOTE: no kubectl here; the kustomizations were checked without it"
fi
check "the Deployment: one replica, no GPU, gRPC probes, its three ports" "$PY" -c '
import yaml
d = yaml.safe_load(open("deploy/k8s/base/deployment.yaml"))
assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
c = d["spec"]["template"]["spec"]["containers"][0]
# The image has a CMD and no ENTRYPOINT: args alone would be run as the program.
assert c["command"] == ["zeroq-server"], c.get("command")
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
assert k["resources"] == ["../base"], k["resources"]
base = yaml.safe_load(open("deploy/k8s/base/deployment.yaml"))
patch = yaml.safe_load(open("deploy/k8s/gpu/" + k["patches"][0]["path"]))
assert (patch["kind"], patch["metadata"]["name"], patch["metadata"]["namespace"]) == \
       (base["kind"], base["metadata"]["name"], base["metadata"]["namespace"])
c = patch["spec"]["template"]["spec"]["containers"][0]
assert c["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"], c["name"]
assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
'
# --- Several replicas on PostgreSQL -------------------------------------------
# The replicas overlay's documents (its base left out), and the base with the
# overlay's strategic merge patches applied (maps merged, lists of strings
# replaced, null deletes a key, containers merged by name), for the checks
# below.
"$PY" - "$tmp/replicas.json" << 'PYEOF' || fail "reading the replicas overlay and merging its patches"
import json, os, sys, yaml
d = "deploy/k8s/replicas"
def docs(folder):
    k = yaml.safe_load(open(os.path.join(folder, "kustomization.yaml")))
    out = []
    for r in k["resources"]:
        p = os.path.join(folder, r)
        if os.path.isdir(p):
            if os.path.realpath(p) != os.path.realpath("deploy/k8s/base"):
                out += docs(p)
        else:
            out += [x for x in yaml.safe_load_all(open(p)) if x]
    return out
def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, v in patch.items():
            if v is None:
                out.pop(key, None)
            elif key == "containers":
                named = {c["name"]: c for c in v}
                out[key] = [merge(c, named.pop(c["name"], {})) for c in base.get(key, [])]
                out[key] += list(named.values())
            else:
                out[key] = merge(base.get(key), v)
        return out
    return patch
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
patches = [yaml.safe_load(open(os.path.join(d, p["path"]))) for p in k["patches"]]
base = {}
for f in sorted(os.listdir("deploy/k8s/base")):
    if f != "kustomization.yaml":
        for x in yaml.safe_load_all(open(os.path.join("deploy/k8s/base", f))):
            base[(x["kind"], x["metadata"]["name"])] = x
merged = dict(base)
for p in patches:
    key = (p["kind"], p["metadata"]["name"])
    assert key in base, f"the patch of {key} matches nothing in the base"
    assert p["metadata"]["namespace"] == base[key]["metadata"]["namespace"], key
    merged[key] = merge(merged[key], p)
json.dump({"kustomization": k, "resources": docs(d), "patches": patches,
           "base": list(base.values()), "merged": list(merged.values())},
          open(sys.argv[1], "w"))
PYEOF
# replicas_check NAME PYTHON: PYTHON runs with o (the above), r (the
# overlay's resources), m (the merged base), dep, pod, c (the replicas'
# Deployment, its pod spec, the server container), env (c's env by name) and
# one(docs, kind[, name]) (the one such document).
replicas_check() {
  check "$1" "$PY" -c '
import json, re, sys, urllib.parse, yaml
o = json.load(open(sys.argv[1]))
def one(docs, kind, name=None):
    found = [x for x in docs if x["kind"] == kind and name in (None, x["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]
r, m = o["resources"], o["merged"]
dep = one(m, "Deployment", "zeroq")
pod = dep["spec"]["template"]["spec"]
c = [x for x in pod["containers"] if x["name"] == "zeroq-server"][0]
env = {e["name"]: e for e in c.get("env", [])}
'"$2" "$tmp/replicas.json"
}
replicas_check "the replicas overlay: the base, patches of its Deployment and volume claim" '
k = o["kustomization"]
assert k["resources"][0] == "../base", k["resources"]
kinds = {(p["kind"], p["metadata"]["name"]) for p in o["patches"]}
assert {("Deployment", "zeroq"), ("PersistentVolumeClaim", "zeroq-data")} <= kinds, kinds
'
replicas_check "the replicas Deployment: 2 replicas, rolling updates, spread over nodes" '
assert dep["spec"]["replicas"] == 2, dep["spec"]["replicas"]
assert dep["spec"]["strategy"]["type"] == "RollingUpdate", dep["spec"]["strategy"]
terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname" for t in terms)
'
replicas_check "the replicas Deployment: --store from the Secret zeroq-postgres (key uri), expanded by Kubernetes" '
assert c["command"] == ["zeroq-server"], c.get("command")
stores = [a for a in c["args"] if a.startswith("--store")]
assert stores == ["--store=$(ZEROQ_STORE)"], stores
ref = env["ZEROQ_STORE"]["valueFrom"]["secretKeyRef"]
assert (ref["name"], ref["key"]) == ("zeroq-postgres", "uri") and not ref.get("optional"), ref
uri = one(r, "Secret", "zeroq-postgres")["stringData"]["uri"]
assert urllib.parse.urlsplit(uri).scheme in ("postgresql", "postgres"), uri
'
replicas_check "the replicas Deployment: --replica_id is the pod name (downward API); every \$(VAR) is defined" '
ids = [a for a in c["args"] if a.startswith("--replica_id")]
assert ids == ["--replica_id=$(ZEROQ_REPLICA_ID)"], ids
assert env["ZEROQ_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
for a in c["args"]:
    for v in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
        assert v in env, (a, v)
'
replicas_check "the replicas Deployment keeps the base server args (a merge replaces the list)" '
base_c = one(o["base"], "Deployment", "zeroq")["spec"]["template"]["spec"]["containers"][0]
assert set(base_c["args"]) <= set(c["args"]), set(base_c["args"]) - set(c["args"])
'
replicas_check "the replicas Deployment: readiness on gRPC health; liveness has one handler, not gRPC health" '
assert c["readinessProbe"]["grpc"]["port"] == 50051, c["readinessProbe"]
handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in c["livenessProbe"]]
assert len(handlers) == 1 and handlers != ["grpc"], handlers
'
replicas_check "the replicas data volume: a ReadWriteMany claim mounted at --data_dir" '
vols = {v["name"]: v for v in pod["volumes"]}
mount = [x for x in c["volumeMounts"] if x["mountPath"] == "/var/lib/zeroq"][0]
claim = vols[mount["name"]]["persistentVolumeClaim"]["claimName"]
pvc = one(m, "PersistentVolumeClaim", claim)
assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], pvc["spec"]["accessModes"]
assert "--data_dir=/var/lib/zeroq" in c["args"]
'
replicas_check "the example PostgreSQL: a postgres:15 StatefulSet, its headless Service, the Secret's uri and password match it" '
ss = one(r, "StatefulSet")
svc = one(r, "Service", ss["spec"]["serviceName"])
assert svc["spec"]["clusterIP"] == "None", svc["spec"]
sel = ss["spec"]["selector"]["matchLabels"]
labels = ss["spec"]["template"]["metadata"]["labels"]
assert svc["spec"]["selector"] == sel and all(labels[x] == y for x, y in sel.items()), sel
assert dep["spec"]["selector"]["matchLabels"].items() - labels.items(), "the zeroq Service would select the database"
pc = ss["spec"]["template"]["spec"]["containers"][0]
assert pc["image"].startswith("postgres:15"), pc["image"]
penv = {e["name"]: e for e in pc["env"]}
ref = penv["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
secret = one(r, "Secret", ref["name"])["stringData"]
assert ref["name"] == "zeroq-postgres" and ref["key"] in secret, ref
u = urllib.parse.urlsplit(secret["uri"])
assert u.hostname.split(".")[0] == svc["metadata"]["name"], u.hostname
assert u.port == svc["spec"]["ports"][0]["port"] and u.path == "/" + penv["POSTGRES_DB"]["value"], u
assert u.username == penv["POSTGRES_USER"]["value"] and u.password == secret[ref["key"]], u
assert "pg_isready" in pc["readinessProbe"]["exec"]["command"]
assert ss["spec"]["volumeClaimTemplates"], "no volume for the database"
'
replicas_check "Prometheus scrapes every replica: a headless Service on the pods, the scrape config on its name" '
svc = one(r, "Service", "zeroq-pods")
assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
cfg = yaml.safe_load(one(m, "ConfigMap", "prometheus-zeroq")["data"]["prometheus.yml"])
sd = cfg["scrape_configs"][0]["dns_sd_configs"][0]
assert sd["names"][0].startswith("zeroq-pods.zeroq.svc") and sd["port"] == 9464, sd
'
check "docker-compose.yml: the replicas profile is postgres (15, named volume, pg_isready), zeroq-a and zeroq-b" "$PY" -c '
import yaml
c = yaml.safe_load(open("docker-compose.yml"))
s = c["services"]
prof = {n for n, v in s.items() if "replicas" in v.get("profiles", [])}
assert prof == {"postgres", "zeroq-a", "zeroq-b"}, prof
pg = s["postgres"]
assert pg["image"] == "postgres:15-bookworm", pg["image"]
vol = [v.split(":") for v in pg["volumes"]]
assert any(src in c["volumes"] and dst == "/var/lib/postgresql/data" for src, dst, *_ in vol), vol
assert "pg_isready" in pg["healthcheck"]["test"], pg["healthcheck"]
assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${ZEROQ_PG_PASSWORD:-"), pg["environment"]
assert "listen_addresses=127.0.0.1" in pg["command"], pg["command"]
'
check "docker-compose.yml: the replicas use that PostgreSQL, their own ids and ports, one shared data volume" "$PY" -c '
import yaml, urllib.parse
c = yaml.safe_load(open("docker-compose.yml"))
s = c["services"]
pg = s["postgres"]
def arg(svc, flag):
    found = [a.split("=", 1)[1] for a in svc["command"] if a.startswith(flag + "=")]
    assert len(found) == 1, (flag, svc["command"])
    return found[0]
ids, listens, data = set(), set(), set()
for name in ("zeroq", "zeroq-a", "zeroq-b"):
    listens |= {arg(s[name], f) for f in ("--listen", "--http_listen", "--metrics_listen")}
for name in ("zeroq-a", "zeroq-b"):
    z = s[name]
    assert z["image"] == s["zeroq"]["image"] and z["command"][0] == "zeroq-server", name
    u = urllib.parse.urlsplit(arg(z, "--store"))
    assert u.scheme == "postgresql" and u.path == "/" + pg["environment"]["POSTGRES_DB"], u
    assert u.username == pg["environment"]["POSTGRES_USER"], u
    # Host network: PostgreSQL on loopback, on the port the postgres service uses.
    assert u.netloc.endswith("@127.0.0.1:" + pg["environment"]["PGPORT"]), (u.netloc, pg["environment"])
    assert u.password is None and z["environment"]["PGPASSWORD"] == pg["environment"]["POSTGRES_PASSWORD"]
    assert z["depends_on"]["postgres"]["condition"] == "service_healthy", z["depends_on"]
    assert z["environment"]["ZEROQ_SERVER"] == "127.0.0.1:" + arg(z, "--listen").rsplit(":", 1)[1]
    ids.add(arg(z, "--replica_id"))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in z["volumes"]}
    assert arg(z, "--data_dir") == "/var/lib/zeroq" and mounts["/etc/zeroq/tenants.json"]
    data.add(mounts["/var/lib/zeroq"])
assert len(ids) == 2, ids
assert len(listens) == 9, listens
assert len(data) == 1 and data <= set(c["volumes"]), data
# Not the single server'"'"'s volume: its SQLite store does not know these blobs.
assert not data & {v.split(":")[0] for v in s["zeroq"]["volumes"]}, data
'
if command -v docker-compose > /dev/null; then
  for profile in "" gpu replicas; do
    check "docker-compose config accepts docker-compose.yml${profile:+ with the $profile profile}" \
      bash -c 'docker-compose ${1:+--profile "$1"} -f docker-compose.yml config -q' _ "$profile"
  done
else
  echo "NOTE: no docker-compose here; docker-compose.yml was checked without it"
fi

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
