// pareto_test.cc: the planner against brute force on small random instances,
// the bound of pareto.h, budget conversions and every error.
#include "core/pareto.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::HasSubstr;

// Every configuration of a small instance, sorted by size (then sensitivity).
struct Config {
  int64_t size_bits;
  double sensitivity;  // Summed in layer order from 0.0, as the DP does.
  std::vector<int> bits;
};

class BruteForce {
 public:
  explicit BruteForce(const std::vector<LayerCost>& layers) {
    std::vector<std::vector<int>> allowed;
    for (const LayerCost& layer : layers) {
      std::vector<int> idx;
      for (size_t k = 0; k < layer.bits.size(); ++k) {
        if (!layer.pinned_bits || layer.bits[k] == *layer.pinned_bits) {
          idx.push_back(static_cast<int>(k));
        }
      }
      allowed.push_back(idx);
    }
    std::vector<size_t> digit(layers.size(), 0);
    while (true) {
      Config c{0, 0.0, {}};
      for (size_t i = 0; i < layers.size(); ++i) {
        const int k = allowed[i][digit[i]];
        c.size_bits += layers[i].params * layers[i].bits[k];
        c.sensitivity += layers[i].sensitivity[k];
        c.bits.push_back(layers[i].bits[k]);
      }
      configs_.push_back(std::move(c));
      size_t i = 0;
      while (i < layers.size() && ++digit[i] == allowed[i].size()) {
        digit[i++] = 0;
      }
      if (i == layers.size()) break;
    }
    std::sort(configs_.begin(), configs_.end(),
              [](const Config& a, const Config& b) {
                if (a.size_bits != b.size_bits)
                  return a.size_bits < b.size_bits;
                return a.sensitivity < b.sensitivity;
              });
    double best = std::numeric_limits<double>::infinity();
    for (const Config& c : configs_) {
      best = std::min(best, c.sensitivity);
      prefix_min_.push_back(best);
      if (pareto_.empty() || c.sensitivity < pareto_.back().sensitivity) {
        pareto_.push_back(c);
      }
    }
  }

  // OPT(S): the least sensitivity of size <= S; +inf if nothing fits.
  double Opt(int64_t budget_bits) const {
    auto it = std::upper_bound(
        configs_.begin(), configs_.end(), budget_bits,
        [](int64_t s, const Config& c) { return s < c.size_bits; });
    if (it == configs_.begin()) return std::numeric_limits<double>::infinity();
    return prefix_min_[it - configs_.begin() - 1];
  }
  int64_t MinSize() const { return configs_.front().size_bits; }
  int64_t MaxSize() const { return configs_.back().size_bits; }
  const std::vector<Config>& configs() const { return configs_; }
  const std::vector<Config>& pareto() const { return pareto_; }

 private:
  std::vector<Config> configs_;
  std::vector<double> prefix_min_;
  std::vector<Config> pareto_;
};

// Random layers: mostly {2,4,8} (in a random order sometimes), sometimes a
// random subset of 1..8; sensitivities decreasing in width, arbitrary, or
// small integers (many ties); some layers pinned.
std::vector<LayerCost> RandomLayers(std::mt19937_64& rng, int num_layers,
                                    int64_t max_params, bool pins) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<LayerCost> layers;
  for (int i = 0; i < num_layers; ++i) {
    LayerCost layer;
    layer.name = absl::StrCat("l", i);
    layer.params = std::uniform_int_distribution<int64_t>(1, max_params)(rng);
    if (unit(rng) < 0.7) {
      layer.bits = {2, 4, 8};
      if (unit(rng) < 0.3)
        std::shuffle(layer.bits.begin(), layer.bits.end(), rng);
    } else {
      std::vector<int> all = {1, 2, 3, 4, 5, 6, 7, 8};
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(std::uniform_int_distribution<int>(1, 3)(rng));
      layer.bits = all;
    }
    const double kind = unit(rng);
    for (int b : layer.bits) {
      if (kind < 0.4) {
        layer.sensitivity.push_back(unit(rng) * std::exp(-0.7 * b));
      } else if (kind < 0.8) {
        layer.sensitivity.push_back(unit(rng));
      } else {
        layer.sensitivity.push_back(
            std::uniform_int_distribution<int>(0, 3)(rng));
      }
    }
    if (pins && unit(rng) < 0.15) {
      layer.pinned_bits = layer.bits[std::uniform_int_distribution<size_t>(
          0, layer.bits.size() - 1)(rng)];
    }
    layers.push_back(std::move(layer));
  }
  return layers;
}

