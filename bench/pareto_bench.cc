// pareto_bench.cc: times the mixed-precision planner (core/pareto.h) on
// ResNet-50-sized instances and shows the bound it achieves.
//
// Instances: the 54 weight layers of ResNet-50 (53 convolutions and the fc,
// 25.5 M weights), once with the real shapes and once with every layer's
// weight count jittered at random by up to +-10% (so that no common factor
// helps the bucketing); widths {2, 4, 8}; random sensitivities shaped like
// ZeroQ's KL numbers (about a, a/100, a/10^4 at 2, 4, 8 bits, a log-uniform).
// Budget: MP4 (uniform 4-bit size). Then a 100x smaller instance is planned
// both with 4096 buckets and exactly (W == 0) to show the actual error.
//
// Usage: pareto_bench [seed]     (no flags; plain main, no Google Benchmark)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/pareto.h"

namespace {

using zeroq::core::Budget;
using zeroq::core::LayerCost;
using zeroq::core::ParetoFrontier;
using zeroq::core::Plan;
using zeroq::core::PlanMixedPrecision;
using zeroq::core::PlanOptions;

// Weight counts of ResNet-50's conv and fc layers, in network order.
std::vector<int64_t> ResNet50Params() {
  std::vector<int64_t> params = {64 * 3 * 7 * 7};
  const int blocks[] = {3, 4, 6, 3};
  int64_t in = 64;
  for (int stage = 0; stage < 4; ++stage) {
    const int64_t mid = int64_t{64} << stage;
    for (int b = 0; b < blocks[stage]; ++b) {
      params.push_back(in * mid);                  // 1x1
      params.push_back(mid * mid * 9);             // 3x3
      params.push_back(mid * 4 * mid);             // 1x1 expand
      if (b == 0) params.push_back(in * 4 * mid);  // downsample
      in = 4 * mid;
    }
  }
  params.push_back(2048 * 1000);  // fc
  return params;
}

std::vector<LayerCost> MakeLayers(std::mt19937_64& rng, double scale,
                                  bool jitter) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<LayerCost> layers;
  const std::vector<int64_t> params = ResNet50Params();
  for (size_t i = 0; i < params.size(); ++i) {
    LayerCost l;
    l.name = "layer" + std::to_string(i);
    double p = params[i] * scale;
    if (jitter) p *= 0.9 + 0.2 * unit(rng);
    l.params = std::max<int64_t>(1, std::llround(p));
    l.bits = {2, 4, 8};
    const double a = std::pow(10.0, -1.0 + 2.0 * unit(rng));
    l.sensitivity = {a * (0.5 + unit(rng)), a * 1e-2 * (0.5 + unit(rng)),
                     a * 1e-4 * (0.5 + unit(rng))};
    layers.push_back(std::move(l));
  }
  return layers;
}

int64_t TotalParams(const std::vector<LayerCost>& layers) {
  int64_t n = 0;
  for (const LayerCost& l : layers) n += l.params;
  return n;
}

