// pareto.cc: the bucketed knapsack DP behind pareto.h. The header states the
// algorithm and the bound; the comments here say how the code keeps them.
#include "core/pareto.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace zeroq::core {
namespace {

constexpr int kMinWidth = 1;
constexpr int kMaxWidth = 32;
constexpr int kMaxSizeBuckets = 1 << 22;
// Sizes stay below this many bits, so sums of sizes never overflow int64.
constexpr int64_t kMaxTotalBits = int64_t{1} << 62;
// Cap on the backpointer table (layers x buckets bytes).
constexpr int64_t kMaxBackpointerBytes = int64_t{1} << 30;

std::string LayerLabel(const std::vector<LayerCost>& layers, size_t i) {
  return absl::StrCat("layer ", i, " (\"", layers[i].name, "\")");
}

absl::Status ValidateLayers(const std::vector<LayerCost>& layers) {
  if (layers.empty()) {
    return absl::InvalidArgumentError("no layers to plan");
  }
  int64_t max_total_bits = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerCost& layer = layers[i];
    if (layer.params <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          LayerLabel(layers, i), ": params must be > 0, got ", layer.params));
    }
    if (layer.params > (kMaxTotalBits - max_total_bits) / kMaxWidth) {
      return absl::InvalidArgumentError(
          absl::StrCat(LayerLabel(layers, i),
                       ": too many weights in total (sizes in bits "
                       "must stay below 2^62)"));
    }
    max_total_bits += layer.params * kMaxWidth;
    if (layer.bits.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(LayerLabel(layers, i), ": no candidate bit widths"));
    }
    if (layer.bits.size() != layer.sensitivity.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(LayerLabel(layers, i), ": ", layer.bits.size(),
                       " candidate widths but ", layer.sensitivity.size(),
                       " sensitivities"));
    }
    for (size_t k = 0; k < layer.bits.size(); ++k) {
      const int b = layer.bits[k];
      if (b < kMinWidth || b > kMaxWidth) {
        return absl::InvalidArgumentError(
            absl::StrCat(LayerLabel(layers, i), ": width ", b, " is outside ",
                         kMinWidth, "..", kMaxWidth));
      }
      if (std::find(layer.bits.begin(), layer.bits.begin() + k, b) !=
          layer.bits.begin() + k) {
        return absl::InvalidArgumentError(absl::StrCat(
            LayerLabel(layers, i), ": width ", b, " is listed twice"));
      }
      const double s = layer.sensitivity[k];
      if (!std::isfinite(s) || s < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(LayerLabel(layers, i), ": sensitivity at ", b,
                         " bits must be finite and >= 0, got ", s));
      }
    }
    if (layer.pinned_bits.has_value() &&
        std::find(layer.bits.begin(), layer.bits.end(), *layer.pinned_bits) ==
            layer.bits.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          LayerLabel(layers, i), ": pinned width ", *layer.pinned_bits,
          " is not among its candidate widths"));
    }
  }
  return absl::OkStatus();
}

int64_t TotalParams(const std::vector<LayerCost>& layers) {
  int64_t total = 0;
  for (const LayerCost& layer : layers) total += layer.params;
  return total;
}

// floor(x), except that x within 1e-9 relative of an integer is that integer
// (so 4.0 * P or 32 * P / 8.0 give exactly 4 * P), clamped to kMaxTotalBits.
int64_t FloorToBits(long double x) {
  if (x >= static_cast<long double>(kMaxTotalBits)) return kMaxTotalBits;
  const long double nearest = std::nearbyint(x);
  if (std::fabs(x - nearest) <= 1e-9L * std::max<long double>(1, x)) {
    return static_cast<int64_t>(nearest);
  }
  return static_cast<int64_t>(std::floor(x));
}

// `value` with `digits` decimals. (snprintf rather than absl::StrFormat keeps
// this target's Abseil dependencies to status and strings.)
std::string Fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*f", digits, value);
  return buffer;
}

std::string Bytes(int64_t bits) {
  return absl::StrCat(Fixed(static_cast<double>(bits) / 8, 2), " bytes");
}