// A point's bits are allowed for its layers and give its size and sensitivity
// exactly.
void ExpectConsistent(const std::vector<LayerCost>& layers,
                      const ParetoPoint& p) {
  ASSERT_EQ(p.bits.size(), layers.size());
  int64_t size = 0;
  double sens = 0.0;
  for (size_t i = 0; i < layers.size(); ++i) {
    auto it =
        std::find(layers[i].bits.begin(), layers[i].bits.end(), p.bits[i]);
    ASSERT_NE(it, layers[i].bits.end()) << "layer " << i;
    if (layers[i].pinned_bits) {
      EXPECT_EQ(p.bits[i], *layers[i].pinned_bits) << "layer " << i;
    }
    size += layers[i].params * p.bits[i];
    sens += layers[i].sensitivity[it - layers[i].bits.begin()];
  }
  EXPECT_EQ(p.size_bits, size);
  EXPECT_EQ(p.total_sensitivity, sens);
}

int64_t FreeLayers(const std::vector<LayerCost>& layers) {
  int64_t n = 0;
  for (const LayerCost& l : layers) n += !l.pinned_bits && l.bits.size() > 1;
  return n;
}

std::vector<int64_t> SomeBudgets(std::mt19937_64& rng, const BruteForce& bf) {
  std::vector<int64_t> budgets = {bf.MinSize(), bf.MinSize() + 1,
                                  bf.MaxSize() - 1, bf.MaxSize(),
                                  bf.MaxSize() + 1000};
  std::uniform_int_distribution<int64_t> any(bf.MinSize(), bf.MaxSize());
  for (int i = 0; i < 8; ++i) budgets.push_back(any(rng));
  // Exact sizes of configurations, where rounding matters most.
  for (int i = 0; i < 4; ++i) {
    budgets.push_back(bf.configs()[std::uniform_int_distribution<size_t>(
                                       0, bf.configs().size() - 1)(rng)]
                          .size_bits);
  }
  budgets.erase(std::remove_if(budgets.begin(), budgets.end(),
                               [&](int64_t b) { return b < bf.MinSize(); }),
                budgets.end());
  return budgets;
}

const int kBucketSettings[] = {1, 2, 7, 64, 4096, 1 << 20};

TEST(PlanMixedPrecisionTest, NeverOverBudgetAndWithinBoundOfBruteForce) {
  int exact_plans = 0;
  int approximate_plans = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    std::mt19937_64 rng(seed);
    const int num_layers = 1 + static_cast<int>(seed % 10);
    const std::vector<LayerCost> layers =
        RandomLayers(rng, num_layers, seed % 3 == 0 ? 20 : 1500, true);
    const BruteForce bf(layers);
    for (int64_t budget : SomeBudgets(rng, bf)) {
      for (int buckets : kBucketSettings) {
        SCOPED_TRACE(absl::StrCat("seed ", seed, " budget ", budget,
                                  " buckets ", buckets));
        auto plan = PlanMixedPrecision(layers, {Budget::kBytes, budget / 8.0},
                                       {buckets});
        ASSERT_TRUE(plan.ok()) << plan.status();
        const int64_t s = plan->budget_bits;
        EXPECT_EQ(s, budget);
        ExpectConsistent(layers, plan->chosen);
        EXPECT_LE(plan->chosen.size_bits, s);
        EXPECT_GE(plan->bound_bits, 0);
        EXPECT_LE(plan->bound_bits,
                  FreeLayers(layers) * (plan->bucket_bits - 1));
        const double opt = bf.Opt(s);
        EXPECT_GE(plan->chosen.total_sensitivity, opt);
        EXPECT_LE(plan->sensitivity_lower_bound, opt);
        const double opt_reduced = bf.Opt(s - plan->bound_bits);
        if (std::isfinite(opt_reduced)) {
          EXPECT_LE(plan->chosen.total_sensitivity, opt_reduced);
        }
        if (plan->bound_bits == 0) {
          EXPECT_EQ(plan->chosen.total_sensitivity, opt);
          EXPECT_EQ(plan->sensitivity_lower_bound, opt);
          ++exact_plans;
        } else {
          ++approximate_plans;
        }
      }
    }
  }
  // Both regimes were exercised.
  EXPECT_GT(exact_plans, 1000);
  EXPECT_GT(approximate_plans, 1000);
}

