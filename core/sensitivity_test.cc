#include "core/sensitivity.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "core/pipeline.h"
#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {


std::vector<torch::Tensor> RandomData(std::vector<int64_t> shape, int batches) {
  torch::manual_seed(7);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < batches; ++i) out.push_back(torch::randn(shape));
  return out;
}

struct Case {
  const char* model;
  std::vector<int64_t> shape;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.model; }

class SlicedEqualsNaive : public ::testing::TestWithParam<Case> {};

// Slicing must not change a single Omega: every architecture with residual
// adds, concatenations, channel shuffles or depthwise convs.
TEST_P(SlicedEqualsNaive, SameOmegaEveryLayer) {
  at::set_num_threads(1);
  auto model = Model::LoadFromFile(ModelPath(GetParam().model));
  ASSERT_TRUE(model.ok()) << model.status();
  auto data = RandomData(GetParam().shape, 2);
  SensitivityOptions sliced, naive;
  naive.slice_graph = false;
  auto a = ComputeSensitivity(**model, data, sliced);
  auto b = ComputeSensitivity(**model, data, naive);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->size(), (*model)->summary().layers.size());
  ASSERT_EQ(a->size(), b->size());
  for (size_t i = 0; i < a->size(); ++i) {
    EXPECT_EQ((*a)[i].name, (*model)->summary().layers[i].name);
    for (size_t j = 0; j < (*a)[i].omega.size(); ++j) {
      EXPECT_NEAR((*a)[i].omega[j], (*b)[i].omega[j],
                  1e-6 * std::max(1.0, std::abs((*b)[i].omega[j])))
          << (*a)[i].name << " at " << (*a)[i].bits[j] << " bits";
      EXPECT_TRUE(std::isfinite((*a)[i].omega[j]));
      EXPECT_GE((*a)[i].omega[j], 0.0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, SlicedEqualsNaive,
    ::testing::Values(Case{"fashion_cnn.pt", {8, 1, 28, 28}},
                      Case{"tiny_nobn_after_conv.pt", {8, 3, 16, 16}},
                      Case{"mini_resnet.pt", {4, 3, 32, 32}},
                      Case{"mini_densenet.pt", {4, 3, 32, 32}},
                      Case{"mini_shufflenet_v2.pt", {4, 3, 32, 32}},
                      Case{"mini_mobilenet_v2.pt", {4, 3, 32, 32}}),
    [](const ::testing::TestParamInfo<Case>& info) {
      std::string name = info.param.model;
      name = name.substr(0, name.find('.'));
      for (char& c : name) if (c == '_') c = 'X';
      return name;
    });

// DenseNet appends to a feature list between reads; loading rewrites the
// appends into fresh lists so that the sweep can slice it at all.
TEST(Sensitivity, DenseNetFeatureListIsFunctional) {
  auto model = Model::LoadFromFile(ModelPath("mini_densenet.pt"));
  ASSERT_TRUE(model.ok());
  EXPECT_FALSE(HasMutation(*(*model)->graph()));
}

TEST(Sensitivity, FewerBitsHurtMore) {
  at::set_num_threads(1);
  auto model = Model::LoadFromFile(ModelPath("fashion_cnn.pt"));
  ASSERT_TRUE(model.ok());
  auto table = ComputeSensitivity(**model, RandomData({16, 1, 28, 28}, 1), {});
  ASSERT_TRUE(table.ok()) << table.status();
  double sum2 = 0, sum8 = 0;
  for (const LayerSensitivity& row : *table) {
    ASSERT_EQ(row.bits, (std::vector<int>{2, 3, 4, 6, 8}));
    sum2 += row.omega[0];
    sum8 += row.omega[4];
    EXPECT_GT(row.omega[0], row.omega[4]) << row.name;
  }
  EXPECT_GT(sum2, 100 * sum8);
}

TEST(Sensitivity, OthersAt8BitChangesTheBaseline) {
  at::set_num_threads(1);
  auto model = Model::LoadFromFile(ModelPath("fashion_cnn.pt"));
  ASSERT_TRUE(model.ok());
  auto data = RandomData({8, 1, 28, 28}, 1);
  SensitivityOptions plain, eight;
  eight.others_at_8bit = true;
  auto a = ComputeSensitivity(**model, data, plain);
  auto b = ComputeSensitivity(**model, data, eight);
  ASSERT_TRUE(a.ok() && b.ok());
  // At 8 bits (the last width), the whole model is then at 8 bits,
  // whatever the layer.
  const double all8 = (*b)[0].omega.back();
  for (const LayerSensitivity& row : *b) EXPECT_NEAR(row.omega.back(), all8, 1e-9);
  EXPECT_NE((*a)[0].omega.back(), (*b)[0].omega.back());
}

TEST(Sensitivity, ProgressAndCancellation) {
  auto model = Model::LoadFromFile(ModelPath("fashion_cnn.pt"));
  ASSERT_TRUE(model.ok());
  auto data = RandomData({4, 1, 28, 28}, 1);
  int calls = 0;
  auto ok = ComputeSensitivity(**model, data, {}, [&](const SensitivityProgress& p) {
    ++calls;
    EXPECT_EQ(p.step, calls);
    EXPECT_EQ(p.total, 30);
  });
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(calls, 30);  // 6 layers x 5 widths

  CancellationToken cancel;
  auto cancelled = ComputeSensitivity(
      **model, data, {}, [&](const SensitivityProgress&) { cancel.Cancel(); },
      &cancel);
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
}

TEST(Sensitivity, BadInput) {
  auto model = Model::LoadFromFile(ModelPath("fashion_cnn.pt"));
  ASSERT_TRUE(model.ok());
  SensitivityOptions bad;
  bad.bits = {1, 4};
  EXPECT_EQ(ComputeSensitivity(**model, RandomData({2, 1, 28, 28}, 1), bad)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComputeSensitivity(**model, {}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Re-planning from a stored table gives what a full run with that budget
// chooses, without the sweep.
TEST(Sensitivity, ReplanFromReportMatchesFullRun) {
  at::set_num_threads(2);
  TempDir tmp;
  const std::string& dir = tmp.path();
  JobSpec spec;
  spec.model_path = ModelPath("fashion_cnn.pt");
  spec.input_shape = {1, 28, 28};
  spec.distill.iterations = 20;
  spec.distill.batch_size = 8;
  spec.threads = 2;
  spec.output_dir = dir;
  spec.budget = Budget{Budget::kAverageBits, 4};
  // The re-plan is what is checked here; learned rounding would only add
  // minutes to each of the five jobs.
  spec.reconstruct.method = ReconstructMethod::kNone;
  auto first = RunJob(spec);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->sensitivity.size(), 6u);
  ASSERT_TRUE(first->chosen.has_value());
  EXPECT_LE(first->chosen->size_bits, 4 * first->quantizable_params);

  for (double budget : {3.0, 5.0}) {
    // Full run at the new budget.
    spec.budget = Budget{Budget::kAverageBits, budget};
    spec.precomputed_sensitivity.clear();
    auto full = RunJob(spec);
    ASSERT_TRUE(full.ok()) << full.status();
    // Re-plan from the first run's report and its distilled data.
    std::ifstream in(first->report_artifact);
    std::stringstream text;
    text << in.rdbuf();
    auto table = SensitivityFromReportJson(text.str());
    ASSERT_TRUE(table.ok()) << table.status();
    JobSpec replan = spec;
    replan.precomputed_sensitivity = *table;
    auto fast = RunJob(replan);
    ASSERT_TRUE(fast.ok()) << fast.status();
    ASSERT_TRUE(full->chosen && fast->chosen);
    EXPECT_EQ(fast->chosen->bits, full->chosen->bits) << "budget " << budget;
    for (const auto& [stage, seconds] : fast->stage_seconds) {
      if (stage == Stage::kSensitivity) EXPECT_LT(seconds, 0.1);
    }
  }
}

TEST(Sensitivity, ParseBudget) {
  auto b = ParseBudget("MP4");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->kind, Budget::kAverageBits);
  EXPECT_EQ(b->value, 4);
  EXPECT_EQ(ParseBudget("8x")->kind, Budget::kCompressionRatio);
  EXPECT_EQ(ParseBudget("120KB")->value, 120000);
  EXPECT_EQ(ParseBudget("1.5MiB")->value, 1.5 * 1048576);
  EXPECT_EQ(ParseBudget("3.5")->kind, Budget::kAverageBits);
  EXPECT_FALSE(ParseBudget("lots").ok());
  EXPECT_FALSE(ParseBudget("-4").ok());
  EXPECT_FALSE(ParseBudget("MP").ok());
}

}  // namespace
}  // namespace zeroq::core