// The problem in flat arrays. The candidates of layer i (after pinning) are
// entries [begin[i], begin[i + 1]); `extra` is d_i(k) of the header.
struct Problem {
  int num_layers = 0;
  std::vector<int> begin;
  std::vector<int> width;
  std::vector<double> sensitivity;
  std::vector<int64_t> extra;
  int64_t min_bits = 0;  // C_min.
  int64_t max_bits = 0;  // C_max.
  int64_t total_params = 0;
};

Problem BuildProblem(const std::vector<LayerCost>& layers) {
  Problem p;
  p.num_layers = static_cast<int>(layers.size());
  p.begin.reserve(layers.size() + 1);
  for (const LayerCost& layer : layers) {
    p.begin.push_back(static_cast<int>(p.width.size()));
    int narrowest = kMaxWidth;
    int widest = kMinWidth;
    for (size_t k = 0; k < layer.bits.size(); ++k) {
      if (layer.pinned_bits.has_value() &&
          layer.bits[k] != *layer.pinned_bits) {
        continue;
      }
      p.width.push_back(layer.bits[k]);
      p.sensitivity.push_back(layer.sensitivity[k]);
      narrowest = std::min(narrowest, layer.bits[k]);
      widest = std::max(widest, layer.bits[k]);
    }
    for (int c = p.begin.back(); c < static_cast<int>(p.width.size()); ++c) {
      p.extra.push_back(layer.params * (p.width[c] - narrowest));
    }
    p.min_bits += layer.params * narrowest;
    p.max_bits += layer.params * widest;
    p.total_params += layer.params;
  }
  p.begin.push_back(static_cast<int>(p.width.size()));
  return p;
}

// The size axis: bucket width B, bucket costs rounded up (for the DP) and
// down (for the lower bound), and W.
struct Buckets {
  int64_t bucket_bits = 1;    // B.
  int64_t bound_bits = 0;     // W.
  std::vector<int32_t> up;    // ceil(d / B) per candidate.
  std::vector<int32_t> down;  // floor(d / B) per candidate.
  int32_t max_bucket = 0;     // sum_i max_k up: the DP's last bucket.
};

absl::StatusOr<Buckets> MakeBuckets(const Problem& p,
                                    const PlanOptions& options) {
  if (options.size_buckets < 1 || options.size_buckets > kMaxSizeBuckets) {
    return absl::InvalidArgumentError(
        absl::StrCat("size_buckets must be in 1..", kMaxSizeBuckets, ", got ",
                     options.size_buckets));
  }
  int64_t g = 0;
  for (int64_t d : p.extra) g = std::gcd(g, d);
  if (g == 0) g = 1;  // Every layer has a single allowed width.
  const int64_t range_steps = (p.max_bits - p.min_bits) / g;
  const int64_t steps_per_bucket = std::max<int64_t>(
      1, (range_steps + options.size_buckets - 1) / options.size_buckets);
  Buckets b;
  b.bucket_bits = g * steps_per_bucket;
  b.up.resize(p.extra.size());
  b.down.resize(p.extra.size());
  int64_t max_bucket = 0;
  for (int i = 0; i < p.num_layers; ++i) {
    int64_t layer_max_up = 0;
    int64_t layer_waste = 0;
    for (int c = p.begin[i]; c < p.begin[i + 1]; ++c) {
      const int64_t d = p.extra[c];
      const int64_t up = (d + b.bucket_bits - 1) / b.bucket_bits;
      // Fits: up <= range_steps / steps_per_bucket + 1 <= size_buckets + 1.
      b.up[c] = static_cast<int32_t>(up);
      b.down[c] = static_cast<int32_t>(d / b.bucket_bits);
      layer_max_up = std::max(layer_max_up, up);
      layer_waste = std::max(layer_waste, up * b.bucket_bits - d);
    }
    max_bucket += layer_max_up;
    b.bound_bits += layer_waste;
  }
  // max_bucket <= size_buckets + L (each layer rounds up at most once).
  if ((max_bucket + 1) * p.num_layers > kMaxBackpointerBytes ||
      max_bucket >= std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat(p.num_layers, " layers x ", max_bucket + 1,
                     " size buckets is too large a table; lower size_buckets"));
  }
  b.max_bucket = static_cast<int32_t>(max_bucket);
  return b;
}

