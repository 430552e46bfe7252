#!/usr/bin/env bash
# The product's main job on one machine: installs what is missing, builds,
# quantizes the bundled Fashion-MNIST example model with ZeroQ mixed
# precision (MP4 weights, 8-bit activations, no data), prints the per-layer
# report, and the float vs quantized top-1 on the 10k Fashion-MNIST test
# images.
#   scripts/main_job.sh [extra zeroq-quantize flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
out=${OUT_DIR:-out/example}
mkdir -p "$out"
threads=$(nproc)
./build/core/tools/zeroq-quantize \
  --model=tests/models/fashion_cnn.pt --input_shape=1,28,28 \
  --budget=MP4 --activation_bits=8 --threads="$threads" --out="$out" "$@"
echo
echo "Top-1 on the 10k Fashion-MNIST test images (float, then quantized):"
/usr/bin/python3 scripts/eval_fashion_mnist.py --threads "$threads" \
  tests/models/fashion_cnn.pt "$out/model.zeroq.pt"
