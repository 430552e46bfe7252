#!/usr/bin/env bash
# End-to-end test of the zeroq-quantize command line on the committed models:
# a real job on fashion_cnn (summary, progress, artifacts, --json, the model
# loads in Python), then the usage errors (exit 2) and job errors (exit 1).
#
#   ZEROQ_QUANTIZE=build/core/tools/zeroq-quantize ZEROQ_PYTHON=/usr/bin/python3 \
#     bash tests/zeroq_quantize_cli_test.sh
set -euo pipefail

: "${ZEROQ_QUANTIZE:?set ZEROQ_QUANTIZE to the zeroq-quantize binary}"
: "${ZEROQ_PYTHON:=python3}"
cd "$(dirname "$0")/.."
MODELS=tests/models

tmp=$(mktemp -d "${TMPDIR:-/tmp}/zeroq_cli_XXXXXX")
trap 'rm -rf "$tmp"' EXIT

source tests/check_lib.sh
# run_cli OUT_PREFIX ARGS...: runs the tool, stdout/stderr to files, sets rc.
run_cli() {
  local prefix=$1
  shift
  rc=0
  "$ZEROQ_QUANTIZE" "$@" >"$prefix.out" 2>"$prefix.err" || rc=$?
}
# expect_exit NAME WANT PREFIX [PATTERN]: exit status and a stderr pattern.
expect_exit() {
  local name=$1 want=$2 prefix=$3 pattern=${4:-}
  if [[ $rc -ne $want ]]; then
    fail "$name: exit $rc, want $want"
    sed 's/^/    /' "$prefix.err" >&2 || true
    return
  fi
  if [[ -n $pattern ]] && ! grep -q -- "$pattern" "$prefix.err"; then
    fail "$name: stderr lacks \"$pattern\""
    sed 's/^/    /' "$prefix.err" >&2 || true
    return
  fi
  pass "$name"
}

# --- A real job -------------------------------------------------------------
out=$tmp/out
run_cli "$tmp/job" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --iterations=30 --batch_size=16 --threads=2 --progress=lines --out="$out"
expect_exit "job succeeds" 0 "$tmp/job"
for name in stem.0 down1.0 block.conv1 block.conv2 down2.0 fc; do
  check "summary names layer $name" grep -q -- "$name" "$tmp/job.out"
done
check "summary reports agreement" grep -q "top-1 agreement" "$tmp/job.out"
check "summary reports 8-bit weights" grep -q "8.00 bits average" "$tmp/job.out"
for stage in INSPECT DISTILL CALIBRATE EXPORT; do
  check "progress line for $stage" grep -q "^$stage " "$tmp/job.err"
done
for f in model.zeroq.pt recipe.json distilled.pt report.json; do
  check "artifact $f written" test -s "$out/$f"
done
check "no temporary files left" \
  test "$(ls "$out" | sort | tr '\n' ' ')" = "distilled.pt model.zeroq.pt recipe.json report.json "

check "recipe.json has 6 layers at 8 bits" "$ZEROQ_PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r["layers"]) == 6, r["layers"]
assert all(l["bits"] == 8 for l in r["layers"])
assert all(len(l["scale"]) == l["weight_shape"][0] for l in r["layers"])
assert len(r["activations"]) == 5
' "$out/recipe.json"

check "exported model loads in Python and gives [N,10]" "$ZEROQ_PYTHON" -c '
import sys, torch
m = torch.jit.load(sys.argv[1] + "/model.zeroq.pt")
x = torch.load(sys.argv[1] + "/distilled.pt")
assert tuple(x.shape) == (16, 1, 28, 28), x.shape
with torch.no_grad():
    y = m(x)
assert tuple(y.shape) == (16, 10), y.shape
assert torch.isfinite(y).all()
' "$out"

# --json prints the report instead of the table; --progress=none is quiet.
# At 4 bits the default (auto) reconstructs, here with few steps.
run_cli "$tmp/json" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --iterations=10 --batch_size=8 --threads=2 --progress=none --json \
  --weight_bits=4 --reconstruct_iterations=20 --out="$tmp/json_out"
expect_exit "--json job succeeds" 0 "$tmp/json"
check "--json output parses" "$ZEROQ_PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r["layers"]) == 6
assert all(l["bits"] == 4 for l in r["layers"]), r["layers"]
assert r["samples"] == 8
assert set(r["stage_seconds"]) == {"INSPECT", "DISTILL", "CALIBRATE", "RECONSTRUCT", "EXPORT"}, r["stage_seconds"]
assert r["reconstruction"]["iterations"] == 20, r["reconstruction"]
' "$tmp/json.out"
check "--progress=none prints no progress" test ! -s "$tmp/json.err"