// One DP layer over buckets 0..max_bucket:
//   value[b] = min_k prev_value[b - w[k]] + s[k]
// over the layer's `count` candidates, the first candidate winning ties.
// Every layer has a candidate with w == 0 (its narrowest width), so every
// cell is finite. With kTrack, choice[b] gets the arg-min k and extra[b] the
// true extra size of that path, prev_extra[b - w[k]] + d[k]; without it those
// pointers are unused. Bucket-major, so each cell is written once.
template <bool kTrack>
void RelaxLayer(int count, const int32_t* w, const double* s, const int64_t* d,
                int32_t max_bucket, const double* prev_value,
                const int64_t* prev_extra, double* value, int64_t* extra,
                uint8_t* choice) {
  int32_t widest = 0;
  for (int k = 0; k < count; ++k) widest = std::max(widest, w[k]);
  // Below `widest` some candidates do not fit yet.
  const int32_t ramp = std::min(widest, max_bucket + 1);
  int32_t b = 0;
  for (; b < ramp; ++b) {
    double best = std::numeric_limits<double>::infinity();
    int arg = 0;
    for (int k = 0; k < count; ++k) {
      if (w[k] > b) continue;
      const double v = prev_value[b - w[k]] + s[k];
      if (v < best) {
        best = v;
        arg = k;
      }
    }
    value[b] = best;
    if constexpr (kTrack) {
      choice[b] = static_cast<uint8_t>(arg);
      extra[b] = prev_extra[b - w[arg]] + d[arg];
    }
  }
  for (; b <= max_bucket; ++b) {
    double best = prev_value[b - w[0]] + s[0];
    int arg = 0;
    for (int k = 1; k < count; ++k) {
      const double v = prev_value[b - w[k]] + s[k];
      arg = v < best ? k : arg;
      best = v < best ? v : best;
    }
    value[b] = best;
    if constexpr (kTrack) {
      choice[b] = static_cast<uint8_t>(arg);
      extra[b] = prev_extra[b - w[arg]] + d[arg];
    }
  }
}

// All frontier points under the bucketing `bk`: the DP's best configuration
// for every bucket, then the non-dominated ones by true size.
std::vector<ParetoPoint> FrontierOf(const Problem& p, const Buckets& bk) {
  const int32_t n = bk.max_bucket + 1;
  const int num_layers = p.num_layers;
  std::vector<uint8_t> choice(static_cast<size_t>(num_layers) * n);
  std::vector<double> prev(n, 0.0);
  std::vector<double> cur(n);
  std::vector<int64_t> prev_extra(n, 0);
  std::vector<int64_t> cur_extra(n);
  for (int i = 0; i < num_layers; ++i) {
    const int first = p.begin[i];
    RelaxLayer<true>(p.begin[i + 1] - first, &bk.up[first],
                     &p.sensitivity[first], &p.extra[first], bk.max_bucket,
                     prev.data(), prev_extra.data(), cur.data(),
                     cur_extra.data(), &choice[static_cast<size_t>(i) * n]);
    std::swap(prev, cur);
    std::swap(prev_extra, cur_extra);
  }
  // Bucket b now holds the DP's best configuration of at most b buckets:
  // total sensitivity prev[b], true size p.min_bits + prev_extra[b].
  std::vector<int32_t> order(n);
  for (int32_t b = 0; b < n; ++b) order[b] = b;
  std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
    if (prev_extra[x] != prev_extra[y]) return prev_extra[x] < prev_extra[y];
    if (prev[x] != prev[y]) return prev[x] < prev[y];
    return x < y;
  });
  std::vector<int32_t> kept;  // Buckets whose configuration is on the front.
  for (int32_t b : order) {
    if (kept.empty() || prev[b] < prev[kept.back()]) kept.push_back(b);
  }
  std::vector<ParetoPoint> frontier(kept.size());
  // The widths: walks back through the choices, layer by layer over all kept
  // buckets at once, so the loads are independent, not one long chain.
  for (size_t j = 0; j < kept.size(); ++j) {
    frontier[j].size_bits = p.min_bits + prev_extra[kept[j]];
    // prev[b] was summed in layer order along this very path, so it equals
    // sum_i Omega_i(bits[i]) summed in order, bit for bit.
    frontier[j].total_sensitivity = prev[kept[j]];
    frontier[j].bits.resize(num_layers);
  }
  for (int i = num_layers - 1; i >= 0; --i) {
    const uint8_t* layer_choice = &choice[static_cast<size_t>(i) * n];
    const int first = p.begin[i];
    for (size_t j = 0; j < kept.size(); ++j) {
      const int c = first + layer_choice[kept[j]];
      kept[j] -= bk.up[c];
      frontier[j].bits[i] = p.width[c];
    }
  }
  return frontier;
}

