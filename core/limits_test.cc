// One config schema: at every edge of every range, SubmitJob's check of a
// QuantizationConfig (the worker runs the same one) and the core's own checks
// (which zeroq-quantize goes through) give the same verdict, and it is the
// verdict of common/config_schema.h. A config the server accepts is never
// refused later for a range reason.
#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/config_schema.h"
#include "core/distill.h"
#include "core/pipeline.h"
#include "core/quantized_model.h"
#include "core/reconstruct.h"
#include "core/test_util.h"
#include "gtest/gtest.h"
#include "proto/config_check.h"

namespace zeroq::core {
namespace {

// How to set one integer field in a QuantizationConfig and in a core JobSpec
// (with a budget, so candidate widths are read).
struct Setter {
  std::function<void(v1::QuantizationConfig&, int64_t)> config;
  std::function<void(JobSpec&, int64_t)> spec;
};

std::map<std::string, Setter> Setters() {
  return {
      {"weight_bits",
       {[](auto& c, int64_t v) { c.set_weight_bits(v); },
        [](JobSpec& s, int64_t v) { s.quant.weight_bits = v; }}},
      {"layer_bits",
       {[](auto& c, int64_t v) { (*c.mutable_layer_bits())["fc"] = v; },
        [](JobSpec& s, int64_t v) { s.quant.layer_bits["fc"] = v; }}},
      {"candidate_bits",
       {[](auto& c, int64_t v) {
          c.set_budget("MP8");  // reached by any single width
          c.add_candidate_bits(v);
        },
        [](JobSpec& s, int64_t v) {
          s.budget = *ParseBudget("MP8");
          s.sensitivity.bits = {static_cast<int>(v)};
        }}},
      {"activation_bits",
       {[](auto& c, int64_t v) { c.set_activation_bits(v); },
        [](JobSpec& s, int64_t v) { s.quant.activation_bits = v; }}},
      {"distillation.batch_size",
       {[](auto& c, int64_t v) { c.mutable_distillation()->set_batch_size(v); },
        [](JobSpec& s, int64_t v) { s.distill.batch_size = v; }}},
      {"distillation.num_batches",
       {[](auto& c, int64_t v) { c.mutable_distillation()->set_num_batches(v); },
        [](JobSpec& s, int64_t v) { s.distill.num_batches = v; }}},
      {"distillation.iterations",
       {[](auto& c, int64_t v) { c.mutable_distillation()->set_iterations(v); },
        [](JobSpec& s, int64_t v) { s.distill.iterations = v; }}},
      {"distillation.early_stop_window",
       {[](auto& c, int64_t v) {
          c.mutable_distillation()->set_early_stop_window(v);
        },
        [](JobSpec& s, int64_t v) { s.distill.early_stop_window = v; }}},
      {"threads",
       {[](auto& c, int64_t v) { c.set_threads(v); },
        [](JobSpec& s, int64_t v) { s.threads = v; }}},
  };
}

TEST(LimitsTest, ServerAndCoreAgreeAtEveryIntegerEdge) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  const std::map<std::string, Setter> setters = Setters();
  for (const IntField* field : kIntFields) {
    auto it = setters.find(field->name);
    ASSERT_NE(it, setters.end()) << "no setter for " << field->name;
    std::vector<int64_t> edges = {field->lo - 1, field->lo, field->hi,
                                  field->hi + 1, -1, 0, 1};
    for (int64_t v : edges) {
      v1::QuantizationConfig config;
      it->second.config(config, v);
      JobSpec spec;
      it->second.spec(spec, v);
      const bool want = field->Contains(v);
      absl::Status server = ValidateQuantizationConfig(config);
      absl::Status core = ValidateJobSpec(*model, spec);
      EXPECT_EQ(server.ok(), want) << field->name << " = " << v << ": " << server;
      EXPECT_EQ(core.ok(), want) << field->name << " = " << v << ": " << core;
      if (!server.ok()) {
        EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
        EXPECT_NE(server.message().find(std::string("config.") + field->name),
                  std::string::npos)
            << server;
      }
    }
  }
}

// The help texts (zeroq-quantize's flags, the zeroq command line) state each
// field's range and default as the schema has them.
TEST(LimitsTest, HelpTextsStateTheRangeAndDefault) {
  for (const IntField* field : kIntFields) {
    const std::string help = field->help;
    EXPECT_NE(help.find(absl::StrCat(field->lo, "..", field->hi)),
              std::string::npos)
        << field->name << ": " << help;
    if (field->zero != nullptr) {
      EXPECT_NE(help.find("(0: "), std::string::npos) << field->name;
    }
    if (field->def != 0 && std::string(field->name) != "layer_bits") {
      EXPECT_NE(help.find(absl::StrCat("default ", field->def)),
                std::string::npos)
          << field->name << ": " << help;
    }
  }
  EXPECT_NE(std::string(kCandidateBits.help).find("default 2,3,4,6,8"),
            std::string::npos);
  for (const RealField* field : kRealFields) {
    const std::string help = field->help;
    EXPECT_NE(help.find(field->Describe()), std::string::npos)
        << field->name << ": " << help << " vs " << field->Describe();
    EXPECT_NE(help.find(absl::StrFormat("default %g", field->def)),
              std::string::npos)
        << field->name << ": " << help;
  }
  // And the core's defaults are the schema's.
  const DistillOptions d;
  const QuantOptions q;
  const SensitivityOptions s;
  EXPECT_EQ(d.batch_size, kBatchSize.def);
  EXPECT_EQ(d.num_batches, kNumBatches.def);
  EXPECT_EQ(d.iterations, kIterations.def);
  EXPECT_EQ(d.lr, kLearningRate.def);
  EXPECT_EQ(q.weight_bits, kWeightBits.def);
  EXPECT_EQ(q.activation_bits, kActivationBits.def);
  EXPECT_EQ(q.activation_percentile, kActivationPercentile.def);
  EXPECT_EQ(s.bits, (std::vector<int>{2, 3, 4, 6, 8}));
}

TEST(LimitsTest, ServerAndCoreAgreeOnPercentileAndLearningRate) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  // activation_percentile 50 once passed SubmitJob and failed in the worker.
  for (double p : {49.9, 50.0, 50.001, 99.9, 100.0, 100.001}) {
    v1::QuantizationConfig config;
    config.set_activation_percentile(p);
    QuantOptions o;
    o.activation_percentile = p;
    const bool want = kActivationPercentile.Contains(p);
    EXPECT_EQ(ValidateQuantizationConfig(config).ok(), want) << p;
    EXPECT_EQ(ValidateQuantOptions(*model, o).ok(), want) << p;
  }
  for (double lr : {-1.0, 0.0, 1e-6, 0.5, 100.0, 100.5}) {
    v1::QuantizationConfig config;
    config.mutable_distillation()->set_lr(lr);
    DistillOptions o;
    o.lr = lr;
    const bool want = kLearningRate.Contains(lr);
    EXPECT_EQ(ValidateQuantizationConfig(config).ok(), want) << lr;
    EXPECT_EQ(ValidateDistillOptions(o).ok(), want) << lr;
  }
}

