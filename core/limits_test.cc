// One config schema: at every edge of every range, SubmitJob's check of a
// QuantizationConfig (the worker runs the same one) and the core's own checks
// (which zeroq-quantize goes through) give the same verdict, and it is the
// verdict of common/config_limits.h. A config the server accepts is never
// refused later for a range reason.
#include <functional>
#include <string>
#include <vector>

#include "common/config_limits.h"
#include "core/distill.h"
#include "core/quantized_model.h"
#include "core/test_util.h"
#include "gtest/gtest.h"
#include "proto/config_check.h"

namespace zeroq::core {
namespace {

struct IntCase {
  const char* field;
  IntLimit limit;
  std::function<void(v1::QuantizationConfig&, int64_t)> set;
  std::function<absl::Status(int64_t)> core;
};

TEST(LimitsTest, ServerAndCoreAgreeAtEveryIntegerEdge) {
  std::unique_ptr<Model> model = LoadTestModel("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  auto quant = [&](auto edit) {
    return [&, edit](int64_t v) {
      QuantOptions o;
      edit(o, v);
      return ValidateQuantOptions(*model, o);
    };
  };
  auto distill = [](auto edit) {
    return [edit](int64_t v) {
      DistillOptions o;
      edit(o, v);
      return ValidateDistillOptions(o);
    };
  };
  const std::vector<IntCase> cases = {
      {"weight_bits", kWeightBits,
       [](auto& c, int64_t v) { c.set_weight_bits(v); },
       quant([](QuantOptions& o, int64_t v) { o.weight_bits = v; })},
      {"activation_bits", kActivationBits,
       [](auto& c, int64_t v) { c.set_activation_bits(v); },
       quant([](QuantOptions& o, int64_t v) { o.activation_bits = v; })},
      {"layer_bits", kLayerBits,
       [](auto& c, int64_t v) { (*c.mutable_layer_bits())["fc"] = v; },
       quant([](QuantOptions& o, int64_t v) { o.layer_bits["fc"] = v; })},
      {"distillation.batch_size", kBatchSize,
       [](auto& c, int64_t v) { c.mutable_distillation()->set_batch_size(v); },
       distill([](DistillOptions& o, int64_t v) { o.batch_size = v; })},
      {"distillation.num_batches", kNumBatches,
       [](auto& c, int64_t v) { c.mutable_distillation()->set_num_batches(v); },
       distill([](DistillOptions& o, int64_t v) { o.num_batches = v; })},
      {"distillation.iterations", kIterations,
       [](auto& c, int64_t v) { c.mutable_distillation()->set_iterations(v); },
       distill([](DistillOptions& o, int64_t v) { o.iterations = v; })},
  };
  for (const IntCase& c : cases) {
    std::vector<int64_t> edges = {c.limit.lo - 1, c.limit.lo, c.limit.hi,
                                  c.limit.hi + 1, -1, 0, 1};
    for (int64_t v : edges) {
      v1::QuantizationConfig config;
      c.set(config, v);
      const bool want = c.limit.Contains(v);
      absl::Status server = ValidateQuantizationConfig(config);
      absl::Status core = c.core(v);
      EXPECT_EQ(server.ok(), want) << c.field << " = " << v << ": " << server;
      EXPECT_EQ(core.ok(), want) << c.field << " = " << v << ": " << core;
      if (!server.ok()) {
        EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
        EXPECT_NE(server.message().find(std::string("config.") + c.field),
                  std::string::npos)
            << server;
      }
    }
  }
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
    const bool want = PercentileOk(p);
    EXPECT_EQ(ValidateQuantizationConfig(config).ok(), want) << p;
    EXPECT_EQ(ValidateQuantOptions(*model, o).ok(), want) << p;
  }
  for (double lr : {-1.0, 0.0, 1e-6, 0.5, 100.0, 100.5}) {
    v1::QuantizationConfig config;
    config.mutable_distillation()->set_lr(lr);
    DistillOptions o;
    o.lr = lr;
    const bool want = LrOk(lr);
    EXPECT_EQ(ValidateQuantizationConfig(config).ok(), want) << lr;
    EXPECT_EQ(ValidateDistillOptions(o).ok(), want) << lr;
  }
}

}  // namespace
}  // namespace zeroq::core
