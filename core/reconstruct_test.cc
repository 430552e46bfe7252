// Tests of learned weight rounding (reconstruct.h) and the RECONSTRUCT stage:
// the output error it reconstructs falls, the learned weights are what the
// model runs, saves and the recipe states, and the stage runs where the
// widths ask for it.
#include "core/reconstruct.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/export.h"
#include "core/model.h"
#include "core/pipeline.h"
#include "core/quantized_model.h"
#include "core/stages/reconstruct.h"
#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::HasSubstr;

class ReconstructTest : public ::testing::Test {
 protected:
  void SetUp() override { at::set_num_threads(1); }

  // `file`'s model quantized at `wbits`/`abits`, calibrated on N(0, 1).
  std::unique_ptr<QuantizedModel> Quantized(const Model& model,
                                            std::vector<int64_t> shape, int wbits,
                                            int abits) {
    torch::manual_seed(0);
    calibration_ = {torch::randn(shape)};
    QuantOptions q;
    q.weight_bits = wbits;
    q.activation_bits = abits;
    absl::StatusOr<std::unique_ptr<QuantizedModel>> out =
        QuantizedModel::Create(model, q, calibration_);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? std::move(*out) : nullptr;
  }

  static ReconstructOptions Options(ReconstructMethod method, int iterations) {
    ReconstructOptions r;
    r.method = method;
    r.iterations = iterations;
    return r;
  }

  std::vector<torch::Tensor> calibration_;
};

double Sum(const ReconstructResult& r, bool after) {
  double s = 0;
  for (const ReconstructProgress& p : r.layers) s += after ? p.loss_after : p.loss_before;
  return s;
}

TEST_F(ReconstructTest, BlocksFollowTheResidualBlocksAndLowerTheirError) {
  std::unique_ptr<Model> model = LoadTestModel("mini_resnet.pt");
  std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 3, 32, 32}, 3, 4);
  ASSERT_NE(q, nullptr);
  std::vector<ReconstructProgress> events;
  absl::StatusOr<ReconstructResult> r =
      Reconstruct(*model, q.get(), calibration_, Options(ReconstructMethod::kBlock, 150),
                  [&](const ReconstructProgress& p) { events.push_back(p); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->method, "block");
  ASSERT_EQ(events.size(), r->layers.size());
  // Fewer blocks than layers: residual blocks (conv, conv, shortcut) learn
  // together, named by their first and last layer.
  EXPECT_LT(r->layers.size(), q->layers().size());
  int multi = 0;
  for (size_t k = 0; k < events.size(); ++k) {
    EXPECT_EQ(events[k].layer, static_cast<int>(k + 1));
    EXPECT_EQ(events[k].layers, static_cast<int>(events.size()));
    EXPECT_LE(events[k].loss_after, events[k].loss_before) << events[k].name;
    multi += events[k].name.find(" .. ") != std::string::npos;
  }
  EXPECT_GE(multi, 1);
  EXPECT_LT(Sum(*r, true), 0.9 * Sum(*r, false));
  int learned = 0;
  for (const LayerQuantInfo& l : q->layers()) {
    if (!l.learned_q.defined()) continue;
    ++learned;
    EXPECT_EQ(l.rounding, "block");
    EXPECT_GE(l.learned_q.min().item<int>(), -4);
    EXPECT_LE(l.learned_q.max().item<int>(), 3);
  }
  EXPECT_GT(learned, 0);
}