TEST(PlanMixedPrecisionTest, ExactWhenSizeRangeFitsInBuckets) {
  for (uint64_t seed = 0; seed < 100; ++seed) {
    std::mt19937_64 rng(1000 + seed);
    const std::vector<LayerCost> layers =
        RandomLayers(rng, 1 + seed % 10, 1000, true);
    const BruteForce bf(layers);
    for (int64_t budget : SomeBudgets(rng, bf)) {
      auto plan =
          PlanMixedPrecision(layers, {Budget::kBytes, budget / 8.0}, {1 << 20});
      ASSERT_TRUE(plan.ok()) << plan.status();
      EXPECT_EQ(plan->bound_bits, 0) << "seed " << seed;
      EXPECT_EQ(plan->chosen.total_sensitivity, bf.Opt(budget))
          << "seed " << seed << " budget " << budget;
    }
  }
}

TEST(PlanMixedPrecisionTest, CoarseBucketsStayWithinBudget) {
  // One bucket for the whole range: everything beyond the narrowest widths
  // rounds up to it, and the plan must still fit.
  for (uint64_t seed = 0; seed < 50; ++seed) {
    std::mt19937_64 rng(5000 + seed);
    const std::vector<LayerCost> layers = RandomLayers(rng, 8, 3000, false);
    const BruteForce bf(layers);
    for (int64_t budget : SomeBudgets(rng, bf)) {
      auto plan =
          PlanMixedPrecision(layers, {Budget::kBytes, budget / 8.0}, {1});
      ASSERT_TRUE(plan.ok()) << plan.status();
      EXPECT_LE(plan->chosen.size_bits, budget);
    }
  }
}

TEST(ParetoFrontierTest, SortedMonotoneAndWithinBoundOfBruteForce) {
  int exact_frontiers = 0;
  for (uint64_t seed = 0; seed < 150; ++seed) {
    std::mt19937_64 rng(20000 + seed);
    const std::vector<LayerCost> layers =
        RandomLayers(rng, 1 + seed % 10, seed % 2 ? 50 : 4000, true);
    const BruteForce bf(layers);
    for (int buckets : kBucketSettings) {
      SCOPED_TRACE(absl::StrCat("seed ", seed, " buckets ", buckets));
      auto frontier = ParetoFrontier(layers, {buckets});
      ASSERT_TRUE(frontier.ok()) << frontier.status();
      // W for these options: it does not depend on the budget.
      auto plan = PlanMixedPrecision(
          layers, {Budget::kBytes, bf.MaxSize() / 8.0}, {buckets});
      ASSERT_TRUE(plan.ok()) << plan.status();
      const int64_t w = plan->bound_bits;
      ASSERT_FALSE(frontier->empty());
      EXPECT_EQ(frontier->front().size_bits, bf.MinSize());
      for (size_t j = 0; j < frontier->size(); ++j) {
        const ParetoPoint& p = (*frontier)[j];
        ExpectConsistent(layers, p);
        if (j > 0) {
          EXPECT_GT(p.size_bits, (*frontier)[j - 1].size_bits);
          EXPECT_LT(p.total_sensitivity, (*frontier)[j - 1].total_sensitivity);
        }
        // Nothing W bits smaller is strictly better.
        EXPECT_GE(bf.Opt(p.size_bits - w), p.total_sensitivity);
      }
      // Every configuration is matched by a point at most W bits larger.
      for (const Config& c : bf.configs()) {
        auto after = std::upper_bound(
            frontier->begin(), frontier->end(), c.size_bits + w,
            [](int64_t s, const ParetoPoint& p) { return s < p.size_bits; });
        ASSERT_NE(after, frontier->begin());
        ASSERT_LE((after - 1)->total_sensitivity, c.sensitivity)
            << "config of size " << c.size_bits;
      }
      if (w == 0) {
        ++exact_frontiers;
        ASSERT_EQ(frontier->size(), bf.pareto().size());
        for (size_t j = 0; j < frontier->size(); ++j) {
          EXPECT_EQ((*frontier)[j].size_bits, bf.pareto()[j].size_bits);
          EXPECT_EQ((*frontier)[j].total_sensitivity,
                    bf.pareto()[j].sensitivity);
        }
      }
    }
  }
  EXPECT_GE(exact_frontiers, 150);
}

