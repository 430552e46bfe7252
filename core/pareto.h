// pareto.h: the mixed-precision planner (ZEROQ.md section 3). Given each
// layer's sensitivity Omega_i(k) at its candidate bit widths k, it picks one
// width per layer minimising sum_i Omega_i(k_i) subject to a weight-size
// budget, and computes the whole (size, total sensitivity) Pareto frontier so
// that a caller can re-plan for another budget from a stored frontier, with no
// worker and no new sensitivities. Layers are assumed independent (additive).
// Plain C++17 and Abseil: no LibTorch, no gRPC.
//
// Example:
//
//   std::vector<LayerCost> layers = {
//       {"conv1", 9408, {2, 4, 8}, {0.91, 0.050, 0.001}, std::nullopt},
//       {"layer1.0.conv1", 4096, {2, 4, 8}, {0.20, 0.010, 0.0002}, 8},
//       {"fc", 2048000, {2, 4, 8}, {0.30, 0.020, 0.0005}, std::nullopt},
//   };
//   // "MP4": the weights may take as many bytes as uniform 4-bit weights.
//   ZQ_ASSIGN_OR_RETURN(Plan plan,
//                       PlanMixedPrecision(layers, {Budget::kAverageBits, 4}));
//   // plan.chosen.bits[i] is the width for layers[i]; store plan.frontier and
//   // later: ZQ_ASSIGN_OR_RETURN(ParetoPoint p,
//   //                            ChooseFromFrontier(plan.frontier, bits));
//
// Thread safety: every function here is pure (no global or shared state) and
// may be called concurrently from any number of threads.
//
// Algorithm. Sizes are counted in weight BITS, as exact integers:
// size(x) = sum_i params_i * x_i. Let C_min be the size with every layer at
// its narrowest allowed width (a pinned layer allows only its pinned width) and
// d_i(k) = params_i * (k - narrowest_i) >= 0 a candidate's extra bits. A
// dynamic programme runs over the extra size in buckets of B bits, where
// B = g * ceil((C_max - C_min) / g / size_buckets) and g is the gcd of all the
// non-zero d_i(k): so B = g, and the DP is exact, whenever the size range fits
// in size_buckets steps of g. Each candidate costs ceil(d_i(k) / B) buckets,
// rounded UP, so a configuration the DP places in bucket b truly has size
// <= C_min + b * B: a plan is never over budget. True sizes are carried along
// and every reported size is exact. Time O(L * K * (size_buckets + L)),
// memory L * (size_buckets + L) bytes of backpointers (L layers, K widths).
//
// The bound. Let W = sum_i max_k (B * ceil(d_i(k) / B) - d_i(k)), the most
// that rounding can add to any configuration's size; W <= (number of layers
// with more than one allowed width) * (B - 1), and W == 0 when B == g. W is
// returned as Plan::bound_bits; B and W depend only on the layers and
// PlanOptions, not on the budget, so they also hold for ParetoFrontier() with
// the same arguments. Write OPT(S) for the exact minimum total sensitivity
// over configurations of size <= S bits. Then:
//  (1) Plan: chosen.size_bits <= S, and
//        OPT(S) <= chosen.total_sensitivity <= OPT(S - W)   (if S - W >= C_min)
//      i.e. the plan is at least as good as the exact optimum for a budget W
//      bits smaller. W == 0 means the plan is exactly optimal.
//  (2) Frontier: every configuration y has a frontier point p with
//      p.size_bits <= size(y) + W and p.total_sensitivity <= sens(y); and no
//      configuration of size <= p.size_bits - W has a total sensitivity below
//      p.total_sensitivity. With W == 0 it is the exact Pareto frontier.
//  (3) Plan::sensitivity_lower_bound <= OPT(S) (a second DP with the bucket
//      costs rounded DOWN, a relaxation), so chosen.total_sensitivity minus
//      it bounds the actual gap to the exact optimum a posteriori.
// For ResNet-50 (54 layers, 25.5 M weights, widths {2,4,8}, 4096 buckets) W is
// about 1.1-1.3% of the MP4 budget and a plan takes 1-3 ms on one core; on a
// 100x smaller copy, planned exactly too, the 4096-bucket plans were within
// 0.8% of the exact optimum's sensitivity, most of them equal to it. See
// bench/pareto_bench.cc.
#ifndef ZEROQ_CORE_PARETO_H_
#define ZEROQ_CORE_PARETO_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace zeroq::core {

// One quantizable layer and its sensitivity table.
struct LayerCost {
  std::string name;    // Used in error messages only.
  int64_t params = 0;  // Number of weights, > 0.
  // Candidate widths, distinct, each in 1..32, e.g. {2, 4, 8}; any order.
  std::vector<int> bits;
  // Omega_i(k) for each candidate, in the order of `bits`: finite, >= 0.
  std::vector<double> sensitivity;
  // If set, the layer must use this width; it must be one of `bits`.
  std::optional<int> pinned_bits;
};