// Learning the activation quantizers' steps with the rounding moves some of
// them, the graph runs the new steps (sites() states them), and the blocks
// reconstruct their (quantized) outputs better than with the steps held at
// their calibrated values.
TEST_F(ReconstructTest, BlocksLearnTheActivationSteps) {
  std::unique_ptr<Model> model = LoadTestModel("mini_resnet.pt");
  double after[2];
  for (int learn : {0, 1}) {
    std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 3, 32, 32}, 4, 3);
    ASSERT_NE(q, nullptr);
    const std::vector<ActivationSiteInfo> before = q->sites();
    ReconstructOptions o = Options(ReconstructMethod::kBlock, 150);
    // Both compare the blocks' outputs after their closing quantizers.
    o.activation_lr = learn ? 1e-2 : 1e-12;
    absl::StatusOr<ReconstructResult> r = Reconstruct(*model, q.get(), calibration_, o);
    ASSERT_TRUE(r.ok()) << r.status();
    after[learn] = Sum(*r, true);
    int moved = 0;
    ASSERT_EQ(q->sites().size(), before.size());
    for (size_t i = 0; i < before.size(); ++i) {
      const ActivationQuantization& a = before[i].quant;
      const ActivationQuantization& b = q->sites()[i].quant;
      EXPECT_EQ(a.zero_point, b.zero_point);
      torch::jit::Node* mul = q->site_node(i);
      ASSERT_NE(mul, nullptr);
      EXPECT_DOUBLE_EQ(torch::jit::toIValue(mul->input(1))->toDouble(), b.scale);
      if (std::abs(b.scale / a.scale - 1) < 1e-3) continue;
      ++moved;
      // The range stretches with the step: the same integer grid.
      EXPECT_NEAR(b.hi - b.lo, (a.hi - a.lo) * a.scale / b.scale, 1e-4 * (a.hi - a.lo));
    }
    if (learn) {
      EXPECT_GT(moved, 0);
    } else {
      EXPECT_EQ(moved, 0);
    }
  }
  EXPECT_LT(after[1], after[0]);
}

// SetActivationScale changes what the model runs; the calibrated scale
// restores it.
TEST_F(ReconstructTest, ActivationScaleIsWhatTheGraphRuns) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  const torch::Tensor x = torch::randn({4, 1, 28, 28});
  std::vector<torch::Tensor> out;
  for (double factor : {1.0, 0.5}) {
    std::unique_ptr<QuantizedModel> q = Quantized(*model, {8, 1, 28, 28}, 8, 4);
    ASSERT_NE(q, nullptr);
    ASSERT_FALSE(q->sites().empty());
    const double scale = q->sites()[0].quant.scale;
    EXPECT_EQ(q->SetActivationScale(0, -1).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(q->SetActivationScale(q->sites().size(), 1).code(),
              absl::StatusCode::kInvalidArgument);
    ASSERT_TRUE(q->SetActivationScale(0, scale * factor).ok());
    EXPECT_DOUBLE_EQ(q->sites()[0].quant.scale, scale * factor);
    absl::StatusOr<std::vector<torch::Tensor>> y = q->Forward(x);
    ASSERT_TRUE(y.ok());
    out.push_back((*y)[0]);
    EXPECT_EQ(q->SetActivationScale(0, scale).code(), absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_FALSE(torch::allclose(out[0], out[1]));
}

// Blocks whose narrowest weight width is at most low_width_bits take
// low_width_iterations (here: as few as 1 step) instead of iterations.
TEST_F(ReconstructTest, LowWidthsTakeTheirOwnSteps) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  auto run = [&](int iterations, int low_bits) {
    std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 1, 28, 28}, 3, 8);
    EXPECT_NE(q, nullptr);
    ReconstructOptions o = Options(ReconstructMethod::kBlock, iterations);
    o.low_width_bits = low_bits;
    o.low_width_iterations = 1;
    o.low_width_lr = 1e-3;
    absl::StatusOr<ReconstructResult> r = Reconstruct(*model, q.get(), calibration_, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? Sum(*r, true) : 0.0;
  };
  const double long_run = run(100, 2);
  EXPECT_EQ(run(100, 3), run(1, 3));
  EXPECT_NE(run(100, 3), long_run);
  EXPECT_LT(long_run, run(100, 3));
}

