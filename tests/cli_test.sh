#!/usr/bin/env bash
# End-to-end test of the zeroq command line against a real zeroq-server (and
# real workers) on 127.0.0.1: every subcommand with tiny jobs on the example
# model, the one-shot quantize, the frontier's SVG plot, a watch that lives
# through a server crash and restart, and the exit codes (2 bad usage, 1
# server or job errors, 3 unreachable server).
#
#   ZEROQ=build/client/zeroq ZEROQ_SERVER_BIN=build/server/zeroq-server \
#     ZEROQ_WORKER=build/core/worker/zeroq-worker bash tests/cli_test.sh
set -euo pipefail

: "${ZEROQ:?set ZEROQ to the zeroq binary}"
: "${ZEROQ_SERVER_BIN:?set ZEROQ_SERVER_BIN to the zeroq-server binary}"
: "${ZEROQ_WORKER:?set ZEROQ_WORKER to the zeroq-worker binary}"
: "${ZEROQ_PYTHON:=/usr/bin/python3}"
cd "$(dirname "$0")/.."
MODEL=tests/models/fashion_cnn.pt
# The environment must not pick the server for us.
unset ZEROQ_SERVER ZEROQ_API_KEY
# Tiny jobs: a few seconds each on one thread.
TINY=(--iterations 20 --batch_size 8 --reconstruct_iterations 20 --threads 1 --seed 3)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/zeroq_cli_XXXXXX")
server_pid=
watch_pid=
cleanup() {
  if [[ -n $watch_pid ]]; then kill "$watch_pid" 2> /dev/null || true; fi
  if [[ -n $server_pid ]]; then kill -KILL "$server_pid" 2> /dev/null || true; fi
  wait 2> /dev/null || true
  if [[ ${failed:-1} -ne 0 && -f $tmp/server.log ]]; then
    echo "--- server log (tail)" >&2
    tail -n 30 "$tmp/server.log" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

source tests/check_lib.sh

# The server on a free port, or on port $1 (a restart keeps its address).
# A server with metrics gets none here, so that tests can run side by side.
server_flags=(--data_dir="$tmp/data" --port_file="$tmp/port"
              --worker="$ZEROQ_WORKER" --threads_per_job=1 --devices=cpu:2)
server_help=$("$ZEROQ_SERVER_BIN" --helpfull 2>&1 || true)
if grep -q -- '--metrics_listen' <<< "$server_help"; then
  server_flags+=(--metrics_listen=)
fi
start_server() {
  rm -f "$tmp/port"
  "$ZEROQ_SERVER_BIN" "${server_flags[@]}" --listen="127.0.0.1:${1:-0}" --http_listen= \
    2>> "$tmp/server.log" &
  server_pid=$!
  for _ in $(seq 400); do
    [[ -s $tmp/port ]] && break
    kill -0 "$server_pid" 2> /dev/null || break
    sleep 0.025
  done
  if [[ ! -s $tmp/port ]]; then
    echo "zeroq-server did not start" >&2
    exit 1
  fi
  port=$(cat "$tmp/port")
}

# run NAME ARGS...: zeroq against the server; stdout and stderr to
# $tmp/NAME.out and .err, the exit status in rc.
run() {
  last=$1
  shift
  rc=0
  "$ZEROQ" --server "127.0.0.1:$port" "$@" > "$tmp/$last.out" \
    2> "$tmp/$last.err" < /dev/null || rc=$?
}
# expect LABEL WANT [PATTERN]: the exit status of the last run, and a
# pattern in its stdout or stderr.
expect() {
  local label=$1 want=$2 pattern=${3:-}
  local output
  output=$(cat "$tmp/$last.out" "$tmp/$last.err")
  if [[ $rc -ne $want ]]; then
    fail "$label: exit $rc, want $want"
    tail -n 20 <<< "$output" | sed 's/^/    /' >&2
  elif [[ -n $pattern ]] && ! grep -q -- "$pattern" <<< "$output"; then
    fail "$label: output lacks \"$pattern\""
    tail -n 20 <<< "$output" | sed 's/^/    /' >&2
  else
    pass "$label"
  fi
}
# json FILE EXPR: evaluates EXPR on the first JSON line of FILE (as `o`);
# a tuple prints space-separated.
json() {
  "$ZEROQ_PYTHON" -c 'import json, sys
o = json.loads(open(sys.argv[1]).readline())
v = eval(sys.argv[2])
print(" ".join(map(str, v)) if isinstance(v, tuple) else v)' "$1" "$2"
}
# seqs_contiguous FILE: the [seq] of watch's lines are 1, 2, ..., N.
seqs_contiguous() {
  "$ZEROQ_PYTHON" - "$1" << 'EOF'
import re, sys
seqs = [int(m.group(1)) for m in
        (re.match(r"\[\s*(\d+)\]", l) for l in open(sys.argv[1])) if m]
ok = len(seqs) > 0 and seqs == list(range(1, len(seqs) + 1))
if not ok:
    print("seqs:", seqs, file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
}

start_server
echo "zeroq-server on 127.0.0.1:$port"

# --- Help -------------------------------------------------------------------
commands=(upload models submit jobs get watch cancel delete-job delete-model download frontier quantize)
run help help
expect "zeroq help" 0 "exit status"
for c in "${commands[@]}"; do
  check "zeroq help lists $c" grep -q "^  $c " "$tmp/help.out"
  run "help_$c" "$c" --help
  expect "zeroq $c --help" 0 "usage: zeroq $c"
done
run help_cmd help watch
expect "zeroq help watch" 0 "usage: zeroq watch JOB"
check "submit --help lists its options" grep -q -- "--sensitivity_from JOB" "$tmp/help_submit.out"
check "--help lists the global options" grep -q -- "--tls_ca FILE" "$tmp/help_get.out"

# --- Upload and models ------------------------------------------------------
run upload upload "$MODEL" --input_shape 1,28,28 --name "fashion <cnn>"
expect "upload" 0 "state READY"
check "upload names the model's layers" grep -q "6 quantizable layers" "$tmp/upload.out"
run upload_json --json upload "$MODEL" --input_shape 1,28,28
expect "upload --json" 0
model=$(json "$tmp/upload_json.out" 'o["id"]')
check "upload --json: deduplicated READY model" test \
  "$(json "$tmp/upload_json.out" 'o["state"], o.get("deduplicated")')" = "MODEL_READY True"
run models models
expect "models" 0 "$model"
check "models shows the name" grep -q "fashion <cnn>" "$tmp/models.out"
run models_json models --json
expect "models --json" 0
check "models --json: one object per line" "$ZEROQ_PYTHON" -c '
import json, sys
lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 1 and json.loads(lines[0])["id"] == sys.argv[2], lines
' "$tmp/models_json.out" "$model"
rc=0
last="env"
ZEROQ_SERVER="127.0.0.1:$port" "$ZEROQ" models > "$tmp/env.out" 2> "$tmp/env.err" || rc=$?
expect "ZEROQ_SERVER picks the server" 0 "$model"

# --- Submit, watch, jobs, get -----------------------------------------------
run submit submit "$model" --budget MP4 "${TINY[@]}" --priority 5 --request_id cli-1
expect "submit" 0 "submitted job j-"
job=$(grep -o 'j-[0-9a-f]*' "$tmp/submit.out" | head -n 1)
check "submit prints the job id alone on stdout (id=\$(zeroq submit ...))" \
  grep -qx "$job" "$tmp/submit.out"
check "... and its sentence on stderr" grep -q "submitted job $job" "$tmp/submit.err"
run get_output_json --output json get "$job"
expect "get --output json" 0
check "get --output json is the job as JSON" test "$(json "$tmp/get_output_json.out" 'o["id"]')" = "$job"
run bad_output --output yaml get "$job"
expect "--output yaml is bad usage" 2 "is not text or json"
run submit_again --json submit "$model" --budget MP4 "${TINY[@]}" --priority 5 --request_id cli-1
expect "submit with the same --request_id" 0
check "the same request id gives the same job" test "$(json "$tmp/submit_again.out" 'o["id"]')" = "$job"
run watch watch "$job"
expect "watch" 0 "SUCCEEDED"
check "watch prints seqs 1..N without gaps" seqs_contiguous "$tmp/watch.out"
for stage in DISTILL SENSITIVITY PARETO CALIBRATE EXPORT; do
  check "watch shows $stage" grep -q "\] $stage " "$tmp/watch.out"
done
check "watch is plain lines when not on a terminal" bash -c "! grep -q $'\r' '$tmp/watch.out'"
run watch_json --json watch "$job"
expect "watch --json" 0
check "watch --json: one event per line, seqs 1..N" "$ZEROQ_PYTHON" -c '
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
seqs = [int(e["seq"]) for e in events]
assert seqs == list(range(1, len(seqs) + 1)), seqs
assert events[-1]["state"] == "JOB_SUCCEEDED", events[-1]
' "$tmp/watch_json.out"

run jobs jobs
expect "jobs" 0 "$job"
check "jobs shows SUCCEEDED" grep -q "$job .* SUCCEEDED" "$tmp/jobs.out"
run jobs_state jobs --state succeeded --model "$model"
expect "jobs --state succeeded --model" 0 "$job"
run jobs_queued jobs --state queued
expect "jobs --state queued" 0
check "jobs --state queued leaves the job out" bash -c "! grep -q '$job' '$tmp/jobs_queued.out'"
run get get "$job"
expect "get" 0 "state     SUCCEEDED"
for layer in stem.0 down1.0 block.conv1 block.conv2 down2.0 fc; do
  check "get reports layer $layer" grep -q "^$layer " "$tmp/get.out"
done
check "get reports the frontier" grep -q "Pareto frontier: [0-9]* points" "$tmp/get.out"
run get_json --json get "$job"
expect "get --json" 0
check "get --json is the job" test "$(json "$tmp/get_json.out" 'o["id"], o["state"], o["priority"]')" = "$job JOB_SUCCEEDED 5"

# --- Download ---------------------------------------------------------------
run download download "$job" -o "$tmp/dl"
expect "download (all artifacts)" 0 "model.zeroq.pt"
check "download writes the artifacts with their SHA-256" "$ZEROQ_PYTHON" -c '
import hashlib, json, os, sys
job = json.loads(open(sys.argv[1]).readline())
arts = job["result"]["artifacts"]
assert sorted(a["name"] for a in arts) == sorted(os.listdir(sys.argv[2])), os.listdir(sys.argv[2])
for a in arts:
    data = open(os.path.join(sys.argv[2], a["name"]), "rb").read()
    assert hashlib.sha256(data).hexdigest() == a["sha256"], a["name"]
assert len(arts) == 4
' "$tmp/get_json.out" "$tmp/dl"
run download_one download "$job" report.json --out="$tmp/dl1"
expect "download one artifact" 0
check "download of one artifact writes only it" test "$(ls "$tmp/dl1")" = "report.json"
run download_bad download "$job" nope.bin -o "$tmp/dl2"
expect "download of an unknown artifact" 1 'has no artifact "nope.bin"'

# --- Frontier and its plot ----------------------------------------------------
run frontier frontier "$job" --svg "$tmp/frontier.svg"
expect "frontier" 0 "size KiB"
check "frontier marks one chosen point" test "$(grep -c -- '  \*  ' "$tmp/frontier.out")" = 1
check "frontier has a row per point" test \
  "$(grep -c '^ *[0-9][0-9]*  ' "$tmp/frontier.out")" = "$(json "$tmp/get_json.out" 'len(o["result"]["frontier"])')"
check "frontier --svg is well-formed XML with a circle per frontier point" \
  /usr/bin/python3 -c '
import json, sys, xml.dom.minidom
doc = xml.dom.minidom.parse(sys.argv[1])
job = json.loads(open(sys.argv[2]).readline())
circles = doc.getElementsByTagName("circle")
by = lambda c: [e for e in circles if e.getAttribute("class") == c]
assert len(by("frontier")) == len(job["result"]["frontier"]) > 1, len(by("frontier"))
assert len(by("chosen")) == 1
assert len(by("uniform")) == 5
labels = {t.firstChild.data for t in doc.getElementsByTagName("text") if t.firstChild}
assert {"W2", "W3", "W4", "W6", "W8", "weight size (KiB)"} <= labels, labels
assert any("total sensitivity" in l for l in labels), labels
' "$tmp/frontier.svg" "$tmp/get_json.out"
run frontier_json --json frontier "$job"
expect "frontier --json" 0
check "frontier --json: one point per line, one chosen" "$ZEROQ_PYTHON" -c '
import json, sys
pts = [json.loads(l) for l in open(sys.argv[1])]
assert len(pts) > 1 and sum(p["chosen"] for p in pts) == 1
' "$tmp/frontier_json.out"

# --- Re-plan, uniform job, cancel -------------------------------------------
run replan submit "$model" --budget MP3 --sensitivity_from "$job" --threads 1 \
  --reconstruct_iterations 20
expect "submit --sensitivity_from" 0 "submitted job"
replan=$(grep -o 'j-[0-9a-f]*' "$tmp/replan.out" | head -n 1)
run replan_watch watch "$replan"
expect "re-planned job succeeds" 0 "SUCCEEDED"
run uniform submit "$model" --weight_bits 4 --activation_bits 8 "${TINY[@]}" --device cpu
expect "submit --weight_bits" 0
uniform=$(grep -o 'j-[0-9a-f]*' "$tmp/uniform.out" | head -n 1)
run uniform_watch watch "$uniform"
expect "uniform job succeeds" 0 "SUCCEEDED"
run uniform_frontier frontier "$uniform"
expect "frontier of a uniform job" 1 "no Pareto frontier"

run long submit "$model" --budget MP4 --iterations 100000 --batch_size 8 --threads 1
expect "submit a long job" 0
long=$(grep -o 'j-[0-9a-f]*' "$tmp/long.out" | head -n 1)
run cancel cancel "$long"
expect "cancel" 0 "job $long is"
run cancel_watch watch "$long"
expect "watch of a cancelled job exits 1" 1 "job $long CANCELLED"
run cancel_again cancel "$long"
expect "cancel of a finished job" 0 "CANCELLED"
run cancelled_download download "$long" -o "$tmp/x"
expect "download of a cancelled job" 1 "FAILED_PRECONDITION"
run running submit "$model" --budget MP4 --iterations 100000 --batch_size 8 --threads 1
expect "submit another long job" 0
running=$(head -n 1 "$tmp/running.out")
run delete_running delete-job "$running"
expect "delete-job of a queued or running job" 1 "cancel it first"
run delete_model_in_use delete-model "$model"
expect "delete-model while a job uses it" 1 "FAILED_PRECONDITION"
run cancel_running cancel "$running"
expect "cancel the other long job" 0
run delete_cancelled delete-job "$long"
expect "delete-job of a cancelled job" 0 "deleted job $long; 0 B freed"
run get_deleted get "$long"
expect "get of a deleted job" 1 "NOT_FOUND"
run delete_uniform --json delete-job "$uniform"
expect "delete-job --json" 0 "freedBytes"

# --- One-shot quantize --------------------------------------------------------
run quantize quantize "$MODEL" --input_shape 1,28,28 --budget MP4 \
  --activation_bits 8 "${TINY[@]}" -o "$tmp/q"
expect "quantize" 0 "Pareto frontier"
for f in model.zeroq.pt recipe.json distilled.pt report.json; do
  check "quantize downloads $f" test -s "$tmp/q/$f"
done
check "quantize prints the per-layer report" grep -q "^block.conv1 " "$tmp/quantize.out"
check "quantize shows the progress" grep -q "\] DISTILL " "$tmp/quantize.out"
run quantize_json --json quantize "$MODEL" --input_shape 1,28,28 --weight_bits 8 \
  "${TINY[@]}" -o "$tmp/qj"
expect "quantize --json" 0
check "quantize --json: JSON lines, the last the SUCCEEDED job" "$ZEROQ_PYTHON" -c '
import json, sys
objs = [json.loads(l) for l in open(sys.argv[1])]
assert objs[0]["state"] == "MODEL_READY", objs[0]
assert objs[-1]["state"] == "JOB_SUCCEEDED", objs[-1]
' "$tmp/quantize_json.out"

# --- Bad usage: exit 2, nothing sent ----------------------------------------
run u_cmd frobnicate
expect "unknown command" 2 'unknown command "frobnicate"'
run u_none
expect "no command" 2 "no command given"
run u_flag submit "$model" --bugdet MP4
expect "misspelt flag" 2 "did you mean --budget"
run u_noshape upload "$MODEL"
expect "upload without --input_shape" 2 "--input_shape is required"
run u_shape upload "$MODEL" --input_shape 1,x,28
expect "bad --input_shape" 2 '--input_shape: "x" is not a positive integer'
run u_file upload "$tmp/missing.pt" --input_shape 1,28,28
expect "missing model file" 2 "cannot read model file"
run u_both submit "$model" --budget MP4 --weight_bits 4
expect "--budget with --weight_bits" 2 "exclude each other"
run u_bits submit "$model" --weight_bits 12
expect "bad --weight_bits" 2 "out of range"
run u_device submit "$model" --device tpu
expect "bad --device" 2 "--device"
run u_state jobs --state "done"
expect "bad --state" 2 "--state"
run u_noout download "$job"
expect "download without -o" 2 "--out DIR is required"
run u_args get "$job" extra
expect "extra argument" 2 'unexpected argument "extra"'
run u_missing watch
expect "missing argument" 2 "missing JOB"
run u_qout quantize "$MODEL" --input_shape 1,28,28
expect "quantize without -o" 2 "--out DIR is required"

# --- Server errors: exit 1 --------------------------------------------------
run e_get get j-nope
expect "get of an unknown job" 1 'NOT_FOUND: job "j-nope" not found'
run e_watch watch j-nope
expect "watch of an unknown job" 1 "NOT_FOUND"
run e_cancel cancel j-nope
expect "cancel of an unknown job" 1 "NOT_FOUND"
run e_submit submit m-nope --budget MP4
expect "submit on an unknown model" 1 "NOT_FOUND"
run e_invalid upload "$MODEL" --input_shape 3,28,28
expect "upload of a model the shape does not fit" 1 "INVALID"

# --- Unreachable server: exit 3 ---------------------------------------------
closed=$("$ZEROQ_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rc=0
last=e_down
"$ZEROQ" --server "127.0.0.1:$closed" models > "$tmp/e_down.out" 2> "$tmp/e_down.err" || rc=$?
expect "unreachable server" 3 "cannot reach the server at 127.0.0.1:$closed"

# --- Watch across a server crash ----------------------------------------------
# A longer job; the server is killed (SIGKILL, its worker dies with it) while
# `zeroq watch` follows it, and restarted on the same data and port: the job
# is re-queued, and the watch resumes after the last event it printed.
run crash submit "$model" --budget MP4 --iterations 1500 --batch_size 8 --threads 1
expect "submit the crash job" 0
crash=$(grep -o 'j-[0-9a-f]*' "$tmp/crash.out" | head -n 1)
"$ZEROQ" --server "127.0.0.1:$port" watch "$crash" > "$tmp/crash_watch.out" \
  2> "$tmp/crash_watch.err" &
watch_pid=$!
for _ in $(seq 600); do
  grep -q "\] DISTILL .*[1-9]/1500" "$tmp/crash_watch.out" && break
  sleep 0.05
done
check "the watch saw distillation before the crash" grep -q "\] DISTILL " "$tmp/crash_watch.out"
kill -KILL "$server_pid"
wait "$server_pid" 2> /dev/null || true
sleep 0.5
start_server "$port"
rc=0
for _ in $(seq 1800); do
  kill -0 "$watch_pid" 2> /dev/null || break
  sleep 0.05
done
if kill -0 "$watch_pid" 2> /dev/null; then
  kill "$watch_pid"
  fail "watch did not finish within 90 s of the restart"
fi
wait "$watch_pid" || rc=$?
watch_pid=
last=crash_watch
expect "watch across a server crash and restart" 0 "job $crash SUCCEEDED"
check "the watch across the crash has no gaps in seq" seqs_contiguous "$tmp/crash_watch.out"
check "the job was re-run after the restart" grep -q "RUNNING: .*attempt 2" "$tmp/crash_watch.out"

# --- Clean stop ---------------------------------------------------------------
kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
server_pid=
check "zeroq-server stops cleanly on SIGTERM" test "$rc" -eq 0

# --- Devices ------------------------------------------------------------------
# A CUDA device that is not on this machine fails at start, saying so; auto
# without any GPU says it serves the CPU (checked only where there is none).
if ! ls /dev/nvidia[0-9]* > /dev/null 2>&1; then
  rc=0
  timeout 20 "$ZEROQ_SERVER_BIN" --data_dir="$tmp/data-cuda" --listen=127.0.0.1:0 --http_listen= \
    --metrics_listen= --devices=cuda:0:1 2> "$tmp/cuda_start.err" || rc=$?
  check "--devices=cuda:0:1 without a GPU: zeroq-server exits 1" test "$rc" -eq 1
  check "... saying that CUDA device 0 is not on this machine" \
    grep -q "CUDA device 0 is not on this machine" "$tmp/cuda_start.err"
  "$ZEROQ_SERVER_BIN" --data_dir="$tmp/data-auto" --listen=127.0.0.1:0 --http_listen= \
    --port_file="$tmp/port-auto" --metrics_listen= --devices=auto \
    2> "$tmp/auto_start.err" &
  auto_pid=$!
  for _ in $(seq 400); do [[ -s $tmp/port-auto ]] && break; sleep 0.025; done
  kill -TERM "$auto_pid" 2> /dev/null || true
  wait "$auto_pid" 2> /dev/null || true
  check "--devices=auto without a GPU: one line, serving the CPU only" \
    test "$(grep -c "no CUDA device found .*serving the CPU only" "$tmp/auto_start.err")" -eq 1
  check "... and the devices are the CPU's" grep -q "devices cpu (1 slot)" "$tmp/auto_start.err"
fi

report_checks
