// Tests of RunJob, the whole ZeroQ job: artifacts, the result, progress
// events, cancellation, error codes and the calibration sources.
#include "core/pipeline.h"

#include <ATen/Parallel.h>
#include <stdlib.h>  // mkdtemp

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/cancellation.h"
#include "core/export.h"
#include "core/model.h"
#include "core/outputs.h"
#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;



std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

class PipelineTest : public ::testing::Test {
 protected:
  // One intra-op thread: the models are tiny, and OpenMP threads that spin
  // at barriers slow down by orders of magnitude when other processes (a
  // parallel build) share the cores.
  void SetUp() override {
    at::set_num_threads(1);
    ASSERT_FALSE(dir_.path().empty());
  }

  // fashion_cnn, few iterations, a small batch.
  JobSpec FashionSpec() const {
    JobSpec spec;
    spec.model_path = ModelPath("fashion_cnn.pt");
    spec.input_shape = {1, 28, 28};
    spec.distill.iterations = 50;
    spec.distill.batch_size = 16;
    spec.output_dir = dir_.path();
    spec.threads = 1;
    spec.device = TestDevice();
    return spec;
  }

  TempDir dir_;
};

TEST_F(PipelineTest, FashionEndToEnd) {
  std::vector<ProgressEvent> events;
  absl::StatusOr<JobResult> r = RunJob(
      FashionSpec(), [&](const ProgressEvent& e) { events.push_back(e); });
  ASSERT_TRUE(r.ok()) << r.status();

  // Artifacts, and nothing else (no temporary files left behind).
  EXPECT_THAT(dir_.Files(),
              UnorderedElementsAre("model.zeroq.pt", "recipe.json",
                                   "distilled.pt", "report.json"));
  EXPECT_EQ(r->model_artifact, dir_.path() + "/model.zeroq.pt");
  EXPECT_EQ(r->recipe_artifact, dir_.path() + "/recipe.json");
  EXPECT_EQ(r->data_artifact, dir_.path() + "/distilled.pt");
  EXPECT_EQ(r->report_artifact, dir_.path() + "/report.json");

  // The result.
  ASSERT_EQ(r->layers.size(), 6u);
  std::vector<std::string> names;
  for (const LayerReport& l : r->layers) {
    names.push_back(l.name);
    EXPECT_EQ(l.bits, 8) << l.name;
    EXPECT_GT(l.params, 0);
  }
  EXPECT_THAT(names, ElementsAre("stem.0", "down1.0", "block.conv1",
                                 "block.conv2", "down2.0", "fc"));
  EXPECT_EQ(r->layers[0].bn, "stem.1");
  EXPECT_EQ(r->layers[5].bn, "");
  EXPECT_EQ(r->layers[5].op, "aten::linear");
  EXPECT_EQ(r->bn_layers, 5);
  EXPECT_EQ(r->quantizable_params, 42256);
  EXPECT_DOUBLE_EQ(r->float_weight_bytes, 42256 * 4.0);
  EXPECT_DOUBLE_EQ(r->weight_bytes, 42256.0);
  ASSERT_EQ(r->activations.size(), 5u);
  for (const ActivationReport& a : r->activations) {
    EXPECT_EQ(a.bits, 8);
    EXPECT_LE(a.min, a.max);
  }
  EXPECT_LT(r->distill_final_loss, r->distill_initial_loss);
  EXPECT_EQ(r->distill_tv_weight, DistillOptions().tv_weight);
  EXPECT_EQ(r->samples, 16);
  RecordProperty("top1_agreement", std::to_string(r->top1_agreement));
  EXPECT_GE(r->top1_agreement, 0.8);
  EXPECT_LE(r->top1_agreement, 1.0);
  EXPECT_TRUE(std::isfinite(r->mean_kl));
  EXPECT_GE(r->mean_kl, -1e-6);
  EXPECT_EQ(r->threads, 1);
  EXPECT_EQ(r->device, TestDevice());
  EXPECT_EQ(r->calibration, "distilled");
  std::vector<Stage> stages;
  for (const auto& [stage, seconds] : r->stage_seconds) {
    stages.push_back(stage);
    EXPECT_GE(seconds, 0.0) << StageName(stage);
  }
  EXPECT_THAT(stages, ElementsAre(Stage::kInspect, Stage::kDistill,
                                  Stage::kCalibrate, Stage::kExport));

  // Progress: stages in order, distillation step by step.
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().stage, Stage::kInspect);
  EXPECT_EQ(events.back().stage, Stage::kExport);
  int distill = 0, calibrate = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const ProgressEvent& e = events[i];
    if (i > 0) {
      EXPECT_GE(static_cast<int>(e.stage),
                static_cast<int>(events[i - 1].stage))
          << "event " << i;
      if (e.stage == events[i - 1].stage) EXPECT_GE(e.step, events[i - 1].step);
    }
    EXPECT_LE(e.step, e.total) << StageName(e.stage);
    if (e.stage == Stage::kDistill) {
      ++distill;
      EXPECT_EQ(e.step, distill);
      EXPECT_EQ(e.total, 50);
      EXPECT_TRUE(std::isfinite(e.loss));
      EXPECT_TRUE(std::isfinite(e.lr));
    } else {
      EXPECT_TRUE(std::isnan(e.loss)) << StageName(e.stage);
    }
    if (e.stage == Stage::kCalibrate) {
      ++calibrate;
      EXPECT_EQ(e.total, 5);
      EXPECT_FALSE(e.message.empty());
    }
  }
  EXPECT_EQ(distill, 50);
  EXPECT_EQ(calibrate, 5);

  // The artifacts are what they say.
  absl::StatusOr<torch::Tensor> data = LoadTensor(r->data_artifact);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_THAT(data->sizes().vec(), ElementsAre(16, 1, 28, 28));
  torch::jit::Module q = torch::jit::load(r->model_artifact);
  torch::NoGradGuard no_grad;
  torch::Tensor out = q.forward({*data}).toTensor();
  EXPECT_THAT(out.sizes().vec(), ElementsAre(16, 10));

  nlohmann::json recipe =
      nlohmann::json::parse(ReadFile(r->recipe_artifact), nullptr, false);
  ASSERT_FALSE(recipe.is_discarded());
  EXPECT_EQ(recipe["layers"].size(), 6u);
  EXPECT_EQ(recipe["activations"].size(), 5u);
  EXPECT_EQ(recipe["calibration"], "distilled");

  nlohmann::json report =
      nlohmann::json::parse(ReadFile(r->report_artifact), nullptr, false);
  ASSERT_FALSE(report.is_discarded());
  EXPECT_EQ(report["layers"].size(), 6u);
  EXPECT_EQ(report["bn_layers"], 5);
  EXPECT_EQ(report["samples"], 16);
  EXPECT_EQ(report["calibration"], "distilled");
  for (const char* stage : {"INSPECT", "DISTILL", "CALIBRATE", "EXPORT"}) {
    EXPECT_TRUE(report["stage_seconds"].contains(stage)) << stage;
  }
  EXPECT_EQ(report["artifacts"]["model"], r->model_artifact);
  EXPECT_DOUBLE_EQ(report["top1_agreement"].get<double>(), r->top1_agreement);
  // ResultJson is what report.json holds, up to the export timing that the
  // report is written before finishing.
  nlohmann::json again = nlohmann::json::parse(ResultJson(*r), nullptr, false);
  ASSERT_FALSE(again.is_discarded());
  EXPECT_EQ(again["layers"], report["layers"]);

  // The summary names every layer and the stages.
  const std::string summary = FormatSummary(*r);
  for (const LayerReport& l : r->layers) {
    EXPECT_THAT(summary, HasSubstr(l.name));
  }
  for (const char* stage : {"INSPECT", "DISTILL", "CALIBRATE", "EXPORT"}) {
    EXPECT_THAT(summary, HasSubstr(stage));
  }
  EXPECT_THAT(summary, HasSubstr("model.zeroq.pt"));
}