// Judged on held-out samples, and every check_every steps: the best judged
// rounding is kept, so the first block (whose input does not depend on
// earlier choices) ends no worse than with the last rounding.
TEST_F(ReconstructTest, HeldOutSamplesJudgeTheRounding) {
  std::unique_ptr<Model> model = LoadTestModel("mini_resnet.pt");
  double first[2];
  for (int check : {0, 1}) {
    std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 3, 32, 32}, 2, 8);
    ASSERT_NE(q, nullptr);
    ReconstructOptions o = Options(ReconstructMethod::kBlock, 100);
    o.holdout = 0.25;
    o.check_every = check ? 10 : 0;
    absl::StatusOr<ReconstructResult> r = Reconstruct(*model, q.get(), calibration_, o);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_FALSE(r->layers.empty());
    for (const ReconstructProgress& p : r->layers) EXPECT_LE(p.loss_after, p.loss_before);
    first[check] = r->layers[0].loss_after;
  }
  EXPECT_LE(first[1], first[0]);
  ReconstructOptions bad = Options(ReconstructMethod::kBlock, 10);
  for (double h : {-0.1, 1.0}) {
    bad.holdout = h;
    EXPECT_FALSE(ValidateReconstructOptions(bad).ok()) << h;
  }
}

// Weighting the block outputs by the float model's loss gradient changes
// what the blocks learn, and each still ends no worse than round to nearest
// by the (weighted) error it is judged on.
TEST_F(ReconstructTest, FisherWeightingChangesTheLearnedRounding) {
  std::unique_ptr<Model> model = LoadTestModel("mini_resnet.pt");
  std::vector<std::vector<torch::Tensor>> learned(2);
  for (int fisher : {0, 1}) {
    std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 3, 32, 32}, 2, 8);
    ASSERT_NE(q, nullptr);
    ReconstructOptions o = Options(ReconstructMethod::kBlock, 100);
    o.fisher_bits = fisher ? 2 : 0;
    absl::StatusOr<ReconstructResult> r = Reconstruct(*model, q.get(), calibration_, o);
    ASSERT_TRUE(r.ok()) << r.status();
    for (const ReconstructProgress& p : r->layers) EXPECT_LE(p.loss_after, p.loss_before);
    for (const LayerQuantInfo& l : q->layers()) learned[fisher].push_back(l.learned_q);
  }
  int differ = 0;
  for (size_t i = 0; i < learned[0].size(); ++i) {
    const torch::Tensor& a = learned[0][i];
    const torch::Tensor& b = learned[1][i];
    differ += a.defined() != b.defined() || (a.defined() && !torch::equal(a, b));
  }
  EXPECT_GT(differ, 0);
}

// The weighting is for blocks whose every layer is that narrow: one residual
// block quantized (the layers before it float, so it is the first block
// learned) learns the same rounding with and without it when one of its
// layers is at 4 bits, and not when all are at 2.
TEST_F(ReconstructTest, OnlyBlocksNarrowThroughoutAreFisherWeighted) {
  std::unique_ptr<Model> model = LoadTestModel("mini_resnet.pt");
  for (int shortcut_bits : {4, 2}) {
    std::vector<std::vector<torch::Tensor>> learned(2);
    for (int fisher : {0, 1}) {
      torch::manual_seed(0);
      calibration_ = {torch::randn({16, 3, 32, 32})};
      QuantOptions qo;
      qo.weight_bits = 0;
      qo.activation_bits = 8;
      qo.layer_bits = {{"layer2.0.conv1", 2},
                       {"layer2.0.conv2", 2},
                       {"layer2.0.downsample.0", shortcut_bits}};
      absl::StatusOr<std::unique_ptr<QuantizedModel>> q =
          QuantizedModel::Create(*model, qo, calibration_);
      ASSERT_TRUE(q.ok()) << q.status();
      ReconstructOptions o = Options(ReconstructMethod::kBlock, 100);
      o.fisher_bits = fisher ? 2 : 0;
      absl::StatusOr<ReconstructResult> r = Reconstruct(*model, q->get(), calibration_, o);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->layers.size(), 1u);
      for (const LayerQuantInfo& l : (*q)->layers()) {
        if (l.bits > 0) {
          ASSERT_TRUE(l.learned_q.defined()) << l.name;
          learned[fisher].push_back(l.learned_q);
        }
      }
    }
    ASSERT_EQ(learned[0].size(), 3u);
    ASSERT_EQ(learned[1].size(), 3u);
    bool same = true;
    for (size_t i = 0; i < 3; ++i) same &= torch::equal(learned[0][i], learned[1][i]);
    EXPECT_EQ(same, shortcut_bits == 4) << "shortcut at " << shortcut_bits << " bits";
  }
}