TEST(ParetoFrontierTest, ReplanningFromFrontierEqualsPlan) {
  for (uint64_t seed = 0; seed < 100; ++seed) {
    std::mt19937_64 rng(30000 + seed);
    const std::vector<LayerCost> layers =
        RandomLayers(rng, 1 + seed % 10, 3000, true);
    const BruteForce bf(layers);
    for (int buckets : {7, 4096}) {
      auto frontier = ParetoFrontier(layers, {buckets});
      ASSERT_TRUE(frontier.ok()) << frontier.status();
      for (int64_t budget : SomeBudgets(rng, bf)) {
        auto plan = PlanMixedPrecision(layers, {Budget::kBytes, budget / 8.0},
                                       {buckets});
        ASSERT_TRUE(plan.ok()) << plan.status();
        auto replanned = ChooseFromFrontier(*frontier, budget);
        ASSERT_TRUE(replanned.ok()) << replanned.status();
        EXPECT_EQ(replanned->size_bits, plan->chosen.size_bits);
        EXPECT_EQ(replanned->total_sensitivity, plan->chosen.total_sensitivity);
        EXPECT_EQ(replanned->bits, plan->chosen.bits);
        ASSERT_EQ(plan->frontier.size(), frontier->size());
      }
    }
  }
}

TEST(ParetoFrontierTest, ChooseFromFrontierErrors) {
  EXPECT_EQ(ChooseFromFrontier({}, 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<ParetoPoint> frontier = {{80, 1.0, {8}}, {160, 0.5, {16}}};
  auto below = ChooseFromFrontier(frontier, 79);
  EXPECT_EQ(below.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(below.status().message(), HasSubstr("10.00 bytes"));
  EXPECT_EQ(ChooseFromFrontier(frontier, 159)->size_bits, 80);
  EXPECT_EQ(ChooseFromFrontier(frontier, 160)->size_bits, 160);
}

TEST(PlanMixedPrecisionTest, PinnedLayersStayPinned) {
  for (uint64_t seed = 0; seed < 50; ++seed) {
    std::mt19937_64 rng(40000 + seed);
    std::vector<LayerCost> layers = RandomLayers(rng, 8, 1000, false);
    // Pin every other layer to its most sensitive width, the one the
    // optimiser would least like.
    for (size_t i = 0; i < layers.size(); i += 2) {
      const auto& s = layers[i].sensitivity;
      layers[i].pinned_bits =
          layers[i].bits[std::max_element(s.begin(), s.end()) - s.begin()];
    }
    const BruteForce bf(layers);
    for (int64_t budget :
         {bf.MinSize(), (bf.MinSize() + bf.MaxSize()) / 2, bf.MaxSize()}) {
      auto plan = PlanMixedPrecision(layers, {Budget::kBytes, budget / 8.0});
      ASSERT_TRUE(plan.ok()) << plan.status();
      for (size_t i = 0; i < layers.size(); i += 2) {
        EXPECT_EQ(plan->chosen.bits[i], *layers[i].pinned_bits);
        for (const ParetoPoint& p : plan->frontier) {
          EXPECT_EQ(p.bits[i], *layers[i].pinned_bits);
        }
      }
      const double opt_reduced = bf.Opt(budget - plan->bound_bits);
      if (std::isfinite(opt_reduced)) {
        EXPECT_LE(plan->chosen.total_sensitivity, opt_reduced);
      }
    }
  }
}

TEST(PlanMixedPrecisionTest, SmallWorkedExample) {
  // Budget 4 bits average over 300 weights = 1200 bits. Options:
  // a@8 + b@2 = 800 + 400 = 1200 bits, sensitivity 0.01 + 0.5 = 0.51;
  // a@4 + b@4 = 400 + 800 = 1200 bits, sensitivity 0.2 + 0.1 = 0.3 (best);
  // a@2 + b@8 = 200 + 1600 = 1800 bits: over budget.
  // Widths 2 -> 4 -> 8 add multiples of 200 bits, so B = 200 and W = 0.
  std::vector<LayerCost> layers = {
      {"a", 100, {2, 4, 8}, {1.0, 0.2, 0.01}, std::nullopt},
      {"b", 200, {2, 4, 8}, {0.5, 0.1, 0.0}, std::nullopt},
  };
  auto plan = PlanMixedPrecision(layers, {Budget::kAverageBits, 4.0});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->budget_bits, 1200);
  EXPECT_EQ(plan->chosen.bits, (std::vector<int>{4, 4}));
  EXPECT_EQ(plan->chosen.size_bits, 1200);
  EXPECT_DOUBLE_EQ(plan->chosen.total_sensitivity, 0.3);
  EXPECT_EQ(plan->bound_bits, 0);
  // Frontier: 600 (2,2) 1.5; 800 (4,2) 0.7; 1200 (4,4) 0.3; 1600 (8,4)
  // 0.11; 2400 (8,8) 0.01. Dominated: 1000 (2,4) 1.1, 1200 (8,2) 0.51,
  // 1800 (2,8) 1.0, 2000 (4,8) 0.2.
  ASSERT_EQ(plan->frontier.size(), 5u);
  std::vector<int64_t> sizes;
  for (const ParetoPoint& p : plan->frontier) sizes.push_back(p.size_bits);
  EXPECT_EQ(sizes, (std::vector<int64_t>{600, 800, 1200, 1600, 2400}));
}

TEST(PlanMixedPrecisionTest, ResNet50SizedInstanceWithinBudget) {
  std::mt19937_64 rng(7);
  std::vector<LayerCost> layers = RandomLayers(rng, 54, 2'000'000, false);
  for (LayerCost& l : layers) {
    l.bits = {2, 4, 8};
    l.sensitivity = {0.5, 0.05, 0.001};
  }
  auto plan = PlanMixedPrecision(layers, {Budget::kAverageBits, 4.0});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_LE(plan->chosen.size_bits, plan->budget_bits);
  EXPECT_LE(plan->sensitivity_lower_bound, plan->chosen.total_sensitivity);
  EXPECT_LE(plan->bound_bits, 54 * (plan->bucket_bits - 1));
  ExpectConsistent(layers, plan->chosen);
}

TEST(BudgetToBitsTest, Conversions) {
  std::vector<LayerCost> layers = {
      {"a", 1000, {2, 4, 8}, {1, 0.5, 0}, std::nullopt},
      {"b", 2345, {2, 4, 8}, {1, 0.5, 0}, std::nullopt},
  };
  const int64_t params = 3345;
  // MP4 is the size of uniform 4-bit weights.
  EXPECT_EQ(*BudgetToBits({Budget::kAverageBits, 4.0}, layers), 4 * params);
  // Compression ratio 8 of float32 is 4 bits average.
  EXPECT_EQ(*BudgetToBits({Budget::kCompressionRatio, 8.0}, layers),
            4 * params);
  EXPECT_EQ(*BudgetToBits({Budget::kCompressionRatio, 1.0}, layers),
            32 * params);
  EXPECT_EQ(*BudgetToBits({Budget::kBytes, 1000.0}, layers), 8000);
  // Fractions round down.
  EXPECT_EQ(*BudgetToBits({Budget::kBytes, 1000.3}, layers), 8002);
  EXPECT_EQ(*BudgetToBits({Budget::kAverageBits, 4.1}, layers), 13714);
  EXPECT_EQ(*BudgetToBits({Budget::kAverageBits, 6.0}, layers), 6 * params);
  EXPECT_EQ(*BudgetToBits({Budget::kCompressionRatio, 3.0}, layers),
            32 * params / 3);
  // Uniform 4-bit fits MP4 exactly.
  auto plan = PlanMixedPrecision(layers, {Budget::kAverageBits, 4.0});
  ASSERT_TRUE(plan.ok());
  EXPECT_LE(plan->chosen.size_bits, 4 * params);
  // A huge budget clamps instead of overflowing.
  EXPECT_GT(*BudgetToBits({Budget::kBytes, 1e300}, layers), 32 * params);
}

LayerCost Good(std::string name) {
  return {std::move(name), 10, {2, 4, 8}, {0.3, 0.2, 0.1}, std::nullopt};
}

absl::Status PlanStatus(const std::vector<LayerCost>& layers,
                        Budget budget = {Budget::kAverageBits, 4.0},
                        PlanOptions options = {}) {
  return PlanMixedPrecision(layers, budget, options).status();
}

void ExpectInvalid(const absl::Status& s, const std::string& substring) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr(substring)) << s;
}