// The relaxation of guarantee (3): costs rounded down admit every
// configuration of true size <= budget_bits, so the minimum is <= OPT.
double LowerBound(const Problem& p, const Buckets& bk, int64_t budget_bits) {
  int64_t max_down = 0;
  for (int i = 0; i < p.num_layers; ++i) {
    int32_t m = 0;
    for (int c = p.begin[i]; c < p.begin[i + 1]; ++c) {
      m = std::max(m, bk.down[c]);
    }
    max_down += m;
  }
  const int32_t cap = static_cast<int32_t>(
      std::min<int64_t>(max_down, (budget_bits - p.min_bits) / bk.bucket_bits));
  std::vector<double> prev(cap + 1, 0.0);
  std::vector<double> cur(cap + 1);
  for (int i = 0; i < p.num_layers; ++i) {
    const int first = p.begin[i];
    RelaxLayer<false>(p.begin[i + 1] - first, &bk.down[first],
                      &p.sensitivity[first], nullptr, cap, prev.data(), nullptr,
                      cur.data(), nullptr, nullptr);
    std::swap(prev, cur);
  }
  return prev[cap];
}

}  // namespace

std::string BudgetText(const Budget& budget) {
  switch (budget.kind) {
    case Budget::kAverageBits:
      return absl::StrFormat("MP%g", budget.value);
    case Budget::kCompressionRatio:
      return absl::StrFormat("%gx", budget.value);
    case Budget::kBytes:
      break;
  }
  return absl::StrFormat("%.0fB", budget.value);
}

absl::Status CheckBudgetReachable(const std::string& text, const Budget& budget,
                                  const std::vector<LayerSize>& layers,
                                  const std::vector<int>& candidates,
                                  const std::map<std::string, int>& pins) {
  const int narrowest =
      candidates.empty() ? 32 : *std::min_element(candidates.begin(), candidates.end());
  int64_t smallest = 0;
  int64_t params = 0;
  std::vector<LayerCost> costs;
  for (const LayerSize& l : layers) {
    auto pin = pins.find(l.name);
    const int lowest =
        pin == pins.end() ? narrowest : (pin->second == 0 ? 32 : pin->second);
    smallest += l.params * lowest;
    params += l.params;
    LayerCost& cost = costs.emplace_back();
    cost.name = l.name;
    cost.params = l.params;
    cost.bits = candidates;
    cost.sensitivity.assign(candidates.size(), 0.0);
  }
  ZQ_ASSIGN_OR_RETURN(int64_t bits, BudgetToBits(budget, costs));
  if (bits < smallest) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "\"%s\" is %d weight bytes, below the smallest size the candidate "
        "widths reach (%d bytes, %.2f bits per weight)",
        text, bits / 8, smallest / 8,
        static_cast<double>(smallest) / std::max<int64_t>(1, params)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> BudgetToBits(const Budget& budget,
                                     const std::vector<LayerCost>& layers) {
  if (!std::isfinite(budget.value) || budget.value <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "budget value must be finite and > 0, got ", budget.value));
  }
  ZQ_RETURN_IF_ERROR(ValidateLayers(layers));
  const long double params = TotalParams(layers);
  const long double value = budget.value;
  switch (budget.kind) {
    case Budget::kBytes:
      return FloorToBits(value * 8);
    case Budget::kAverageBits:
      return FloorToBits(value * params);
    case Budget::kCompressionRatio:
      return FloorToBits(32 * params / value);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown budget kind ", static_cast<int>(budget.kind)));
}

absl::StatusOr<std::vector<ParetoPoint>> ParetoFrontier(
    const std::vector<LayerCost>& layers, const PlanOptions& options) {
  ZQ_RETURN_IF_ERROR(ValidateLayers(layers));
  const Problem problem = BuildProblem(layers);
  ZQ_ASSIGN_OR_RETURN(Buckets buckets, MakeBuckets(problem, options));
  return FrontierOf(problem, buckets);
}

