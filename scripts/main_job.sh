#!/usr/bin/env bash
# The product's main job on one machine: installs what is missing, builds,
# starts zeroq-server on the embedded default (SQLite and blobs in a data
# folder), quantizes the bundled Fashion-MNIST example model through it with
# the zeroq command line (upload, inspection, job with ZeroQ mixed precision:
# MP4 weights, 8-bit activations, no data; live progress, download), prints
# the per-layer report and the float vs quantized top-1 on the 10k
# Fashion-MNIST test images, and stops the server cleanly.
#   scripts/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/torch_env.sh   # ZEROQ_PYTHON: Python with the same torch 2.15
bash scripts/build.sh
out=${OUT_DIR:-out/example}
data=${DATA_DIR:-out/server-data}
mkdir -p "$out" "$data"
threads=$(nproc)
rm -f "$out/port"
# Any free ports: the gRPC one is written to $out/port, the metrics one is
# in the log.
./build/server/zeroq-server --data_dir="$data" --listen=127.0.0.1:0 --http_listen=127.0.0.1:0 \
  --port_file="$out/port" --metrics_listen=127.0.0.1:0 \
  --threads_per_job="$threads" 2> "$out/server.log" &
server=$!
stop_server() {
  if kill -0 "$server" 2> /dev/null; then
    kill -TERM "$server"
    wait "$server" || { echo "zeroq-server exited with status $?"; exit 1; }
  fi
}
trap stop_server EXIT
for _ in $(seq 200); do [[ -s "$out/port" ]] && break; sleep 0.05; done
[[ -s "$out/port" ]] || { cat "$out/server.log"; echo "zeroq-server did not start"; exit 1; }
ZEROQ_SERVER="127.0.0.1:$(cat "$out/port")"
export ZEROQ_SERVER
echo "zeroq-server on $ZEROQ_SERVER, data in $data"
./build/client/zeroq quantize tests/models/fashion_cnn.pt --input_shape 1,28,28 \
  --budget MP4 --activation_bits 8 --threads "$threads" -o "$out"
echo
echo "Top-1 on the 10k Fashion-MNIST test images (float, then quantized):"
"$ZEROQ_PYTHON" scripts/eval_fashion_mnist.py --threads "$threads" \
  tests/models/fashion_cnn.pt "$out/model.zeroq.pt"
stop_server
trap - EXIT
echo "zeroq-server stopped cleanly; its log is $out/server.log"
