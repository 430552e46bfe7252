// Tests of the worker's conversion from a RunRequest to the core's JobSpec:
// fields set in a QuantizationConfig, sent over the wire, arrive in the core's
// options, and unset fields keep the core's defaults.
#include "core/worker/convert.h"

#include <optional>
#include <string>

#include "common/config_schema.h"
#include "core/options.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::worker {
namespace {

v1::RunRequest Request() {
  v1::RunRequest r;
  r.set_model_path("m.pt");
  r.add_input_shape(1);
  r.add_input_shape(28);
  r.add_input_shape(28);
  r.set_output_dir("/tmp");
  return r;
}

// Serialised and parsed again, as between server and worker.
v1::RunRequest OverTheWire(const v1::RunRequest& r) {
  v1::RunRequest back;
  EXPECT_TRUE(back.ParseFromString(r.SerializeAsString()));
  return back;
}

TEST(ConvertTest, ActivationRangeRoundTrips) {
  const struct {
    v1::ActivationRange proto;
    core::ActivationRange core;
  } cases[] = {
      {v1::ACTIVATION_RANGE_UNSPECIFIED, core::ActivationRange::kAuto},
      {v1::ACTIVATION_RANGE_MINMAX, core::ActivationRange::kMinMax},
      {v1::ACTIVATION_RANGE_PERCENTILE, core::ActivationRange::kPercentile},
      {v1::ACTIVATION_RANGE_MSE, core::ActivationRange::kMse},
  };
  for (const auto& c : cases) {
    v1::RunRequest r = Request();
    r.mutable_config()->set_activation_range(c.proto);
    absl::StatusOr<core::JobSpec> spec = JobSpecFromRunRequest(OverTheWire(r));
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->quant.activation_range, c.core)
        << v1::ActivationRange_Name(c.proto);
    EXPECT_EQ(spec->quant.activation_percentile, 100.0);
  }
  v1::RunRequest r = Request();
  r.mutable_config()->set_activation_range(v1::ACTIVATION_RANGE_PERCENTILE);
  r.mutable_config()->set_activation_percentile(99.99);
  absl::StatusOr<core::JobSpec> spec = JobSpecFromRunRequest(OverTheWire(r));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->quant.activation_range, core::ActivationRange::kPercentile);
  EXPECT_EQ(spec->quant.activation_percentile, 99.99);
}

TEST(ConvertTest, BadActivationRangeIsInvalidArgument) {
  v1::RunRequest r = Request();
  r.mutable_config()->set_activation_range(static_cast<v1::ActivationRange>(9));
  absl::Status s = JobSpecFromRunRequest(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("config.activation_range"), std::string::npos)
      << s;
  r = Request();
  r.mutable_config()->set_activation_range(v1::ACTIVATION_RANGE_MSE);
  r.mutable_config()->set_activation_percentile(99.0);
  s = JobSpecFromRunRequest(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("config.activation_percentile"), std::string::npos)
      << s;
}

TEST(ConvertTest, EarlyStopRoundTripsAndDefaultsToTheCores) {
  v1::RunRequest r = Request();
  absl::StatusOr<core::JobSpec> unset = JobSpecFromRunRequest(OverTheWire(r));
  ASSERT_TRUE(unset.ok()) << unset.status();
  const core::DistillOptions defaults;
  EXPECT_EQ(unset->distill.early_stop_window, defaults.early_stop_window);
  EXPECT_EQ(unset->distill.early_stop_tolerance, defaults.early_stop_tolerance);
  EXPECT_EQ(unset->distill.tv_weight, 0.0);  // an eight-bit job

  r.mutable_config()->mutable_distillation()->set_early_stop_window(150);
  r.mutable_config()->mutable_distillation()->set_early_stop_tolerance(0.02);
  r.mutable_config()->mutable_distillation()->set_tv_weight(2.5);
  absl::StatusOr<core::JobSpec> set = JobSpecFromRunRequest(OverTheWire(r));
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->distill.early_stop_window, 150);
  EXPECT_EQ(set->distill.early_stop_tolerance, 0.02);
  EXPECT_EQ(set->distill.tv_weight, 2.5);

  r.mutable_config()->mutable_distillation()->set_early_stop_window(0);  // off
  r.mutable_config()->mutable_distillation()->set_tv_weight(0);          // off
  set = JobSpecFromRunRequest(OverTheWire(r));
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->distill.early_stop_window, 0);
  EXPECT_EQ(set->distill.tv_weight, 0);
}

