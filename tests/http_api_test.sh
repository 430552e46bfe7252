#!/usr/bin/env bash
# End-to-end test of the HTTP/JSON API with curl, against a real zeroq-server
# (and real workers) on 127.0.0.1: keys and tenants, upload, a bad config,
# submit, the event stream (replay, a resume by Last-Event-ID that misses and
# repeats nothing, heartbeats, the end), cancel, ranged downloads, delete,
# the metrics of routes and streams, and the streams' end at shutdown.
#
#   ZEROQ_SERVER_BIN=build/server/zeroq-server \
#     ZEROQ_WORKER=build/core/worker/zeroq-worker bash tests/http_api_test.sh
set -euo pipefail

: "${ZEROQ_SERVER_BIN:?set ZEROQ_SERVER_BIN to the zeroq-server binary}"
: "${ZEROQ_WORKER:?set ZEROQ_WORKER to the zeroq-worker binary}"
: "${ZEROQ_PYTHON:=/usr/bin/python3}"
cd "$(dirname "$0")/.."
MODEL=tests/models/fashion_cnn.pt

tmp=$(mktemp -d "${TMPDIR:-/tmp}/zeroq_http_XXXXXX")
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then kill -KILL "$server_pid" 2> /dev/null || true; fi
  jobs -p | xargs -r kill 2> /dev/null || true
  wait 2> /dev/null || true
  if [[ ${failed:-1} -ne 0 && -f $tmp/server.log ]]; then
    echo "--- server log (tail)" >&2
    tail -n 30 "$tmp/server.log" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
source tests/check_lib.sh

KEY_A=key-of-acme
KEY_Z=key-of-zeta
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
cat > "$tmp/tenants.json" << EOF
{"tenants": [{"name": "acme", "api_key_sha256": ["$(sha $KEY_A)"]},
             {"name": "zeta", "api_key_sha256": ["$(sha $KEY_Z)"]}]}