// The early-stop fields are in the walked tables too; their edges once more
// against the distillation's own check.
TEST(LimitsTest, ServerAndCoreAgreeOnEarlyStop) {
  for (int64_t w : {-1, 0, 1, 150, 100000, 100001}) {
    v1::QuantizationConfig config;
    config.mutable_distillation()->set_early_stop_window(w);
    DistillOptions o;
    o.early_stop_window = w;
    const bool want = kEarlyStopWindow.Contains(w);
    absl::Status server = ValidateQuantizationConfig(config);
    EXPECT_EQ(server.ok(), want) << w << ": " << server;
    EXPECT_EQ(ValidateDistillOptions(o).ok(), want) << w;
    if (!want) {
      EXPECT_NE(server.message().find("config.distillation.early_stop_window"),
                std::string::npos)
          << server;
    }
  }
  for (double t : {-0.1, 0.0, 1e-6, 0.01, 1.0, 1.001}) {
    v1::QuantizationConfig config;
    config.mutable_distillation()->set_early_stop_tolerance(t);
    DistillOptions o;
    o.early_stop_tolerance = t;
    const bool want = kEarlyStopTolerance.Contains(t);
    absl::Status server = ValidateQuantizationConfig(config);
    EXPECT_EQ(server.ok(), want) << t << ": " << server;
    EXPECT_EQ(ValidateDistillOptions(o).ok(), want) << t;
    if (!want) {
      EXPECT_NE(
          server.message().find("config.distillation.early_stop_tolerance"),
          std::string::npos)
          << server;
    }
  }
}

// The image prior's weight: 0 is off, else (0, 1000].
TEST(LimitsTest, ServerAndCoreAgreeOnTheImagePrior) {
  EXPECT_EQ(kTvWeight.Describe(), "0 (off) or (0, 1000]");
  for (double w : {-1.0, -1e-9, 0.0, 1e-9, 10.0, 1000.0, 1000.001,
                   std::nan("")}) {
    v1::QuantizationConfig config;
    config.mutable_distillation()->set_tv_weight(w);
    DistillOptions o;
    o.tv_weight = w;
    const bool want = kTvWeight.Contains(w);
    EXPECT_EQ(want, w == 0 || (w > 0 && w <= 1000)) << w;
    absl::Status server = ValidateQuantizationConfig(config);
    EXPECT_EQ(server.ok(), want) << w << ": " << server;
    EXPECT_EQ(ValidateDistillOptions(o).ok(), want) << w;
    if (!want) {
      EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(server.message().find("config.distillation.tv_weight"),
                std::string::npos)
          << server;
    }
  }
  EXPECT_EQ(DistillOptions().tv_weight, kTvWeight.def);
}

