#!/usr/bin/env bash
# The checks that need a GPU (none of the project's own machines has one):
#   bash scripts/gpu_check.sh            # on a machine with an NVIDIA GPU
# 1. installs and builds as the tests do;
# 2. runs the core tests that take a device on cuda:0 (ZEROQ_TEST_DEVICE):
#    the CUDA half loads, jobs distill, sweep, calibrate and export on the
#    GPU, exports load back on the CPU;
# 3. starts zeroq-server with one CUDA slot and one CPU slot, quantizes the
#    example model through it on each (MP4 weights, 8-bit activations, batch
#    64, 500 iterations) and prints the stage timings side by side.
# Takes about 5 minutes on one GPU after the build. Exit status 0: all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/torch_env.sh
bash scripts/build.sh

if ! ls /dev/nvidia[0-9]* > /dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (no /dev/nvidiaN); nothing to check" >&2
  exit 1
fi

echo "== core tests on cuda:0"
ZEROQ_TEST_DEVICE=cuda:0 ./build/core/core_test \
  --gtest_filter='CudaRuntime.*:PipelineTest.*:Structures/MultiOutputTest.*:QuantizedModelTest.*:DistillTest.*'

echo "== one job per device through the server"
out=$(mktemp -d)
trap 'kill -TERM "$server" 2> /dev/null || true; wait 2> /dev/null || true; rm -rf "$out"' EXIT
./build/server/zeroq-server --data_dir="$out/data" --listen=127.0.0.1:0 --http_listen=127.0.0.1:0 \
  --port_file="$out/port" --metrics_listen=127.0.0.1:0 \
  --devices=cuda:0:1,cpu:1 2> "$out/server.log" &
server=$!
for _ in $(seq 200); do [[ -s "$out/port" ]] && break; sleep 0.05; done
[[ -s "$out/port" ]] || { cat "$out/server.log"; echo "zeroq-server did not start"; exit 1; }
export ZEROQ_SERVER="127.0.0.1:$(cat "$out/port")"
Z=./build/client/zeroq
for device in cuda cpu; do
  $Z quantize tests/models/fashion_cnn.pt --input_shape 1,28,28 --budget MP4 \
    --activation_bits 8 --batch_size 64 --threads "$(nproc)" --device "$device" \
    --json -o "$out/$device" > "$out/$device.jsonl"
done
"$ZEROQ_PYTHON" - "$out" << 'EOF'
import json, sys, torch
out = sys.argv[1]
def job(device):
    last = [json.loads(l) for l in open(f"{out}/{device}.jsonl") if l.strip()][-1]
    assert last["state"] == "JOB_SUCCEEDED", last
    return {s["stage"].removeprefix("STAGE_"): s["seconds"]
            for s in last["result"]["stageSeconds"]}
cuda, cpu = job("cuda"), job("cpu")
print(f"{'stage':<12}{'cuda:0 (s)':>12}{'cpu (s)':>12}{'cpu/cuda':>10}")
for stage in cpu:
    g, c = cuda.get(stage, float("nan")), cpu[stage]
    print(f"{stage:<12}{g:>12.3f}{c:>12.3f}{c / g if g else float('nan'):>10.1f}")
# The CUDA job's export loads on the CPU and on the GPU.
for loc in ("cpu", "cuda"):
    m = torch.jit.load(f"{out}/cuda/model.zeroq.pt", map_location=loc)
    y = m(torch.zeros(2, 1, 28, 28, device=loc))
    assert tuple(y.shape) == (2, 10), y.shape
print("gpu_check: passed")
EOF