TEST(PlanMixedPrecisionErrorsTest, EmptyLayers) {
  ExpectInvalid(PlanStatus({}), "no layers");
  ExpectInvalid(ParetoFrontier({}).status(), "no layers");
  ExpectInvalid(BudgetToBits({Budget::kBytes, 1}, {}).status(), "no layers");
}

TEST(PlanMixedPrecisionErrorsTest, BadLayers) {
  LayerCost l = Good("conv2");
  l.sensitivity.pop_back();
  ExpectInvalid(PlanStatus({Good("conv1"), l}),
                "layer 1 (\"conv2\"): 3 candidate widths but 2 sensitivities");

  l = Good("conv2");
  l.params = 0;
  ExpectInvalid(PlanStatus({Good("conv1"), l}),
                "\"conv2\"): params must be > 0");
  l.params = -5;
  ExpectInvalid(PlanStatus({l}), "params must be > 0");

  l = Good("conv2");
  l.sensitivity[1] = -0.1;
  ExpectInvalid(PlanStatus({l}), "\"conv2\"): sensitivity at 4 bits");
  l.sensitivity[1] = std::nan("");
  ExpectInvalid(PlanStatus({l}), "sensitivity at 4 bits");
  l.sensitivity[1] = std::numeric_limits<double>::infinity();
  ExpectInvalid(ParetoFrontier({l}).status(), "sensitivity at 4 bits");

  l = Good("fc");
  l.bits.clear();
  l.sensitivity.clear();
  ExpectInvalid(PlanStatus({l}), "\"fc\"): no candidate bit widths");

  l = Good("fc");
  l.bits = {2, 4, 33};
  ExpectInvalid(PlanStatus({l}), "width 33 is outside 1..32");
  l.bits = {0, 4, 8};
  ExpectInvalid(PlanStatus({l}), "width 0 is outside");
  l.bits = {4, 4, 8};
  ExpectInvalid(PlanStatus({l}), "width 4 is listed twice");

  l = Good("fc");
  l.params = int64_t{1} << 60;
  ExpectInvalid(PlanStatus({l}), "too many weights");
}

