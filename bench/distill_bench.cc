// distill_bench: what the BN-statistics loss costs on top of the model.
//
//   distill_bench --model tests/models/fashion_cnn.pt --input_shape 1,28,28
//
// Per run, side by side on the same batch and threads:
//   baseline: one forward of the frozen model + backward to the input
//             (loss = sum of the logits), executed like the distillation
//             probe (LibTorch's simple executor, i.e. op by op);
//   distill:  one ZeroQ distillation iteration (probe forward to every BN
//             input, statistics loss, backward, the image prior at
//             --tv_weight (default 10, a job's below 8 bits), Adam step,
//             scheduler),
//             timed from inside Distill() between iteration 1 and the last.
// Prints per-iteration times and the ratio distill / baseline for each run,
// then the medians.
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/config_schema.h"
#include "core/distill.h"
#include "core/graph_util.h"
#include "bench/bench_util.h"
#include "core/model.h"
#include "core/pipeline.h"

ABSL_FLAG(std::string, model, "tests/models/fashion_cnn.pt", "TorchScript model");
ABSL_FLAG(std::string, input_shape, "1,28,28", "one sample, no batch");
ABSL_FLAG(int, batch_size, 32, "batch");
ABSL_FLAG(int, iterations, 50, "timed iterations per run and side");
ABSL_FLAG(int, runs, 5, "runs (medians are reported)");
ABSL_FLAG(int, threads, 2, "intra-op threads");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");
ABSL_FLAG(double, tv_weight, zeroq::kTvWeight.def, zeroq::kTvWeight.help);

namespace {
using zeroq::bench::Median;
using Clock = std::chrono::steady_clock;
}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace zeroq::core;
  const int threads = absl::GetFlag(FLAGS_threads);
  SetUpProcess(threads);  // the same for both sides of the comparison
  auto parsed = zeroq::bench::ParseShape(absl::GetFlag(FLAGS_input_shape));
  if (!parsed) return 2;
  const std::vector<int64_t> sample = *parsed;
  auto model = Model::LoadFromFile(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_device));
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  const int batch = absl::GetFlag(FLAGS_batch_size);
  const int iters = absl::GetFlag(FLAGS_iterations);
  const bool cuda = (*model)->device().is_cuda();
  auto sync = [&] {
    if (cuda) torch::cuda::synchronize();
  };
  std::vector<int64_t> shape = {batch};
  shape.insert(shape.end(), sample.begin(), sample.end());

  // Baseline program: the whole model, run op by op like the probe.
  auto g = (*model)->graph()->copy();
  GraphProgram full(g, (*model)->frozen()._ivalue());
  auto full_step = [&](torch::Tensor& x) {
    x.mutable_grad() = torch::Tensor();
    torch::Tensor out = full.Run(x)[0];
    out.sum().backward();
  };

  std::printf("model %s, input [%s], batch %d, %d threads, device %s, %d iterations per side\n",
              absl::GetFlag(FLAGS_model).c_str(), absl::GetFlag(FLAGS_input_shape).c_str(),
              batch, threads, absl::GetFlag(FLAGS_device).c_str(), iters);
  std::printf("%4s %14s %14s %8s\n", "run", "baseline ms/it", "distill ms/it", "ratio");
  std::vector<double> base_ms, dist_ms, ratios;
  for (int run = 0; run < absl::GetFlag(FLAGS_runs); ++run) {
    torch::Tensor x = torch::randn(shape, torch::TensorOptions().device((*model)->device()))
                          .set_requires_grad(true);
    for (int i = 0; i < 3; ++i) full_step(x);  // warm-up
    sync();
    auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) full_step(x);
    sync();
    double base = std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / iters;

    DistillOptions options;
    options.batch_size = batch;
    options.iterations = iters + 4;  // the first 3 are warm-up
    options.seed = run;
    options.tv_weight = absl::GetFlag(FLAGS_tv_weight);
    Clock::time_point start, end;
    auto status = Distill(**model, sample, options, [&](const DistillProgress& p) {
      if (p.iteration == 4) start = Clock::now();  // loss.item() synchronised
      if (p.iteration == p.iterations) end = Clock::now();
    });
    if (!status.ok()) {
      std::fprintf(stderr, "%s\n", status.status().ToString().c_str());
      return 1;
    }
    double dist = std::chrono::duration<double, std::milli>(end - start).count() / iters;
    base_ms.push_back(base);
    dist_ms.push_back(dist);
    ratios.push_back(dist / base);
    std::printf("%4d %14.3f %14.3f %8.3f\n", run + 1, base, dist, dist / base);
  }
  std::printf("median: baseline %.3f ms/it, distill %.3f ms/it, ratio %.3f (%d threads)\n",
              Median(base_ms), Median(dist_ms), Median(ratios), threads);
  return 0;
}
