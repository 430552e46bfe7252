#!/usr/bin/env bash
# What the LibTorch build costs every job: process start and resident memory,
# distillation speed and a whole job, side by side in one run.
#
#   bash bench/libtorch_bench.sh [RUNS]            # default 5 runs, medians
#   OLD=/path/to/other/build bash bench/libtorch_bench.sh
#
# Rows (each run interleaves them, so machine noise hits all alike):
#   2.15 lazy CUDA   this build: LibTorch's CPU half only; the CUDA half is
#                    loaded by a job that uses a CUDA device (the product)
#   2.15 eager CUDA  the same binary with libtorch_cuda.so preloaded, i.e.
#                    what linking the CUDA half would cost every process
#   other build      $OLD/core/tools/zeroq-quantize and $OLD/bench/distill_bench
#                    if OLD is set (e.g. a build on Debian's LibTorch 1.13)
# Figures:
#   start    a job with 1 distillation iteration on 1 sample (process start,
#            LibTorch load, model load and freeze, export): wall s, max RSS MiB
#   job      a whole W8A8 job on the example model: batch 64, 500 iterations
#   distill  bench/distill_bench: ms per distillation iteration (batch 32) and
#            its ratio to a bare forward + backward
# Threads: 2 for job and distill, 1 for start. Check `uptime` first.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
build=${BUILD_DIR:-build}
torch_lib=$(dirname "$(ldd "$build/core/tools/zeroq-quantize" | awk '/libtorch_cpu.so/ {print $3}')")
model=tests/models/fashion_cnn.pt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rows=("2.15 lazy CUDA|$build|")
rows+=("2.15 eager CUDA|$build|$torch_lib/libtorch_cuda.so")
if [[ -n ${OLD:-} ]]; then rows+=("other build|$OLD|"); fi

# time_cmd FILE PRELOAD CMD...: appends "seconds max_rss_kib" to FILE.
time_cmd() {
  local file=$1 preload=$2
  shift 2
  if [[ -n $preload ]]; then
    LD_PRELOAD=$preload /usr/bin/time -f "%e %M" -o "$tmp/t" "$@" > /dev/null 2>&1
  else
    /usr/bin/time -f "%e %M" -o "$tmp/t" "$@" > /dev/null 2>&1
  fi
  tail -n 1 "$tmp/t" >> "$file"
}

echo "libtorch_bench: $runs runs; $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$runs"); do
  for i in "${!rows[@]}"; do
    IFS='|' read -r name dir preload <<< "${rows[$i]}"
    q=$dir/core/tools/zeroq-quantize
    time_cmd "$tmp/start.$i" "$preload" "$q" --model "$model" --input_shape 1,28,28 \
      --iterations 1 --batch_size 1 --threads 1 --progress none --out "$tmp/o$i"
    time_cmd "$tmp/job.$i" "$preload" "$q" --model "$model" --input_shape 1,28,28 \
      --weight_bits 8 --activation_bits 8 --batch_size 64 --iterations 500 \
      --threads 2 --progress none --out "$tmp/o$i"
    if [[ -x $dir/bench/distill_bench ]]; then
      if [[ -n $preload ]]; then
        LD_PRELOAD=$preload "$dir/bench/distill_bench" --runs 1 --threads 2 > "$tmp/d" 2>&1
      else
        "$dir/bench/distill_bench" --runs 1 --threads 2 > "$tmp/d" 2>&1
      fi
      # The median line: "median: baseline X ms, distill Y ms, ratio Z".
      grep -i "median" "$tmp/d" | tail -n 1 >> "$tmp/distill.$i" || true
    fi
  done
done

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
printf '\n%-16s %10s %10s %10s %10s %12s %8s\n' build "start s" "start MiB" "job s" "job MiB" "distill ms" ratio
for i in "${!rows[@]}"; do
  IFS='|' read -r name _ _ <<< "${rows[$i]}"
  ss=$(cut -d' ' -f1 "$tmp/start.$i" | median)
  sm=$(cut -d' ' -f2 "$tmp/start.$i" | median)
  js=$(cut -d' ' -f1 "$tmp/job.$i" | median)
  jm=$(cut -d' ' -f2 "$tmp/job.$i" | median)
  dm=- dr=-
  if [[ -s $tmp/distill.$i ]]; then
    dm=$(grep -o 'distill [0-9.]*' "$tmp/distill.$i" | awk '{print $2}' | median)
    dr=$(grep -o 'ratio [0-9.]*' "$tmp/distill.$i" | awk '{print $2}' | median)
  fi
  printf '%-16s %10.3f %10.0f %10.2f %10.0f %12s %8s\n' "$name" "$ss" \
    "$(echo "$sm / 1024" | bc -l)" "$js" "$(echo "$jm / 1024" | bc -l)" "$dm" "$dr"
done