// A weight-size budget. Every kind is converted to bits by BudgetToBits().
struct Budget {
  enum Kind {
    kBytes,             // Total weight bytes.
    kAverageBits,       // a: the size of uniform a-bit weights ("MP4": a = 4).
    kCompressionRatio,  // r: float32 weight size / r (r = 8: 4 bits average).
  };
  Kind kind = kBytes;
  double value = 0;  // Finite and > 0.
};

// The budget in weight bits, rounded down (a product within 1e-9 relative of
// an integer counts as that integer, so MP4 is exactly 4 * sum params).
// Errors: InvalidArgument for a non-positive or non-finite value, an unknown
// kind, or layers that PlanMixedPrecision would reject.
absl::StatusOr<int64_t> BudgetToBits(const Budget& budget,
                                     const std::vector<LayerCost>& layers);

// One layer's name and weight count, for CheckBudgetReachable.
struct LayerSize {
  std::string name;
  int64_t params = 0;
};

// Whether the budget (written as `text`) is reachable at all: not below the
// size of every layer at its lowest `candidates` width, a pinned layer at its
// pin in `pins` (by layer name; 0: float, 32 bits).
// INVALID_ARGUMENT saying both sizes, e.g. "\"MP4\" is 21128 weight bytes,
// below the smallest size the candidate widths reach (42256 bytes, 8.00 bits
// per weight)". The server checks this at SubmitJob and the core before it
// runs, with this one function.
// The budget as a user would write it: "MP4", "8x", "120000B".
std::string BudgetText(const Budget& budget);

absl::Status CheckBudgetReachable(const std::string& text, const Budget& budget,
                                  const std::vector<LayerSize>& layers,
                                  const std::vector<int>& candidates,
                                  const std::map<std::string, int>& pins);

// One configuration: a width per layer, in the order of the layers.
struct ParetoPoint {
  int64_t size_bits = 0;         // Exact: sum_i params_i * bits[i].
  double total_sensitivity = 0;  // sum_i Omega_i(bits[i]), summed in order.
  std::vector<int> bits;
};

struct PlanOptions {
  // Discretisation of the size axis (1 .. 1 << 22): more buckets, smaller
  // bound, proportionally more time and memory. Default 4096.
  int size_buckets = 4096;
};

struct Plan {
  ParetoPoint chosen;  // Lowest-sensitivity frontier point within budget.
  // The whole frontier (not only up to the budget): size strictly
  // increasing, total sensitivity strictly decreasing.
  std::vector<ParetoPoint> frontier;
  int64_t budget_bits = 0;  // The budget, as BudgetToBits() gave it.
  int64_t bucket_bits = 0;  // B above.
  // W above: chosen.total_sensitivity <= OPT(budget_bits - bound_bits).
  int64_t bound_bits = 0;
  // <= OPT(budget_bits): the exact optimum lies in
  // [sensitivity_lower_bound, chosen.total_sensitivity].
  double sensitivity_lower_bound = 0;
};

// Plans widths for `layers` under `budget`; see the bound above. The choice
// equals ChooseFromFrontier(plan.frontier, plan.budget_bits).
// Errors (all InvalidArgument, naming the layer where there is one): no
// layers; a layer with no widths, a width outside 1..32 or repeated, bits and
// sensitivity of different lengths, params <= 0, a negative, NaN or infinite
// sensitivity, a pinned width not among its candidates; a budget value that
// is not finite and > 0; a budget below the smallest achievable size (the
// message gives that size in bytes and average bits); size_buckets out of
// range.
absl::StatusOr<Plan> PlanMixedPrecision(const std::vector<LayerCost>& layers,
                                        const Budget& budget,
                                        const PlanOptions& options = {});

// The Pareto frontier over all budgets, sorted by size ascending with total
// sensitivity strictly decreasing; approximate within W bits as stated above.
// The first point is the smallest achievable size. Same errors as
// PlanMixedPrecision, less the budget ones.
absl::StatusOr<std::vector<ParetoPoint>> ParetoFrontier(
    const std::vector<LayerCost>& layers, const PlanOptions& options = {});

// Re-planning from a stored frontier: the point of lowest total sensitivity
// with size_bits <= budget_bits.
// REQUIRES: `frontier` as returned by ParetoFrontier() or in Plan::frontier.
// Errors: InvalidArgument if the frontier is empty or budget_bits is below its
// first (smallest) point.
absl::StatusOr<ParetoPoint> ChooseFromFrontier(
    const std::vector<ParetoPoint>& frontier, int64_t budget_bits);

// "MP4" or "4" (average bits), "8x" (compression ratio against float),
// "120KB", "1.5MiB", "30000B" (bytes of weights).
absl::StatusOr<Budget> ParseBudget(const std::string& text);

// Re-planning with a subset of a stored sensitivity table's widths: OK if
// every width in `wanted` is in `stored` (the widths the table was measured
// at), else InvalidArgument naming candidate_bits and what the table has.
absl::Status CheckReplanWidths(const std::vector<int>& wanted,
                               const std::vector<int>& stored);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_PARETO_H_