TEST_F(PipelineTest, SameSpecSameRecipe) {
  JobSpec spec = FashionSpec();
  spec.distill.iterations = 20;
  absl::StatusOr<JobResult> a = RunJob(spec);
  ASSERT_TRUE(a.ok()) << a.status();
  const std::string recipe_a = ReadFile(a->recipe_artifact);
  const std::string data_a = ReadFile(a->data_artifact);
  TempDir other;
  spec.output_dir = other.path();
  absl::StatusOr<JobResult> b = RunJob(spec);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(ReadFile(b->recipe_artifact), recipe_a);
  EXPECT_EQ(ReadFile(b->data_artifact), data_a);
}

TEST_F(PipelineTest, CancelDuringDistillation) {
  CancellationToken token;
  int distill_events = 0;
  absl::StatusOr<JobResult> r = RunJob(
      FashionSpec(),
      [&](const ProgressEvent& e) {
        if (e.stage == Stage::kDistill && ++distill_events == 10)
          token.Cancel();
        EXPECT_NE(e.stage, Stage::kCalibrate);
        EXPECT_NE(e.stage, Stage::kExport);
      },
      &token);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_LE(distill_events, 11);
  EXPECT_TRUE(dir_.Files().empty());
}

TEST_F(PipelineTest, MissingModelFile) {
  JobSpec spec = FashionSpec();
  spec.model_path = ModelPath("no_such_model.pt");
  absl::StatusOr<JobResult> r = RunJob(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().code(),
              ::testing::AnyOf(absl::StatusCode::kInvalidArgument,
                               absl::StatusCode::kNotFound))
      << r.status();
  EXPECT_TRUE(dir_.Files().empty());
}