absl::StatusOr<ParetoPoint> ChooseFromFrontier(
    const std::vector<ParetoPoint>& frontier, int64_t budget_bits) {
  if (frontier.empty()) {
    return absl::InvalidArgumentError("empty Pareto frontier");
  }
  if (budget_bits < frontier.front().size_bits) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget of ", Bytes(budget_bits),
                     " is below the smallest achievable weight size ",
                     Bytes(frontier.front().size_bits)));
  }
  // Sizes ascend and sensitivities descend: the last point that fits wins.
  auto after = std::upper_bound(
      frontier.begin(), frontier.end(), budget_bits,
      [](int64_t bits, const ParetoPoint& p) { return bits < p.size_bits; });
  return *(after - 1);
}

absl::StatusOr<Plan> PlanMixedPrecision(const std::vector<LayerCost>& layers,
                                        const Budget& budget,
                                        const PlanOptions& options) {
  ZQ_ASSIGN_OR_RETURN(const int64_t budget_bits, BudgetToBits(budget, layers));
  const Problem problem = BuildProblem(layers);
  if (budget_bits < problem.min_bits) {
    const double params = static_cast<double>(problem.total_params);
    return absl::InvalidArgumentError(absl::StrCat(
        "budget of ", Bytes(budget_bits), " (", Fixed(budget_bits / params, 4),
        " average bits) is below the smallest achievable weight size ",
        Bytes(problem.min_bits), " (", Fixed(problem.min_bits / params, 4),
        " average bits, every layer at its narrowest allowed width)"));
  }
  ZQ_ASSIGN_OR_RETURN(Buckets buckets, MakeBuckets(problem, options));
  Plan plan;
  plan.frontier = FrontierOf(problem, buckets);
  ZQ_ASSIGN_OR_RETURN(plan.chosen,
                      ChooseFromFrontier(plan.frontier, budget_bits));
  plan.budget_bits = budget_bits;
  plan.bucket_bits = buckets.bucket_bits;
  plan.bound_bits = buckets.bound_bits;
  plan.sensitivity_lower_bound = LowerBound(problem, buckets, budget_bits);
  return plan;
}

absl::StatusOr<Budget> ParseBudget(const std::string& text) {
  std::string t;
  for (char c : text) {
    if (c != ' ') t.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  }
  auto number = [](absl::string_view s, double* v) {
    return !s.empty() && absl::SimpleAtod(s, v) && std::isfinite(*v) && *v > 0;
  };
  double v = 0;
  absl::string_view s = t;
  struct Unit { const char* suffix; double factor; };
  static const Unit kUnits[] = {{"KIB", 1024.0}, {"MIB", 1048576.0}, {"KB", 1000.0},
                                {"MB", 1e6}, {"B", 1.0}};
  if (absl::ConsumePrefix(&s, "MP")) {
    if (number(s, &v)) return Budget{Budget::kAverageBits, v};
  } else if (absl::ConsumeSuffix(&s, "X")) {
    if (number(s, &v)) return Budget{Budget::kCompressionRatio, v};
  } else {
    for (const Unit& u : kUnits) {
      absl::string_view rest = s;
      if (absl::ConsumeSuffix(&rest, u.suffix)) {
        if (number(rest, &v)) return Budget{Budget::kBytes, v * u.factor};
        return absl::InvalidArgumentError(absl::StrCat("budget \"", text, "\" is not understood"));
      }
    }
    if (number(s, &v)) return Budget{Budget::kAverageBits, v};
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "budget \"", text,
      "\" is not understood: use MP4 or 4 (average bits), 8x (compression "
      "against float), or a size such as 120KB, 1.5MiB, 30000B"));
}

absl::Status CheckReplanWidths(const std::vector<int>& wanted,
                               const std::vector<int>& stored) {
  for (int k : wanted) {
    if (std::find(stored.begin(), stored.end(), k) == stored.end()) {
      std::string have;
      for (int s : stored) have += (have.empty() ? "" : ",") + std::to_string(s);
      return absl::InvalidArgumentError(
          "candidate_bits: width " + std::to_string(k) +
          " is not in the stored sensitivity table, which has " + have +
          "; re-plan with some of those, or run a full job with the new widths");
    }
  }
  return absl::OkStatus();
}

}  // namespace zeroq::core
