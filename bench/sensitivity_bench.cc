// sensitivity_bench: the sensitivity sweep with graph slicing against the
// naive sweep (one full forward per layer and width), side by side.
//
//   sensitivity_bench --model tests/models/mini_resnet_b2.pt --input_shape 3,32,32
//
// Each run times both sweeps on the same batch and threads, alternating
// which goes first, and checks that they give the same Omega values.
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "core/model.h"
#include "core/pipeline.h"
#include "core/sensitivity.h"

ABSL_FLAG(std::string, model, "tests/models/mini_resnet_b2.pt", "TorchScript model");
ABSL_FLAG(std::string, input_shape, "3,32,32", "one sample, no batch");
ABSL_FLAG(int, batch_size, 32, "samples in the batch");
ABSL_FLAG(int, runs, 5, "runs (medians are reported)");
ABSL_FLAG(int, threads, 2, "intra-op threads");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");

namespace {
using zeroq::bench::Median;
}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace zeroq::core;
  const int threads = absl::GetFlag(FLAGS_threads);
  SetUpProcess(threads);  // the same for both sides of the comparison
  auto parsed = zeroq::bench::ParseShape(absl::GetFlag(FLAGS_input_shape));
  if (!parsed) return 2;
  std::vector<int64_t> shape = {absl::GetFlag(FLAGS_batch_size)};
  shape.insert(shape.end(), parsed->begin(), parsed->end());
  auto model = Model::LoadFromFile(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_device));
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  torch::manual_seed(0);
  std::vector<torch::Tensor> data = {torch::randn(shape)};
  SensitivityOptions sliced, naive;
  naive.slice_graph = false;
  std::printf("model %s: %zu quantizable layers, widths {2,4,8}, batch %lld, %d threads, %s\n",
              absl::GetFlag(FLAGS_model).c_str(), (*model)->summary().layers.size(),
              static_cast<long long>(shape[0]), threads, absl::GetFlag(FLAGS_device).c_str());
  std::printf("%4s %10s %10s %8s %14s\n", "run", "naive s", "sliced s", "speedup", "max |dOmega|");
  std::vector<double> tn, ts, speedups;
  double worst = 0;
  auto time = [&](const SensitivityOptions& o, std::vector<LayerSensitivity>* out) {
    auto t0 = std::chrono::steady_clock::now();
    auto r = ComputeSensitivity(**model, data, o);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      std::exit(1);
    }
    *out = std::move(*r);
    return s;
  };
  for (int run = 0; run < absl::GetFlag(FLAGS_runs); ++run) {
    std::vector<LayerSensitivity> a, b;
    double n, s;
    if (run % 2 == 0) {
      n = time(naive, &a);
      s = time(sliced, &b);
    } else {
      s = time(sliced, &b);
      n = time(naive, &a);
    }
    double diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      for (size_t j = 0; j < a[i].omega.size(); ++j) {
        diff = std::max(diff, std::abs(a[i].omega[j] - b[i].omega[j]));
      }
    }
    worst = std::max(worst, diff);
    tn.push_back(n);
    ts.push_back(s);
    speedups.push_back(n / s);
    std::printf("%4d %10.3f %10.3f %8.2f %14.3g\n", run + 1, n, s, n / s, diff);
  }
  std::printf("median: naive %.3f s, sliced %.3f s, speedup %.2fx, max |dOmega| %.3g (%d threads)\n",
              Median(tn), Median(ts), Median(speedups), worst, threads);
  return 0;
}
