#!/usr/bin/env bash
# Fuzzes request validation, the upload assembler, the tenants file and
# budget strings (tests/fuzz/request_fuzz.cc) with libFuzzer, ASan and UBSan.
#   scripts/fuzz.sh [SECONDS]      (default 300)
# Installs Debian's clang and its libFuzzer runtime when missing, builds in
# build-fuzz/, starts from the committed corpus (tests/fuzz/corpus) and keeps
# new inputs in out/fuzz-corpus. Prints libFuzzer's final statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
missing=()
for p in clang libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
sanitizers="-fsanitize=address,undefined -fsanitize=fuzzer-no-link -fno-omit-frame-pointer"
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS="$sanitizers" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DZEROQ_FUZZ=ON -DZEROQ_BUILD_BENCH=OFF > /dev/null
ninja -C build-fuzz -j "$(nproc)" request_fuzz
mkdir -p out/fuzz-corpus
./build-fuzz/tests/request_fuzz -max_total_time="$seconds" -print_final_stats=1 \
  -max_len=4096 -timeout=10 out/fuzz-corpus tests/fuzz/corpus 2>&1 | tail -25