// Unset iterations and image prior take the default for the job's widths:
// 200 and 0 (off) where every width is 8 bits or more, 500 and 10
// otherwise; a set value always holds.
TEST(ConvertTest, UnsetIterationsDependOnTheWidths) {
  auto iterations = [](const v1::RunRequest& r) {
    absl::StatusOr<core::JobSpec> spec = JobSpecFromRunRequest(OverTheWire(r));
    EXPECT_TRUE(spec.ok()) << spec.status();
    return spec.ok() ? spec->distill.iterations : -1;
  };
  auto tv = [](const v1::RunRequest& r) {
    absl::StatusOr<core::JobSpec> spec = JobSpecFromRunRequest(OverTheWire(r));
    EXPECT_TRUE(spec.ok()) << spec.status();
    return spec.ok() ? spec->distill.tv_weight : -1.0;
  };
  v1::RunRequest w8a8 = Request();
  EXPECT_EQ(iterations(w8a8), kEightBitIterations);
  EXPECT_EQ(tv(w8a8), 0.0);
  v1::RunRequest w4 = Request();
  w4.mutable_config()->set_weight_bits(4);
  EXPECT_EQ(iterations(w4), kIterations.def);
  EXPECT_EQ(tv(w4), kTvWeight.def);
  v1::RunRequest a4 = Request();
  a4.mutable_config()->set_activation_bits(4);
  EXPECT_EQ(iterations(a4), kIterations.def);
  EXPECT_EQ(tv(a4), kTvWeight.def);
  v1::RunRequest a16 = Request();
  a16.mutable_config()->set_activation_bits(16);
  EXPECT_EQ(iterations(a16), kEightBitIterations);
  EXPECT_EQ(tv(a16), 0.0);
  v1::RunRequest layer = Request();
  (*layer.mutable_config()->mutable_layer_bits())["fc"] = 2;
  EXPECT_EQ(iterations(layer), kIterations.def);
  EXPECT_EQ(tv(layer), kTvWeight.def);
  v1::RunRequest mp = Request();
  mp.mutable_config()->set_budget("MP8");
  EXPECT_EQ(iterations(mp), kIterations.def);
  EXPECT_EQ(tv(mp), kTvWeight.def);
  v1::RunRequest block = Request();
  block.mutable_config()->set_reconstruct(v1::RECONSTRUCT_BLOCK);
  EXPECT_EQ(iterations(block), kIterations.def);
  EXPECT_EQ(tv(block), kTvWeight.def);
  v1::RunRequest set = Request();
  set.mutable_config()->mutable_distillation()->set_iterations(500);
  EXPECT_EQ(iterations(set), 500);
  set.mutable_config()->mutable_distillation()->set_iterations(0);
  EXPECT_EQ(iterations(set), 0);
  set.mutable_config()->mutable_distillation()->set_tv_weight(2.5);
  EXPECT_EQ(tv(set), 2.5);  // an eight-bit job
  v1::RunRequest off = Request();
  off.mutable_config()->set_weight_bits(4);
  off.mutable_config()->mutable_distillation()->set_tv_weight(0);
  EXPECT_EQ(tv(off), 0.0);
}

TEST(ConvertTest, ReconstructRoundTripsAndDefaultsToTheCores) {
  const struct {
    v1::ReconstructMethod proto;
    core::ReconstructMethod core;
  } cases[] = {
      {v1::RECONSTRUCT_UNSPECIFIED, core::kDefaultReconstruct},
      {v1::RECONSTRUCT_NONE, core::ReconstructMethod::kNone},
      {v1::RECONSTRUCT_ADAROUND, core::ReconstructMethod::kAdaRound},
      {v1::RECONSTRUCT_BLOCK, core::ReconstructMethod::kBlock},
      {v1::RECONSTRUCT_AUTO, core::ReconstructMethod::kAuto},
  };
  const core::ReconstructOptions defaults;
  for (const auto& c : cases) {
    v1::RunRequest r = Request();
    r.mutable_config()->set_reconstruct(c.proto);
    absl::StatusOr<core::JobSpec> spec = JobSpecFromRunRequest(OverTheWire(r));
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->reconstruct.method, c.core)
        << v1::ReconstructMethod_Name(c.proto);
    EXPECT_EQ(spec->reconstruct.iterations, defaults.iterations);
  }
  // Unset means auto; the core's default and the schema's agree.
  EXPECT_EQ(core::kDefaultReconstruct, core::ReconstructMethod::kAuto);

  v1::RunRequest r = Request();
  r.mutable_config()->mutable_reconstruction()->set_iterations(200);
  absl::StatusOr<core::JobSpec> set = JobSpecFromRunRequest(OverTheWire(r));
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->reconstruct.iterations, 200);
  EXPECT_EQ(set->reconstruct.method, core::kDefaultReconstruct);

  // 0 means the default, as an unset field.
  r.mutable_config()->mutable_reconstruction()->set_iterations(0);
  set = JobSpecFromRunRequest(OverTheWire(r));
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->reconstruct.iterations, defaults.iterations);
  EXPECT_EQ(defaults.iterations, kReconstructIterations.def);
}