TEST_F(PipelineTest, WrongInputShapeIsInvalidArgument) {
  JobSpec spec = FashionSpec();
  spec.input_shape = {3, 28, 28};
  bool distilled = false;
  absl::StatusOr<JobResult> r = RunJob(spec, [&](const ProgressEvent& e) {
    distilled |= e.stage == Stage::kDistill;
  });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("3,28,28"));
  EXPECT_FALSE(distilled);  // rejected while inspecting
}

TEST_F(PipelineTest, ModelWithoutBatchNormIsFailedPrecondition) {
  JobSpec spec = FashionSpec();
  spec.model_path = ModelPath("no_batchnorm.pt");
  spec.input_shape = {3, 8, 8};
  absl::StatusOr<JobResult> r = RunJob(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("BatchNorm"));
}

TEST_F(PipelineTest, MissingRequiredFieldsAreInvalidArgument) {
  JobSpec spec = FashionSpec();
  spec.output_dir = "";
  EXPECT_EQ(RunJob(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec = FashionSpec();
  spec.input_shape = {};
  EXPECT_EQ(RunJob(spec).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PipelineTest, BadQuantOptionsFailBeforeDistillation) {
  for (int which = 0; which < 3; ++which) {
    JobSpec spec = FashionSpec();
    if (which == 0) spec.quant.weight_bits = 9;
    if (which == 1) spec.quant.layer_bits = {{"nope", 4}};
    if (which == 2) spec.quant.activation_bits = 1;
    bool distilled = false;
    absl::StatusOr<JobResult> r = RunJob(spec, [&](const ProgressEvent& e) {
      distilled |= e.stage == Stage::kDistill;
    });
    ASSERT_FALSE(r.ok()) << which;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << which;
    EXPECT_FALSE(distilled) << which;
  }
  JobSpec spec = FashionSpec();
  spec.distill.batch_size = 0;
  EXPECT_EQ(RunJob(spec).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PipelineTest, GaussianCalibration) {
  JobSpec spec = FashionSpec();
  spec.calibration = CalibrationSource::kGaussian;
  spec.distill.num_batches = 2;
  spec.threads = 2;  // cheap job: no distillation
  std::set<Stage> stages;
  absl::StatusOr<JobResult> r =
      RunJob(spec, [&](const ProgressEvent& e) { stages.insert(e.stage); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->calibration, "gaussian");
  EXPECT_EQ(r->threads, 2);
  EXPECT_EQ(at::get_num_threads(), 2);  // RunJob sets the process's count
  EXPECT_EQ(r->samples, 32);
  EXPECT_EQ(stages.count(Stage::kDistill), 0u);
  EXPECT_TRUE(std::isnan(r->distill_initial_loss));
  EXPECT_EQ(r->data_artifact, dir_.path() + "/calibration.pt");
  absl::StatusOr<torch::Tensor> data = LoadTensor(r->data_artifact);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_THAT(data->sizes().vec(), ElementsAre(32, 1, 28, 28));
  EXPECT_NEAR(data->std().item<double>(), 1.0, 0.05);
  for (const auto& [stage, seconds] : r->stage_seconds) {
    EXPECT_NE(stage, Stage::kDistill);
  }
  // report.json has null for the missing distillation losses.
  nlohmann::json report =
      nlohmann::json::parse(ReadFile(r->report_artifact), nullptr, false);
  ASSERT_FALSE(report.is_discarded());
  EXPECT_TRUE(report["distill_final_loss"].is_null());
  EXPECT_TRUE(report["distill_tv_weight"].is_null());
}

TEST_F(PipelineTest, FileCalibration) {
  TempDir inputs;
  const std::string file = inputs.path() + "/real.pt";
  torch::manual_seed(41);
  ASSERT_TRUE(SaveTensor(file, {torch::randn({20, 1, 28, 28})}).ok());
  JobSpec spec = FashionSpec();
  spec.calibration = CalibrationSource::kFile;
  spec.calibration_file = file;
  spec.distill.batch_size = 8;  // 20 samples: batches of 8, 8 and 4
  absl::StatusOr<JobResult> r = RunJob(spec);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->calibration, file);
  EXPECT_EQ(r->samples, 20);
  absl::StatusOr<torch::Tensor> data = LoadTensor(r->data_artifact);
  ASSERT_TRUE(data.ok());
  absl::StatusOr<torch::Tensor> original = LoadTensor(file);
  ASSERT_TRUE(original.ok());
  EXPECT_TRUE(torch::equal(*data, *original));
}

// Real inputs usually come from Python: torch.save of a uint8 image tensor.
TEST_F(PipelineTest, FileCalibrationFromPythonTorchSave) {
  TempDir inputs;
  const std::string file = inputs.path() + "/images.pt";
  const std::string cmd = std::string(ZEROQ_PYTHON) +
                          " -c 'import sys, torch; torch.manual_seed(0); "
                          "torch.save((torch.rand(10, 1, 28, 28) * 255)"
                          ".to(torch.uint8), sys.argv[1])' " +
                          file;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  absl::StatusOr<torch::Tensor> images = LoadTensor(file);
  ASSERT_TRUE(images.ok()) << images.status();
  EXPECT_EQ(images->scalar_type(), torch::kByte);
  EXPECT_THAT(images->sizes().vec(), ElementsAre(10, 1, 28, 28));
  JobSpec spec = FashionSpec();
  spec.calibration = CalibrationSource::kFile;
  spec.calibration_file = file;
  absl::StatusOr<JobResult> r = RunJob(spec);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->samples, 10);
  absl::StatusOr<torch::Tensor> data = LoadTensor(r->data_artifact);
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(data->scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(*data, images->to(torch::kFloat)));
}

TEST_F(PipelineTest, FileCalibrationWithTheWrongShape) {
  TempDir inputs;
  const std::string file = inputs.path() + "/wrong.pt";
  ASSERT_TRUE(SaveTensor(file, {torch::randn({4, 3, 28, 28})}).ok());
  JobSpec spec = FashionSpec();
  spec.calibration = CalibrationSource::kFile;
  spec.calibration_file = file;
  absl::StatusOr<JobResult> r = RunJob(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("4,3,28,28"));

  spec.calibration_file = inputs.path() + "/missing.pt";
  r = RunJob(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);

  // A file that is not a tensor.
  {
    std::ofstream out(inputs.path() + "/junk.pt");
    out << "not a tensor";
  }
  spec.calibration_file = inputs.path() + "/junk.pt";
  r = RunJob(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PipelineTest, OutputDirThatDoesNotExist) {
  JobSpec spec = FashionSpec();
  spec.distill.iterations = 5;
  spec.output_dir = dir_.path() + "/not/there";
  absl::StatusOr<JobResult> r = RunJob(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(dir_.Files().empty());
}

TEST_F(PipelineTest, SeveralDistilledBatches) {
  JobSpec spec = FashionSpec();
  spec.distill.iterations = 10;
  spec.distill.batch_size = 8;
  spec.distill.num_batches = 3;
  std::vector<int64_t> steps;
  absl::StatusOr<JobResult> r = RunJob(spec, [&](const ProgressEvent& e) {
    if (e.stage == Stage::kDistill) {
      steps.push_back(e.step);
      EXPECT_EQ(e.total, 30);
    }
  });
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(steps.size(), 30u);
  for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], int64_t(i) + 1);
  EXPECT_EQ(r->samples, 24);
  absl::StatusOr<torch::Tensor> data = LoadTensor(r->data_artifact);
  ASSERT_TRUE(data.ok());
  EXPECT_THAT(data->sizes().vec(), ElementsAre(24, 1, 28, 28));
}

// With an early stop, a converged batch jumps its step to the end of its
// share: the steps never go back and the last one is the total, which stays
// iterations x num_batches (the most the distillation could have taken).
// The report has the steps taken and the image prior's weight (set off its
// default here).
TEST_F(PipelineTest, EarlyStopProgressEndsAtTheTotal) {
  JobSpec spec = FashionSpec();
  spec.distill.iterations = 200;
  spec.distill.batch_size = 8;
  spec.distill.num_batches = 2;
  spec.distill.tv_weight = 2.5;
  spec.distill.early_stop_window = 5;
  spec.distill.early_stop_tolerance = 0.5;
  std::vector<int64_t> steps;
  std::vector<std::string> messages;
  absl::StatusOr<JobResult> r = RunJob(spec, [&](const ProgressEvent& e) {
    if (e.stage != Stage::kDistill) return;
    steps.push_back(e.step);
    EXPECT_EQ(e.total, 400);
    if (!e.message.empty()) messages.push_back(e.message);
  });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->distill_iterations, 2 * 5);
  EXPECT_LT(r->distill_iterations, 400);
  EXPECT_EQ(static_cast<int64_t>(steps.size()), r->distill_iterations);
  for (size_t i = 1; i < steps.size(); ++i) EXPECT_GT(steps[i], steps[i - 1]);
  ASSERT_FALSE(steps.empty());
  EXPECT_EQ(steps.back(), 400);
  ASSERT_EQ(messages.size(), 2u);
  EXPECT_THAT(messages[0], HasSubstr("converged after"));
  nlohmann::json report = nlohmann::json::parse(ReadFile(r->report_artifact));
  EXPECT_EQ(report["distill_iterations"], r->distill_iterations);
  EXPECT_EQ(report["distill_tv_weight"], 2.5);
  EXPECT_THAT(FormatSummary(*r),
              HasSubstr(absl::StrCat("(", r->distill_iterations,
                                     " iterations), image prior weight 2.5")));
}

TEST_F(PipelineTest, StageNames) {
  EXPECT_STREQ(StageName(Stage::kInspect), "INSPECT");
  EXPECT_STREQ(StageName(Stage::kDistill), "DISTILL");
  EXPECT_STREQ(StageName(Stage::kSensitivity), "SENSITIVITY");
  EXPECT_STREQ(StageName(Stage::kPareto), "PARETO");
  EXPECT_STREQ(StageName(Stage::kCalibrate), "CALIBRATE");
  EXPECT_STREQ(StageName(Stage::kExport), "EXPORT");
}

// InspectModel: what the service shows of an uploaded model.
TEST(PipelineInspect, FashionCnn) {
  absl::StatusOr<ModelInfo> info =
      InspectModel(ModelPath("fashion_cnn.pt"), {1, 28, 28});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->bn_layers.size(), 5u);
  for (const auto& [name, channels] : info->bn_layers) {
    EXPECT_FALSE(name.empty());
    EXPECT_GT(channels, 0) << name;
  }
  std::vector<std::string> names;
  for (const ModelInfo::Layer& l : info->layers) names.push_back(l.name);
  EXPECT_THAT(names, ElementsAre("stem.0", "down1.0", "block.conv1",
                                 "block.conv2", "down2.0", "fc"));
  EXPECT_EQ(info->layers[0].kind, "conv");
  EXPECT_EQ(info->layers[0].bn, "stem.1");
  EXPECT_EQ(info->layers[0].weight_shape.size(), 4u);
  EXPECT_EQ(info->layers[5].kind, "linear");
  EXPECT_EQ(info->layers[5].bn, "");
  EXPECT_EQ(info->quantizable_params, 42256);
  EXPECT_GT(info->total_params, info->quantizable_params);
  EXPECT_THAT(info->output_shape, ElementsAre(1, 10));
}

TEST(PipelineInspect, GarbageFileIsInvalidArgument) {
  TempDir dir;
  const std::string path = dir.path() + "/garbage.pt";
  {
    std::ofstream out(path, std::ios::binary);
    for (int i = 0; i < 4096; ++i) out.put(static_cast<char>((i * 7919) % 251));
  }
  absl::StatusOr<ModelInfo> info = InspectModel(path, {1, 28, 28});
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument)
      << info.status();
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("TorchScript"));
}