EOF
metrics_port=$("$ZEROQ_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$ZEROQ_SERVER_BIN" --data_dir="$tmp/data" --listen=127.0.0.1:0 --port_file="$tmp/port" \
  --http_listen=127.0.0.1:0 --http_port_file="$tmp/http_port" \
  --metrics_listen="127.0.0.1:$metrics_port" --worker="$ZEROQ_WORKER" \
  --devices=cpu:1 --threads_per_job=1 --heartbeat_interval=300ms --shutdown_grace=1s \
  --tenants_file="$tmp/tenants.json" 2>> "$tmp/server.log" &
server_pid=$!
for _ in $(seq 400); do
  [[ -s $tmp/port ]] && break
  sleep 0.025
done
[[ -s $tmp/http_port ]] || { echo "zeroq-server did not start" >&2; exit 1; }
base="http://127.0.0.1:$(cat "$tmp/http_port")"
echo "zeroq-server with HTTP on $base"

# curl as a tenant: prints the body; the status goes to $tmp/status.
as() {
  local key=$1
  shift
  curl -s -o "$tmp/body" -w '%{http_code}' -H "Authorization: Bearer $key" "$@" \
    > "$tmp/status" || true
  cat "$tmp/body"
}
status() { cat "$tmp/status"; }
json() { "$ZEROQ_PYTHON" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# --- Keys -------------------------------------------------------------------
curl -s -D "$tmp/h401" -o "$tmp/b401" "$base/v1/jobs" || true
check "no key: 401" grep -q "^HTTP/1.1 401" "$tmp/h401"
check "no key: WWW-Authenticate: Bearer" grep -qi "^WWW-Authenticate: Bearer" "$tmp/h401"
check "no key: the error body names UNAUTHENTICATED" grep -q '"status":"UNAUTHENTICATED"' "$tmp/b401"
as wrong-key "$base/v1/models" > /dev/null
check "wrong key: 401" test "$(status)" = 401

# --- Upload -------------------------------------------------------------------
model_sha=$(sha256sum "$MODEL" | cut -d' ' -f1)
model=$(as $KEY_A -X POST --data-binary @"$MODEL" -H "Content-Type: application/octet-stream" \
  "$base/v1/models?name=fashion&input_shape=1,28,28&sha256=$model_sha" | json 'd["id"]')
check "upload: 200" test "$(status)" = 200
for _ in $(seq 200); do
  state=$(as $KEY_A "$base/v1/models/$model" | json 'd["state"]')
  [[ $state != MODEL_INSPECTING ]] && break
  sleep 0.1
done
check "the uploaded model is READY" test "$state" = MODEL_READY
as $KEY_A -X POST --data-binary @"$MODEL" \
  "$base/v1/models?name=bad&input_shape=1,28,28&sha256=$(sha other)" > "$tmp/bad_upload"
check "a wrong SHA-256: DATA_LOSS, 500" test "$(status)" = 500
check "a wrong SHA-256 is named" grep -q DATA_LOSS "$tmp/bad_upload"
# The same bytes through the headers instead of the query: the same model.
again=$(as $KEY_A -X POST --data-binary @"$MODEL" -H "X-Model-Name: again" \
  -H "X-Input-Shape: 1,28,28" -H "X-Content-SHA256: $model_sha" "$base/v1/models" | json 'd["id"]')
check "upload with headers: deduplicated to the same model" test "$again" = "$model"

# --- Submit -------------------------------------------------------------------
as $KEY_A -X POST -d "{\"modelId\":\"$model\",\"config\":{\"distillation\":{\"batchSize\":4096}}}" \
  "$base/v1/jobs" > "$tmp/bad_config"
check "a bad config: 400" test "$(status)" = 400
check "a bad config: the field is named" grep -q 'config.distillation.batch_size' "$tmp/bad_config"
as $KEY_A -X POST -d '{"modelId": 3' "$base/v1/jobs" > "$tmp/bad_json"
check "malformed JSON: 400" test "$(status)" = 400
config='"config":{"budget":"MP4","threads":1,"distillation":{"iterations":800,"batchSize":8}}'
job=$(as $KEY_A -X POST -d "{\"modelId\":\"$model\",$config,\"requestId\":\"http-1\"}" \
  "$base/v1/jobs" | json 'd["id"]')
check "submit: 200" test "$(status)" = 200
retry=$(as $KEY_A -X POST -d "{\"modelId\":\"$model\",$config,\"requestId\":\"http-1\"}" \
  "$base/v1/jobs" | json 'd["id"]')
check "submit is idempotent on requestId" test "$retry" = "$job"
# Queued behind it on the one slot: quiet until the first ends.
quiet=$(as $KEY_A -X POST -d "{\"modelId\":\"$model\",$config}" "$base/v1/jobs" | json 'd["id"]')

# --- Events: a live stream cut, then resumed by Last-Event-ID -------------------
events() {  # events KEY JOB OUT [curl options...]
  local key=$1 job=$2 out=$3
  shift 3
  curl -s -N -H "Authorization: Bearer $key" "$@" "$base/v1/jobs/$job/events" > "$out" || true
}
# Cut after a second of live events (curl's --max-time), then resume.
events $KEY_A "$job" "$tmp/ev1" --max-time 1.5
last=$(grep '^id: ' "$tmp/ev1" | tail -n 1 | cut -d' ' -f2)
check "the first connection got events" test -n "$last"
events $KEY_A "$job" "$tmp/ev2" -H "Last-Event-ID: $last"
check "the resumed stream ends with the final state" grep -q '"state":"JOB_SUCCEEDED"' "$tmp/ev2"
check "the stream's last event is 'end'" bash -c "grep '^event: ' '$tmp/ev2' | tail -n 1 | grep -q 'event: end'"
# The ids of both connections: 1..N, each once.
cat "$tmp/ev1" "$tmp/ev2" | grep '^id: ' | cut -d' ' -f2 > "$tmp/ids"
check "cut and resumed: every event once, in order (1..N)" "$ZEROQ_PYTHON" -c '
import sys
ids = [int(l) for l in open(sys.argv[1])]
assert ids == list(range(1, len(ids) + 1)), ids
' "$tmp/ids"
check "each event's data carries its seq" "$ZEROQ_PYTHON" -c '
import json, sys
blocks = open(sys.argv[1]).read().split("\n\n")
for b in blocks:
    lines = dict(l.split(": ", 1) for l in b.splitlines() if ": " in l and not l.startswith(":"))
    if "id" in lines:
        assert json.loads(lines["data"])["seq"] == lines["id"], b
' "$tmp/ev2"
# A whole replay after the end equals the two pieces; ?after_seq= works too.
events $KEY_A "$job" "$tmp/ev_all"
check "a replay holds the same events" bash -c "diff <(grep '^id: ' '$tmp/ev_all' | cut -d' ' -f2) '$tmp/ids'"
events $KEY_A "$job" "$tmp/ev_after" "-G" --data-urlencode "after_seq=$last"
check "?after_seq= replays the same rest" bash -c "diff <(grep '^id: ' '$tmp/ev_after') <(grep '^id: ' '$tmp/ev2')"

# --- Heartbeats, then cancel ----------------------------------------------------
# The quiet job runs now; a third one waits behind it and stays quiet.
waiting=$(as $KEY_A -X POST -d "{\"modelId\":\"$model\",$config}" "$base/v1/jobs" | json 'd["id"]')
events $KEY_A "$waiting" "$tmp/ev_quiet" --max-time 1.2
check "a quiet stream gets heartbeat comments" bash -c "test \$(grep -c '^: heartbeat' '$tmp/ev_quiet') -ge 2"
events $KEY_A "$waiting" "$tmp/ev_cancel" &
stream_pid=$!
sleep 0.5
cancelled=$(as $KEY_A -X POST "$base/v1/jobs/$waiting:cancel" | json 'd["state"]')
check "cancel: 200, the queued job is CANCELLED" test "$cancelled" = JOB_CANCELLED
wait "$stream_pid" || true
check "the watcher's stream ends with the cancelled state" grep -q '"state":"JOB_CANCELLED"' "$tmp/ev_cancel"

# --- Downloads with Range ---------------------------------------------------------
as $KEY_A "$base/v1/jobs/$job" > "$tmp/job.json"
recipe_sha=$(json '[a["sha256"] for a in d["result"]["artifacts"] if a["name"] == "model.zeroq.pt"][0]' < "$tmp/job.json")
recipe_size=$(json '[a["sizeBytes"] for a in d["result"]["artifacts"] if a["name"] == "model.zeroq.pt"][0]' < "$tmp/job.json")
url="$base/v1/jobs/$job/artifacts/model.zeroq.pt"
curl -s -H "Authorization: Bearer $KEY_A" -o "$tmp/full" -D "$tmp/full_h" "$url"
check "download: the bytes' SHA-256 is the artifact's" test "$(sha256sum "$tmp/full" | cut -d' ' -f1)" = "$recipe_sha"
check "download: Accept-Ranges: bytes" grep -qi '^Accept-Ranges: bytes' "$tmp/full_h"
curl -s -H "Authorization: Bearer $KEY_A" -H "Range: bytes=0-999" -o "$tmp/p1" -D "$tmp/p1_h" "$url"
curl -s -H "Authorization: Bearer $KEY_A" -H "Range: bytes=1000-" -o "$tmp/p2" -D "$tmp/p2_h" "$url"
check "a range: 206" grep -q '^HTTP/1.1 206' "$tmp/p1_h"
check "a range: Content-Range" grep -qi "^Content-Range: bytes 0-999/$recipe_size" "$tmp/p1_h"
check "two ranges make the whole artifact" bash -c "cat '$tmp/p1' '$tmp/p2' | cmp -s - '$tmp/full'"
check "curl -C - resumes a cut download" bash -c "
  head -c 777 '$tmp/full' > '$tmp/resumed'
  curl -s -H 'Authorization: Bearer $KEY_A' -C - -o '$tmp/resumed' '$url' && cmp -s '$tmp/resumed' '$tmp/full'"
curl -s -H "Authorization: Bearer $KEY_A" -H "Range: bytes=$recipe_size-" -o /dev/null -w '%{http_code}' "$url" > "$tmp/s416"
check "a range past the end: 416" test "$(cat "$tmp/s416")" = 416

# --- Tenants ------------------------------------------------------------------------
as $KEY_Z "$base/v1/jobs/$job" > /dev/null
check "another tenant's job: 404" test "$(status)" = 404
as $KEY_Z "$base/v1/jobs/$job/events" > /dev/null
check "another tenant's events: 404" test "$(status)" = 404
as $KEY_Z "$url" > /dev/null
check "another tenant's artifact: 404" test "$(status)" = 404
as $KEY_Z -X POST "$base/v1/jobs/$job:cancel" > /dev/null
check "another tenant's cancel: 404" test "$(status)" = 404
n=$(as $KEY_Z "$base/v1/jobs" | json 'len(d.get("jobs", []))')
check "another tenant lists none of them" test "$n" = 0

# --- Lists, views, delete -------------------------------------------------------------
as $KEY_A "$base/v1/jobs?state=JOB_SUCCEEDED&page_size=1" > "$tmp/list.json"
check "list: filter and page" "$ZEROQ_PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert len(d["jobs"]) == 1 and d["jobs"][0]["state"] == "JOB_SUCCEEDED", d
assert "layers" not in d["jobs"][0].get("result", {}), "the summary view has no per-layer table"
' "$tmp/list.json"
as $KEY_A "$base/v1/jobs?view=JOB_VIEW_FULL&state=JOB_SUCCEEDED" > "$tmp/full.json"
check "list: the full view has the per-layer table" grep -q '"layers"' "$tmp/full.json"
as $KEY_A "$base/v1/jobs?colour=blue" > "$tmp/bad_query"
check "an unknown query parameter: 400" test "$(status)" = 400
freed=$(as $KEY_A -X DELETE "$base/v1/jobs/$waiting" | json 'd.get("freedBytes", "0")')
check "delete a cancelled job: nothing freed" test "$freed" = 0
as $KEY_A "$base/v1/jobs/$waiting" > /dev/null
check "the deleted job is gone" test "$(status)" = 404
as $KEY_A -X GET "$base/v2/nothing" > /dev/null
check "an unknown route: 404" test "$(status)" = 404

# --- The dashboard page ------------------------------------------------------------
curl -s -D "$tmp/dash_h" -o "$tmp/dash" "$base/"
check "the dashboard: HTML without a key" grep -qi '^Content-Type: text/html' "$tmp/dash_h"
curl -s -o /dev/null -w '%{http_code}' "$base/dashboard/app.js" > "$tmp/s_js"
check "the dashboard's script is served" test "$(cat "$tmp/s_js")" = 200

# --- Metrics ------------------------------------------------------------------------------
curl -s "http://127.0.0.1:$metrics_port/metrics" > "$tmp/metrics"
check "metrics: requests by route and code" grep -q 'zeroq_http_requests_total{code="200",route="GET /v1/jobs/{id}"}' "$tmp/metrics"
check "metrics: the 401s" grep -q 'zeroq_http_requests_total{code="401"' "$tmp/metrics"
check "metrics: the open-streams gauge" grep -q '^zeroq_sse_streams ' "$tmp/metrics"

# --- Shutdown: open streams are told where to resume -----------------------------------
# The job that is running (the quiet one, or its successor) keeps the slot
# busy; a new queued job's watcher is open when SIGTERM comes.
last_job=$(as $KEY_A -X POST -d "{\"modelId\":\"$model\",\"config\":{\"threads\":1,\"distillation\":{\"iterations\":100000,\"batchSize\":8}}}" \
  "$base/v1/jobs" | json 'd["id"]')
behind=$(as $KEY_A -X POST -d "{\"modelId\":\"$model\",$config}" "$base/v1/jobs" | json 'd["id"]')
events $KEY_A "$behind" "$tmp/ev_stop" &
stream_pid=$!
sleep 0.8
kill -TERM "$server_pid"
wait "$stream_pid" || true
check "at SIGTERM the stream ends with an error event" grep -q '^event: error' "$tmp/ev_stop"
check "... that says where to resume" grep -q 'resume with after_seq=' "$tmp/ev_stop"
check "... and is UNAVAILABLE" grep -q '"status":"UNAVAILABLE"' "$tmp/ev_stop"
wait "$server_pid"
check "the server exits 0" test $? -eq 0
server_pid=
: "$last_job"

report_checks