template <typename F>
double MedianMs(int runs, F&& f) {
  std::vector<double> ms;
  for (int r = 0; r < runs; ++r) {
    const auto start = std::chrono::steady_clock::now();
    f();
    const auto end = std::chrono::steady_clock::now();
    ms.push_back(
        std::chrono::duration<double, std::milli>(end - start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

Plan MustPlan(const std::vector<LayerCost>& layers, const Budget& budget,
              const PlanOptions& options) {
  auto plan = PlanMixedPrecision(layers, budget, options);
  if (!plan.ok()) {
    std::fprintf(stderr, "plan failed: %s\n", plan.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(plan);
}

void BenchInstance(const char* title, const std::vector<LayerCost>& layers) {
  constexpr int kRuns = 21;
  const int64_t params = TotalParams(layers);
  const Budget mp4{Budget::kAverageBits, 4.0};
  std::printf(
      "\n%s: %zu layers, %lld weights, widths {2,4,8}, budget MP4 = "
      "%.0f bytes\n",
      title, layers.size(), static_cast<long long>(params), params * 4 / 8.0);
  std::printf("%8s %10s %10s %9s %10s %9s %9s %11s %11s %9s\n", "buckets",
              "plan_ms", "front_ms", "frontier", "B_bits", "W_bits", "W/budget",
              "chosen", "lower_bnd", "gap");
  for (int buckets : {1024, 4096, 16384, 65536}) {
    const PlanOptions options{buckets};
    const double plan_ms =
        MedianMs(kRuns, [&] { MustPlan(layers, mp4, options); });
    const double frontier_ms = MedianMs(kRuns, [&] {
      if (!ParetoFrontier(layers, options).ok()) std::exit(1);
    });
    const Plan plan = MustPlan(layers, mp4, options);
    if (plan.chosen.size_bits > plan.budget_bits) std::exit(2);
    std::printf(
        "%8d %10.3f %10.3f %9zu %10lld %9lld %8.3f%% %11.6g %11.6g "
        "%8.4f%%\n",
        buckets, plan_ms, frontier_ms, plan.frontier.size(),
        static_cast<long long>(plan.bucket_bits),
        static_cast<long long>(plan.bound_bits),
        100.0 * plan.bound_bits / plan.budget_bits,
        plan.chosen.total_sensitivity, plan.sensitivity_lower_bound,
        100.0 * (plan.chosen.total_sensitivity - plan.sensitivity_lower_bound) /
            plan.chosen.total_sensitivity);
  }
  std::printf(
      "(times: median of %d runs; plan = frontier + choice + "
      "lower-bound DP; gap = (chosen - lower_bnd) / chosen, an upper "
      "bound on the true excess over the optimum)\n",
      kRuns);
}

void CompareWithExact(const std::vector<LayerCost>& layers) {
  const int64_t params = TotalParams(layers);
  const PlanOptions approx{4096};
  const PlanOptions exact{1 << 22};
  std::printf(
      "\nExact comparison, ResNet-50 shapes / 100 (jittered): %lld "
      "weights\n",
      static_cast<long long>(params));
  std::printf("%6s %12s %12s %12s %10s %14s %s\n", "budget", "approx_sens",
              "exact_sens", "excess", "W_bits", "exact(S-W)", "exact_ms");
  for (double avg : {2.5, 3.0, 4.0, 5.0, 6.0, 7.0}) {
    const Budget budget{Budget::kAverageBits, avg};
    const Plan a = MustPlan(layers, budget, approx);
    Plan e;
    const double exact_ms =
        MedianMs(1, [&] { e = MustPlan(layers, budget, exact); });
    if (e.bound_bits != 0) {
      std::printf("exact plan has W = %lld\n",
                  static_cast<long long>(e.bound_bits));
      std::exit(3);
    }
    // The bound: approx <= OPT(S - W), computed exactly.
    const int64_t reduced = a.budget_bits - a.bound_bits;
    std::string reduced_text = "n/a";
    if (reduced >= a.frontier.front().size_bits) {
      const Plan r = MustPlan(layers, {Budget::kBytes, reduced / 8.0}, exact);
      char buffer[32];
      std::snprintf(buffer, sizeof(buffer), "%.6g", r.chosen.total_sensitivity);
      reduced_text = buffer;
      if (a.chosen.total_sensitivity > r.chosen.total_sensitivity) {
        std::printf("BOUND VIOLATED\n");
        std::exit(4);
      }
    }
    std::printf(
        "MP%-4g %12.6g %12.6g %11.4f%% %10lld %14s %.1f\n", avg,
        a.chosen.total_sensitivity, e.chosen.total_sensitivity,
        100.0 * (a.chosen.total_sensitivity - e.chosen.total_sensitivity) /
            e.chosen.total_sensitivity,
        static_cast<long long>(a.bound_bits), reduced_text.c_str(), exact_ms);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
  std::mt19937_64 rng(seed);
  std::printf("pareto_bench seed %llu\n",
              static_cast<unsigned long long>(seed));
  BenchInstance("ResNet-50 shapes", MakeLayers(rng, 1.0, false));
  BenchInstance("ResNet-50 shapes, jittered +-10%", MakeLayers(rng, 1.0, true));
  CompareWithExact(MakeLayers(rng, 0.01, true));
  return 0;
}