TEST(PipelineInspect, MissingFileIsInvalidArgument) {
  absl::StatusOr<ModelInfo> info =
      InspectModel(ModelPath("no_such_model.pt"), {1, 28, 28});
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("no_such_model.pt"));
}

TEST(PipelineInspect, WrongShapeIsInvalidArgument) {
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{3, 28, 28}, {1, 0, 28}, {}}) {
    absl::StatusOr<ModelInfo> info = InspectModel(ModelPath("fashion_cnn.pt"), shape);
    ASSERT_FALSE(info.ok());
    EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument)
        << info.status();
  }
  absl::StatusOr<ModelInfo> info =
      InspectModel(ModelPath("fashion_cnn.pt"), {3, 28, 28});
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("3,28,28"));
}

TEST(PipelineInspect, ForwardWithTwoInputsIsInvalidArgument) {
  absl::StatusOr<ModelInfo> info = InspectModel(ModelPath("two_inputs.pt"), {3, 8, 8});
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(info.status().message()), HasSubstr("one tensor"));
}

// RunJob refuses it (FAILED_PRECONDITION), but it is still inspectable.
TEST(PipelineInspect, ModelWithoutBatchNorm) {
  absl::StatusOr<ModelInfo> info = InspectModel(ModelPath("no_batchnorm.pt"), {3, 8, 8});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->bn_layers.empty());
  ASSERT_EQ(info->layers.size(), 2u);
  EXPECT_EQ(info->layers[0].name, "conv");
  EXPECT_EQ(info->layers[0].kind, "conv");
  EXPECT_THAT(info->layers[0].weight_shape, ElementsAre(4, 3, 3, 3));
  EXPECT_EQ(info->layers[0].params, 108);
  EXPECT_EQ(info->layers[1].name, "fc");
  EXPECT_EQ(info->layers[1].kind, "linear");
  EXPECT_EQ(info->quantizable_params, 108 + 8);
  EXPECT_EQ(info->total_params, 108 + 4 + 8 + 2);
  EXPECT_THAT(info->output_shape, ElementsAre(1, 2));

  absl::StatusOr<ModelInfo> bad = InspectModel(ModelPath("no_batchnorm.pt"), {1, 8, 8});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