TEST(LimitsTest, ServerAndCoreAgreeOnActivationRange) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  struct Case {
    v1::ActivationRange proto;
    ActivationRange core;
    double percentile;  // 0: unset
    bool want;
  };
  const Case cases[] = {
      {v1::ACTIVATION_RANGE_UNSPECIFIED, ActivationRange::kAuto, 0, true},
      {v1::ACTIVATION_RANGE_UNSPECIFIED, ActivationRange::kAuto, 99.99, true},
      {v1::ACTIVATION_RANGE_MINMAX, ActivationRange::kMinMax, 0, true},
      {v1::ACTIVATION_RANGE_MINMAX, ActivationRange::kMinMax, 100, true},
      {v1::ACTIVATION_RANGE_MINMAX, ActivationRange::kMinMax, 99.99, false},
      {v1::ACTIVATION_RANGE_PERCENTILE, ActivationRange::kPercentile, 0, true},
      {v1::ACTIVATION_RANGE_PERCENTILE, ActivationRange::kPercentile, 99.99,
       true},
      {v1::ACTIVATION_RANGE_PERCENTILE, ActivationRange::kPercentile, 50,
       false},
      {v1::ACTIVATION_RANGE_MSE, ActivationRange::kMse, 0, true},
      {v1::ACTIVATION_RANGE_MSE, ActivationRange::kMse, 99, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(
        absl::StrCat(v1::ActivationRange_Name(c.proto), " ", c.percentile));
    v1::QuantizationConfig config;
    config.set_activation_range(c.proto);
    JobSpec spec;
    spec.quant.activation_range = c.core;
    if (c.percentile > 0) {
      config.set_activation_percentile(c.percentile);
      spec.quant.activation_percentile = c.percentile;
    }
    absl::Status server = ValidateQuantizationConfig(config);
    EXPECT_EQ(server.ok(), c.want) << server;
    EXPECT_EQ(ValidateJobSpec(*model, spec).ok(), c.want);
    if (!server.ok()) {
      EXPECT_NE(server.message().find("config.activation_percentile"),
                std::string::npos)
          << server;
    }
  }
  v1::QuantizationConfig config;
  config.set_activation_range(static_cast<v1::ActivationRange>(4));
  absl::Status server = ValidateQuantizationConfig(config);
  EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(server.message().find("config.activation_range"), std::string::npos)
      << server;
}

// reconstruct and reconstruction.iterations are not in the walked tables
// (config_schema.h says why): their edges are checked here. The core's check
// sees what the worker passes it: 0 (or unset) becomes the default.
TEST(LimitsTest, ServerAndCoreAgreeOnReconstruction) {
  const ReconstructOptions defaults;
  for (int64_t v : {kReconstructIterations.lo - 1, kReconstructIterations.lo,
                    kReconstructIterations.def, kReconstructIterations.hi,
                    kReconstructIterations.hi + 1, int64_t{-1}}) {
    v1::QuantizationConfig config;
    config.mutable_reconstruction()->set_iterations(v);
    ReconstructOptions o;
    o.method = ReconstructMethod::kBlock;
    o.iterations = v == 0 ? defaults.iterations : static_cast<int>(v);
    const bool want = kReconstructIterations.Contains(v);
    absl::Status server = ValidateQuantizationConfig(config);
    EXPECT_EQ(server.ok(), want) << v << ": " << server;
    EXPECT_EQ(ValidateReconstructOptions(o).ok(), want) << v;
    if (!want) {
      EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(server.message().find("config.reconstruction.iterations"),
                std::string::npos)
          << server;
    }
  }
  EXPECT_EQ(defaults.iterations, kReconstructIterations.def);

  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  const struct {
    v1::ReconstructMethod proto;
    ReconstructMethod core;
  } cases[] = {
      {v1::RECONSTRUCT_UNSPECIFIED, kDefaultReconstruct},
      {v1::RECONSTRUCT_NONE, ReconstructMethod::kNone},
      {v1::RECONSTRUCT_ADAROUND, ReconstructMethod::kAdaRound},
      {v1::RECONSTRUCT_BLOCK, ReconstructMethod::kBlock},
      {v1::RECONSTRUCT_AUTO, ReconstructMethod::kAuto},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(v1::ReconstructMethod_Name(c.proto));
    v1::QuantizationConfig config;
    config.set_reconstruct(c.proto);
    JobSpec spec;
    spec.reconstruct.method = c.core;
    absl::Status server = ValidateQuantizationConfig(config);
    EXPECT_TRUE(server.ok()) << server;
    absl::Status core = ValidateJobSpec(*model, spec);
    EXPECT_TRUE(core.ok()) << core;
    // The word of each value is the schema's.
    if (c.proto != v1::RECONSTRUCT_UNSPECIFIED) {
      EXPECT_EQ(v1::ReconstructMethod_Name(c.proto),
                absl::StrCat("RECONSTRUCT_",
                             absl::AsciiStrToUpper(
                                 kReconstruct.choices[c.proto - 1])));
    }
  }
  // The methods the learning runs are valid to the core; an unknown one is
  // refused on both sides.
  for (ReconstructMethod m : {ReconstructMethod::kNone,
                              ReconstructMethod::kAdaRound,
                              ReconstructMethod::kBlock}) {
    ReconstructOptions o;
    o.method = m;
    EXPECT_TRUE(ValidateReconstructOptions(o).ok()) << static_cast<int>(m);
  }
  ReconstructOptions unknown;
  unknown.method = static_cast<ReconstructMethod>(kReconstruct.count + 1);
  EXPECT_FALSE(ValidateReconstructOptions(unknown).ok());
  v1::QuantizationConfig config;
  config.set_reconstruct(
      static_cast<v1::ReconstructMethod>(kReconstruct.count + 1));
  absl::Status server = ValidateQuantizationConfig(config);
  EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(server.message().find("config.reconstruct"), std::string::npos)
      << server;
}