TEST_F(ReconstructTest, AdaRoundLowersEachLayersError) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 1, 28, 28}, 3, 8);
  ASSERT_NE(q, nullptr);
  absl::StatusOr<ReconstructResult> r = Reconstruct(
      *model, q.get(), calibration_, Options(ReconstructMethod::kAdaRound, 150));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->method, "adaround");
  ASSERT_EQ(r->layers.size(), q->layers().size());
  for (size_t i = 0; i < r->layers.size(); ++i) {
    EXPECT_EQ(r->layers[i].name, q->layers()[i].name);
    EXPECT_LE(r->layers[i].loss_after, r->layers[i].loss_before) << r->layers[i].name;
  }
  EXPECT_LT(Sum(*r, true), 0.9 * Sum(*r, false));
}

// The learned integer weights, the recipe's q and the weights the saved
// model runs with are one and the same.
TEST_F(ReconstructTest, SavedModelAndRecipeHoldTheLearnedWeights) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  std::unique_ptr<QuantizedModel> q = Quantized(*model, {16, 1, 28, 28}, 3, 8);
  ASSERT_NE(q, nullptr);
  ASSERT_TRUE(Reconstruct(*model, q.get(), calibration_,
                          Options(ReconstructMethod::kBlock, 100))
                  .ok());
  TempDir dir;
  const std::string path = dir.path() + "/model.pt";
  ASSERT_TRUE(q->Save(path).ok());
  const nlohmann::json recipe = nlohmann::json::parse(RecipeJson(*model, *q, {{1, 28, 28}, "test"}));
  int checked = 0;
  for (size_t i = 0; i < q->layers().size(); ++i) {
    const LayerQuantInfo& l = q->layers()[i];
    const nlohmann::json& e = recipe["layers"][i];
    EXPECT_EQ(e["rounding"], l.rounding);
    if (!l.learned_q.defined()) {
      EXPECT_FALSE(e.contains("q"));
      continue;
    }
    ++checked;
    std::vector<float> qv = e["q"].get<std::vector<float>>();
    const torch::Tensor rq = torch::tensor(qv).reshape(l.learned_q.sizes());
    std::vector<int64_t> view(rq.dim(), 1);
    view[0] = -1;
    const torch::Tensor scale = torch::tensor(e["scale"].get<std::vector<float>>()).view(view);
    const torch::Tensor zp = torch::tensor(e["zero_point"].get<std::vector<float>>()).view(view);
    const torch::Tensor w = torch::jit::toIValue(q->layer_node(i)->input(1))->toTensor();
    EXPECT_TRUE(torch::allclose((rq + zp) / scale, w, 1e-5, 1e-6)) << l.name;
  }
  EXPECT_GT(checked, 0);
  torch::jit::Module loaded = torch::jit::load(path);
  const torch::Tensor x = torch::randn({4, 1, 28, 28});
  absl::StatusOr<std::vector<torch::Tensor>> ours = q->Forward(x);
  ASSERT_TRUE(ours.ok());
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(loaded.forward({x}).toTensor(), (*ours)[0], 1e-5, 1e-5));
  // Weights are settled once the model has run.
  const torch::Tensor w = torch::jit::toIValue(q->layer_node(0)->input(1))->toTensor();
  EXPECT_EQ(q->SetLearnedWeight(0, w, q->layers()[0].learned_q.defined()
                                          ? q->layers()[0].learned_q
                                          : torch::zeros_like(w, torch::kInt),
                                q->layers()[0].scale, q->layers()[0].zero_point, "x")
                .code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ReconstructTest, ChecksOptionsAndCancels) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  std::unique_ptr<QuantizedModel> q = Quantized(*model, {8, 1, 28, 28}, 4, 8);
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(Reconstruct(*model, q.get(), calibration_, Options(ReconstructMethod::kBlock, 0))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Reconstruct(*model, q.get(), calibration_,
                        Options(static_cast<ReconstructMethod>(9), 10))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Reconstruct(*model, q.get(), {}, Options(ReconstructMethod::kBlock, 10))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  CancellationToken cancel;
  cancel.Cancel();
  absl::StatusOr<ReconstructResult> r = Reconstruct(
      *model, q.get(), calibration_, Options(ReconstructMethod::kBlock, 10), {}, &cancel);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  // kNone leaves the model as it was.
  absl::StatusOr<ReconstructResult> none =
      Reconstruct(*model, q.get(), calibration_, Options(ReconstructMethod::kNone, 10));
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->layers.empty());
  for (const LayerQuantInfo& l : q->layers()) EXPECT_EQ(l.rounding, "nearest");
}