// Models whose forward returns a tuple, a NamedTuple with an Optional entry
// left None (as torchvision's GoogLeNetOutputs), or a dict (scripted with
// torch 2.15 by scripts/make_output_models.py): a mixed-precision job
// measures sensitivity on every output tensor, and the export returns the
// same structure as the input model.
class MultiOutputTest : public ::testing::TestWithParam<const char*> {};

TEST_P(MultiOutputTest, QuantizesAndExportsTheSameStructure) {
  at::set_num_threads(1);
  TempDir dir;
  JobSpec spec;
  spec.model_path = ModelPath(std::string(GetParam()) + ".pt");
  spec.input_shape = {1, 16, 16};
  spec.distill.iterations = 10;
  spec.distill.batch_size = 8;
  spec.budget = Budget{Budget::kAverageBits, 4};
  spec.output_dir = dir.path();
  spec.threads = 1;
  spec.device = TestDevice();
  absl::StatusOr<JobResult> r = RunJob(spec, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->layers.size(), 4u);  // conv1, conv2, fc, aux
  // The aux head is only an output: its sensitivity comes from that output
  // alone, so it must be measured (not zero at 2 bits).
  ASSERT_EQ(r->sensitivity.size(), 4u);
  for (const auto& layer : r->sensitivity) {
    ASSERT_FALSE(layer.omega.empty()) << layer.name;
    EXPECT_GT(layer.omega.front(), 0.0) << layer.name << " at 2 bits";
  }
  EXPECT_TRUE(std::isfinite(r->mean_kl));

  torch::jit::Module in = torch::jit::load(spec.model_path);
  torch::jit::Module out = torch::jit::load(r->model_artifact);
  in.eval();
  const torch::Tensor x = torch::randn({3, 1, 16, 16});
  c10::IValue want = in.forward({x}), got = out.forward({x});
  EXPECT_EQ(got.type()->str(), want.type()->str());
  std::ostringstream in_schema, out_schema;
  in_schema << in.get_method("forward").function().getSchema().returns();
  out_schema << out.get_method("forward").function().getSchema().returns();
  EXPECT_EQ(out_schema.str(), in_schema.str());
  const std::vector<torch::Tensor> a = OutputTensors(want), b = OutputTensors(got);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].sizes(), b[i].sizes());
    const double cos = torch::cosine_similarity(a[i].flatten(), b[i].flatten(), 0)
                           .item<double>();
    EXPECT_GT(cos, 0.5) << "output " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Structures, MultiOutputTest,
                         ::testing::Values("tuple_outputs", "namedtuple_outputs",
                                           "dict_outputs"));

}  // namespace
}  // namespace zeroq::core