TEST(PlanMixedPrecisionErrorsTest, PinnedWidthNotACandidate) {
  LayerCost l = Good("layer3.1.conv2");
  l.pinned_bits = 6;
  ExpectInvalid(PlanStatus({Good("a"), l}),
                "layer 1 (\"layer3.1.conv2\"): pinned width 6 is not among");
  l.pinned_bits = 64;
  ExpectInvalid(ParetoFrontier({l}).status(), "pinned width 64");
}

TEST(PlanMixedPrecisionErrorsTest, BudgetBelowSmallestSize) {
  // Smallest: 10 * 2 + 10 * 8 (pinned) = 100 bits = 12.5 bytes, 5 bits avg.
  LayerCost pinned = Good("b");
  pinned.pinned_bits = 8;
  const std::vector<LayerCost> layers = {Good("a"), pinned};
  const absl::Status s = PlanStatus(layers, {Budget::kAverageBits, 4.0});
  ExpectInvalid(s, "below the smallest achievable weight size 12.50 bytes");
  EXPECT_THAT(s.message(), HasSubstr("5.0000 average bits"));
  EXPECT_THAT(s.message(), HasSubstr("budget of 10.00 bytes (4.0000"));
  EXPECT_TRUE(PlanMixedPrecision(layers, {Budget::kBytes, 12.5}).ok());
  ExpectInvalid(PlanStatus(layers, {Budget::kBytes, 12.4}), "12.50 bytes");
}