TEST(ConvertTest, BadReconstructIsInvalidArgument) {
  v1::RunRequest r = Request();
  r.mutable_config()->set_reconstruct(static_cast<v1::ReconstructMethod>(9));
  absl::Status s = JobSpecFromRunRequest(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("config.reconstruct"), std::string::npos) << s;
  for (int iterations : {-1, 100001}) {
    r = Request();
    r.mutable_config()->mutable_reconstruction()->set_iterations(iterations);
    s = JobSpecFromRunRequest(r).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << iterations;
    EXPECT_NE(s.message().find("config.reconstruction.iterations"),
              std::string::npos)
        << s;
  }
}

TEST(ConvertTest, ResultCarriesIterationsRunAndRangeMethods) {
  core::JobResult result;
  // Without distillation the prior's weight is NaN in the core, 0 here.
  EXPECT_EQ(ResultToProto(result).distill_tv_weight(), 0);
  result.distill_iterations = 253;
  result.distill_tv_weight = 2.5;
  result.activations.push_back({"stem/relu", 4, 0.0, 2.5, "mse"});
  v1::JobResult proto = ResultToProto(result);
  EXPECT_EQ(proto.distill_iterations(), 253);
  EXPECT_EQ(proto.distill_tv_weight(), 2.5);
  ASSERT_EQ(proto.activations_size(), 1);
  EXPECT_EQ(proto.activations(0).range(), "mse");
}

TEST(ConvertTest, ResultCarriesMeasuredPointsAndReconstruction) {
  core::JobResult result;
  core::MeasuredPoint mixed{{640, 0.25, {2, 4}}, 0.07, false, 0.0036};
  core::MeasuredPoint uniform{{800, 0.5, {4, 4}}, 0.12, true, std::nullopt};
  result.measured_points = {mixed, uniform};
  result.reconstruction = "block";
  result.reconstruction_iterations = 500;
  result.reconstructed.push_back({"stem.0 .. stem.3", 0.5, 0.125, 0.03});
  v1::JobResult proto = ResultToProto(result);
  ASSERT_EQ(proto.measured_points_size(), 2);
  EXPECT_EQ(proto.measured_points(0).point().size_bits(), 640);
  EXPECT_THAT(proto.measured_points(0).point().bits(), ::testing::ElementsAre(2, 4));
  EXPECT_DOUBLE_EQ(proto.measured_points(0).output_kl(), 0.07);
  EXPECT_FALSE(proto.measured_points(0).uniform());
  ASSERT_TRUE(proto.measured_points(0).has_reconstructed_kl());
  EXPECT_DOUBLE_EQ(proto.measured_points(0).reconstructed_kl(), 0.0036);
  EXPECT_TRUE(proto.measured_points(1).uniform());
  EXPECT_FALSE(proto.measured_points(1).has_reconstructed_kl());
  EXPECT_EQ(proto.reconstruction().method(), "block");
  EXPECT_EQ(proto.reconstruction().iterations(), 500);
  ASSERT_EQ(proto.reconstruction().units_size(), 1);
  EXPECT_EQ(proto.reconstruction().units(0).name(), "stem.0 .. stem.3");
  EXPECT_DOUBLE_EQ(proto.reconstruction().units(0).error_after(), 0.125);
  EXPECT_DOUBLE_EQ(proto.reconstruction().units(0).flipped(), 0.03);

  // Without the stage: "none" and no units.
  proto = ResultToProto(core::JobResult());
  EXPECT_EQ(proto.reconstruction().method(), "none");
  EXPECT_EQ(proto.reconstruction().units_size(), 0);
  EXPECT_EQ(proto.measured_points_size(), 0);
}

}  // namespace
}  // namespace zeroq::worker
