#!/usr/bin/env bash
# Configures and builds everything into build/ (ccache, Ninja, Release).
#   scripts/build.sh [extra cmake -D options]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
jobs=$(nproc)
# LibTorch translation units take ~1.5 GiB of memory each to compile.
mem_gib=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
if [ "$mem_gib" -lt $((jobs * 2)) ]; then jobs=$(( mem_gib / 2 > 0 ? mem_gib / 2 : 1 )); fi
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$jobs"