TEST(PlanMixedPrecisionErrorsTest, NonPositiveBudget) {
  const std::vector<LayerCost> layers = {Good("a")};
  for (Budget::Kind kind :
       {Budget::kBytes, Budget::kAverageBits, Budget::kCompressionRatio}) {
    for (double v :
         {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
      ExpectInvalid(PlanStatus(layers, {kind, v}), "budget value");
      ExpectInvalid(BudgetToBits({kind, v}, layers).status(), "budget value");
    }
  }
  ExpectInvalid(PlanStatus(layers, {static_cast<Budget::Kind>(3), 1.0}),
                "unknown budget kind");
}

TEST(PlanMixedPrecisionErrorsTest, SizeBucketsOutOfRange) {
  ExpectInvalid(PlanStatus({Good("a")}, {Budget::kAverageBits, 4}, {0}),
                "size_buckets");
  ExpectInvalid(ParetoFrontier({Good("a")}, {-3}).status(), "size_buckets");
  ExpectInvalid(ParetoFrontier({Good("a")}, {1 << 23}).status(),
                "size_buckets");
}

TEST(ParetoFrontierTest, SingleWidthLayersGiveOnePoint) {
  LayerCost a = Good("a");
  a.pinned_bits = 4;
  LayerCost b = {"b", 7, {3}, {0.25}, std::nullopt};
  auto frontier = ParetoFrontier({a, b});
  ASSERT_TRUE(frontier.ok()) << frontier.status();
  ASSERT_EQ(frontier->size(), 1u);
  EXPECT_EQ((*frontier)[0].size_bits, 10 * 4 + 7 * 3);
  EXPECT_EQ((*frontier)[0].bits, (std::vector<int>{4, 3}));
}

TEST(CheckReplanWidths, SubsetsOfTheStoredWidthsOnly) {
  EXPECT_TRUE(CheckReplanWidths({}, {2, 4, 8}).ok());
  EXPECT_TRUE(CheckReplanWidths({2, 4}, {2, 4, 8}).ok());
  EXPECT_TRUE(CheckReplanWidths({8, 2}, {2, 4, 8}).ok());
  absl::Status s = CheckReplanWidths({3, 5}, {2, 4, 8});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("candidate_bits: width 3"), std::string::npos) << s;
  EXPECT_NE(s.message().find("has 2,4,8"), std::string::npos) << s;
}

}  // namespace
}  // namespace zeroq::core