# --activation_range names the method each site's range came from (default
# mse); --early_stop_window ends distillation once the loss has converged.
check "default activation ranges are mse" "$ZEROQ_PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
assert [a["range"] for a in r["activations"]] == ["mse"] * 5, r["activations"]
' "$out/recipe.json"
run_cli "$tmp/range" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --iterations=60 --batch_size=8 --threads=2 --progress=none --json \
  --activation_range=percentile --activation_percentile=99.9 \
  --early_stop_window=5 --early_stop_tolerance=0.5 --out="$tmp/range_out"
expect_exit "--activation_range and --early_stop_window job succeeds" 0 "$tmp/range"
check "percentile ranges and an early stop in the report" "$ZEROQ_PYTHON" -c '
import json, sys
r = json.load(open(sys.argv[1]))
assert all(a["range"] == "percentile 99.9" for a in r["activations"]), r["activations"]
assert 5 < r["distill_iterations"] < 60, r["distill_iterations"]
' "$tmp/range.out"

# --- Usage errors: exit 2 ---------------------------------------------------
run_cli "$tmp/nomodel" --input_shape=1,28,28 --out="$tmp/x"
expect_exit "missing --model" 2 "$tmp/nomodel" "--model is required"
run_cli "$tmp/badshape" --model="$MODELS/fashion_cnn.pt" --input_shape=1,x,28 \
  --out="$tmp/x"
expect_exit "bad --input_shape" 2 "$tmp/badshape" "input_shape"
run_cli "$tmp/noshape" --model="$MODELS/fashion_cnn.pt" --out="$tmp/x"
expect_exit "missing --input_shape" 2 "$tmp/noshape" "input_shape"
run_cli "$tmp/nofile" --model="$tmp/missing.pt" --input_shape=1,28,28 \
  --out="$tmp/x"
expect_exit "unreadable model file" 2 "$tmp/nofile" "missing.pt"
run_cli "$tmp/badprogress" --model="$MODELS/fashion_cnn.pt" \
  --input_shape=1,28,28 --out="$tmp/x" --progress=sometimes
expect_exit "bad --progress" 2 "$tmp/badprogress" "progress"
run_cli "$tmp/badrange" --model="$MODELS/fashion_cnn.pt" \
  --input_shape=1,28,28 --out="$tmp/x" --activation_range=median
expect_exit "bad --activation_range" 2 "$tmp/badrange" "minmax, percentile or mse"
run_cli "$tmp/rangepct" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --check_config --activation_range=mse --activation_percentile=99
expect_exit "--activation_percentile with mse ranges" 2 "$tmp/rangepct" \
  "activation_percentile"
run_cli "$tmp/window" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --check_config --early_stop_window=-1
expect_exit "--early_stop_window=-1" 2 "$tmp/window" "early_stop_window"
run_cli "$tmp/recon" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --check_config --reconstruct=adaround --reconstruct_iterations=0
expect_exit "--reconstruct=adaround --reconstruct_iterations=0 (the default)" 0 \
  "$tmp/recon"
check "... prints config ok" grep -q "config ok" "$tmp/recon.out"
run_cli "$tmp/badrecon" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --check_config --reconstruct=brecq
expect_exit "bad --reconstruct" 2 "$tmp/badrecon" "none, adaround, block or auto"
run_cli "$tmp/reconiter" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --check_config --reconstruct_iterations=100001
expect_exit "--reconstruct_iterations=100001" 2 "$tmp/reconiter" \
  "reconstruction.iterations"
run_cli "$tmp/recondrop" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --check_config --reconstruct_drop_probability=2
expect_exit "--reconstruct_drop_probability=2" 2 "$tmp/recondrop" \
  "reconstruction options out of range"

# --- Job errors: exit 1 -----------------------------------------------------
run_cli "$tmp/nobn" --model="$MODELS/no_batchnorm.pt" --input_shape=3,8,8 \
  --iterations=5 --out="$tmp/nobn_out"
expect_exit "model without BatchNorm" 1 "$tmp/nobn" "BatchNorm"
run_cli "$tmp/wrongshape" --model="$MODELS/fashion_cnn.pt" --input_shape=3,28,28 \
  --iterations=5 --out="$tmp/wrongshape_out"
expect_exit "input shape the model rejects" 1 "$tmp/wrongshape" "3,28,28"
run_cli "$tmp/bits" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --iterations=5 --weight_bits=9 --out="$tmp/bits_out"
expect_exit "--weight_bits=9" 1 "$tmp/bits" "weight"
check "no artifacts after a failed job" test ! -e "$tmp/bits_out/model.zeroq.pt"
run_cli "$tmp/layer" --model="$MODELS/fashion_cnn.pt" --input_shape=1,28,28 \
  --iterations=5 --layer_bits=nope=4 --out="$tmp/layer_out"
expect_exit "--layer_bits with an unknown layer" 1 "$tmp/layer" "nope"

report_checks