TEST_F(ReconstructTest, AutoLearnsWhereAWidthIsUnderFiveBits) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  ReconstructOptions automatic;
  automatic.method = ReconstructMethod::kAuto;
  struct Case {
    int wbits, abits;
    ReconstructMethod want;
  };
  for (const Case& c : {Case{8, 8, ReconstructMethod::kNone}, Case{6, 5, ReconstructMethod::kNone},
                        Case{4, 8, ReconstructMethod::kBlock}, Case{8, 4, ReconstructMethod::kBlock},
                        Case{8, 0, ReconstructMethod::kNone}}) {
    std::unique_ptr<QuantizedModel> q = Quantized(*model, {4, 1, 28, 28}, c.wbits, c.abits);
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(ResolvedReconstructMethod(automatic, *q), c.want) << c.wbits << "/" << c.abits;
    ReconstructOptions fixed;
    fixed.method = ReconstructMethod::kAdaRound;
    EXPECT_EQ(ResolvedReconstructMethod(fixed, *q), ReconstructMethod::kAdaRound);
  }
}

// The whole job: RECONSTRUCT runs between CALIBRATE and EXPORT at 4 bits
// (default: auto), reports each block, and is left out at 8 bits.
TEST_F(ReconstructTest, JobRunsTheStageWhereItApplies) {
  for (int bits : {4, 8}) {
    TempDir dir;
    JobSpec spec;
    spec.model_path = ModelPath("fashion_cnn.pt");
    spec.input_shape = {1, 28, 28};
    spec.output_dir = dir.path();
    spec.threads = 1;
    spec.distill.iterations = 20;
    spec.distill.batch_size = 8;
    spec.quant.weight_bits = bits;
    spec.quant.activation_bits = bits;
    spec.reconstruct.iterations = 30;
    std::vector<ProgressEvent> events;
    absl::StatusOr<JobResult> r =
        RunJob(spec, [&](const ProgressEvent& e) { events.push_back(e); });
    ASSERT_TRUE(r.ok()) << r.status();
    std::vector<Stage> stages;
    for (const auto& [stage, s] : r->stage_seconds) stages.push_back(stage);
    std::ifstream in(r->report_artifact);
    std::stringstream text;
    text << in.rdbuf();
    const nlohmann::json report = nlohmann::json::parse(text.str());
    if (bits == 8) {
      EXPECT_THAT(stages, ::testing::Not(::testing::Contains(Stage::kReconstruct)));
      EXPECT_EQ(report["reconstruction"]["method"], "none");
      continue;
    }
    EXPECT_THAT(stages, ::testing::ElementsAre(Stage::kInspect, Stage::kDistill,
                                               Stage::kCalibrate, Stage::kReconstruct,
                                               Stage::kExport));
    EXPECT_EQ(r->reconstruction, "block");
    EXPECT_EQ(r->reconstruction_iterations, 30);
    ASSERT_FALSE(r->reconstructed.empty());
    int steps = 0;
    for (const ProgressEvent& e : events) {
      if (e.stage != Stage::kReconstruct || e.step == 0) continue;
      ++steps;
      EXPECT_EQ(e.total, static_cast<int64_t>(r->reconstructed.size()));
      EXPECT_THAT(e.message, HasSubstr("output error"));
    }
    EXPECT_EQ(steps, static_cast<int>(r->reconstructed.size()));
    EXPECT_EQ(report["reconstruction"]["method"], "block");
    EXPECT_EQ(report["reconstruction"]["units"].size(), r->reconstructed.size());
    EXPECT_THAT(FormatSummary(*r), HasSubstr("reconstruction: block"));
  }
}

}  // namespace
}  // namespace zeroq::core