TEST(LimitsTest, ReconstructionHelpAndDefaults) {
  const std::string method = kReconstruct.help;
  for (int i = 0; i < kReconstruct.count; ++i) {
    EXPECT_NE(method.find(kReconstruct.choices[i]), std::string::npos)
        << kReconstruct.choices[i];
  }
  EXPECT_NE(method.find(absl::StrCat(
                "default ", kReconstruct.choices[kReconstruct.def])),
            std::string::npos)
      << method;
  EXPECT_EQ(kReconstruct.Describe(), "none, adaround, block or auto");
  EXPECT_EQ(static_cast<int>(kDefaultReconstruct) - 1, kReconstruct.def);
  EXPECT_EQ(ReconstructOptions().method, kDefaultReconstruct);
  const std::string iterations = kReconstructIterations.help;
  EXPECT_NE(iterations.find(absl::StrCat(kReconstructIterations.lo, "..",
                                         kReconstructIterations.hi)),
            std::string::npos)
      << iterations;
  EXPECT_NE(iterations.find("(0: "), std::string::npos) << iterations;
  EXPECT_NE(iterations.find(absl::StrCat(kReconstructIterations.def)),
            std::string::npos)
      << iterations;
}

TEST(LimitsTest, EarlyStopAndActivationRangeHelpAndDefaults) {
  const std::string window = kEarlyStopWindow.help;
  EXPECT_NE(window.find("1..100000"), std::string::npos) << window;
  EXPECT_NE(window.find("(0: off"), std::string::npos) << window;
  EXPECT_NE(window.find(absl::StrCat("default ", kEarlyStopWindow.def)),
            std::string::npos)
      << window;
  const std::string tolerance = kEarlyStopTolerance.help;
  EXPECT_NE(tolerance.find(kEarlyStopTolerance.Describe()), std::string::npos)
      << tolerance;
  EXPECT_NE(
      tolerance.find(absl::StrFormat("default %g", kEarlyStopTolerance.def)),
      std::string::npos)
      << tolerance;
  const std::string range = kActivationRange.help;
  for (int i = 0; i < kActivationRange.count; ++i) {
    EXPECT_NE(range.find(kActivationRange.choices[i]), std::string::npos)
        << kActivationRange.choices[i];
  }
  EXPECT_NE(range.find(absl::StrCat(
                "default ", kActivationRange.choices[kActivationRange.def])),
            std::string::npos)
      << range;
  EXPECT_EQ(kActivationRange.Describe(), "minmax, percentile or mse");
  EXPECT_EQ(kActivationRange.Find("mse"), 2);
  EXPECT_EQ(kActivationRange.Find("MSE"), -1);
  const DistillOptions d;
  EXPECT_EQ(d.early_stop_window, kEarlyStopWindow.def);
  EXPECT_EQ(d.early_stop_tolerance, kEarlyStopTolerance.def);
  EXPECT_EQ(static_cast<int>(kDefaultActivationRange) - 1,
            kActivationRange.def);
  EXPECT_EQ(QuantOptions().activation_range, ActivationRange::kAuto);
}

}  // namespace
}  // namespace zeroq::core
