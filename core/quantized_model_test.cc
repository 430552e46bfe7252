// Tests of QuantizedModel (simulated quantization) and its export: float
// identity at 0 bits, closeness at 8 bits, error vs bits, the weights and
// activation sites it inserts, calibration ranges, options, and that the
// saved TorchScript runs bit-identically in LibTorch and in Python.
#include "core/quantized_model.h"

#include <ATen/Parallel.h>
#include <stdlib.h>  // mkdtemp
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/cancellation.h"
#include "core/distill.h"
#include "core/export.h"
#include "core/model.h"
#include "core/options.h"
#include "core/quantizer.h"
#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;



// The conv/linear nodes of a graph in order, with their constant weights.
std::vector<torch::Tensor> GraphWeights(torch::jit::Graph& g) {
  std::vector<torch::Tensor> out;
  for (torch::jit::Node* n : Model::Nodes(g)) {
    if (!IsQuantizableOp(*n)) continue;
    c10::optional<c10::IValue> w = torch::jit::toIValue(n->input(1));
    out.push_back(w && w->isTensor() ? w->toTensor() : torch::Tensor());
  }
  return out;
}

// A 3x3 convolution with padding 1 and no bias, as in fashion_cnn.
torch::Tensor Conv(const torch::Tensor& x, const torch::Tensor& w,
                   int64_t stride) {
  const std::vector<int64_t> strides = {stride, stride}, padding = {1, 1};
  return torch::conv2d(x, w, c10::optional<torch::Tensor>(), strides, padding);
}

double RelativeError(const torch::Tensor& got, const torch::Tensor& want) {
  return ((got - want).norm() / want.norm()).item<double>();
}

double Top1Agreement(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.argmax(1) == b.argmax(1)).to(torch::kDouble).mean().item<double>();
}

class QuantizedModelTest : public ::testing::Test {
 protected:
  // One intra-op thread: the models are tiny, and OpenMP threads that spin
  // at barriers slow down by orders of magnitude when other processes (a
  // parallel build) share the cores.
  void SetUp() override {
    at::set_num_threads(1);
    absl::StatusOr<std::unique_ptr<Model>> m =
        Model::LoadFromFile(ModelPath("fashion_cnn.pt"));
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }

  // Distilled batches for fashion_cnn (cheap: few iterations).
  std::vector<torch::Tensor> Distilled(uint64_t seed, int batch = 32,
                                       int iterations = 30) {
    DistillOptions d;
    d.batch_size = batch;
    d.iterations = iterations;
    d.seed = seed;
    absl::StatusOr<DistilledData> data = Distill(*model_, {1, 28, 28}, d);
    EXPECT_TRUE(data.ok()) << data.status();
    return data.ok() ? data->batches : std::vector<torch::Tensor>{};
  }

  std::unique_ptr<QuantizedModel> Quantize(
      const QuantOptions& options, const std::vector<torch::Tensor>& calib) {
    absl::StatusOr<std::unique_ptr<QuantizedModel>> q =
        QuantizedModel::Create(*model_, options, calib);
    EXPECT_TRUE(q.ok()) << q.status();
    return q.ok() ? std::move(*q) : nullptr;
  }

  torch::Tensor FloatOut(const torch::Tensor& x) {
    absl::StatusOr<torch::Tensor> y = First(model_->Forward(x));
    EXPECT_TRUE(y.ok()) << y.status();
    return y.ok() ? *y : torch::Tensor();
  }

  // The float weight of each quantizable layer, in summary order.
  std::vector<torch::Tensor> FloatWeights() {
    std::shared_ptr<torch::jit::Graph> g = model_->graph();
    std::vector<torch::jit::Node*> nodes = Model::Nodes(*g);
    std::vector<torch::Tensor> out;
    for (const QuantLayer& l : model_->summary().layers) {
      out.push_back(
          torch::jit::toIValue(nodes.at(l.node_index)->input(1))->toTensor());
    }
    return out;
  }

  std::unique_ptr<Model> model_;
};

TEST_F(QuantizedModelTest, ZeroBitsIsExactlyTheFloatModel) {
  QuantOptions options;
  options.weight_bits = 0;
  options.activation_bits = 0;
  std::unique_ptr<QuantizedModel> q = Quantize(options, {});
  ASSERT_NE(q, nullptr);
  torch::manual_seed(31);
  torch::Tensor x = torch::randn({16, 1, 28, 28});
  absl::StatusOr<torch::Tensor> y = First(q->Forward(x));
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_TRUE(torch::equal(*y, FloatOut(x)));
  EXPECT_TRUE(q->sites().empty());
  ASSERT_EQ(q->layers().size(), 6u);
  for (const LayerQuantInfo& l : q->layers()) {
    EXPECT_EQ(l.bits, 0) << l.name;
    EXPECT_FALSE(l.scale.defined()) << l.name;
  }
  EXPECT_DOUBLE_EQ(q->weight_bytes(), 42256 * 4.0);
}

TEST_F(QuantizedModelTest, W8A8IsCloseToFloat) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/1);
  std::vector<torch::Tensor> eval = Distilled(/*seed=*/2, /*batch=*/64);
  ASSERT_FALSE(calib.empty() || eval.empty());
  std::unique_ptr<QuantizedModel> q = Quantize(QuantOptions(), calib);
  ASSERT_NE(q, nullptr);
  absl::StatusOr<torch::Tensor> y = First(q->Forward(eval[0]));
  ASSERT_TRUE(y.ok()) << y.status();
  torch::Tensor f = FloatOut(eval[0]);
  EXPECT_THAT(y->sizes().vec(), ElementsAre(64, 10));
  EXPECT_FALSE(torch::equal(*y, f));  // it is quantized
  RecordProperty("relative_error", std::to_string(RelativeError(*y, f)));
  RecordProperty("top1_agreement", std::to_string(Top1Agreement(*y, f)));
  EXPECT_LT(RelativeError(*y, f), 0.05);
  EXPECT_GE(Top1Agreement(*y, f), 0.9);
  EXPECT_DOUBLE_EQ(q->weight_bytes(), 42256.0);
}

TEST_F(QuantizedModelTest, ErrorGrowsAsWeightBitsShrink) {
  torch::manual_seed(32);
  torch::Tensor x = torch::randn({64, 1, 28, 28});
  torch::Tensor f = FloatOut(x);
  std::vector<double> err;
  for (int bits : {8, 6, 4, 3, 2}) {
    QuantOptions options;
    options.weight_bits = bits;
    options.activation_bits = 0;
    std::unique_ptr<QuantizedModel> q = Quantize(options, {});
    ASSERT_NE(q, nullptr);
    absl::StatusOr<torch::Tensor> y = First(q->Forward(x));
    ASSERT_TRUE(y.ok());
    err.push_back(RelativeError(*y, f));
    RecordProperty("w" + std::to_string(bits), std::to_string(err.back()));
  }
  for (size_t i = 1; i < err.size(); ++i) {
    EXPECT_GT(err[i], err[i - 1]) << "error at " << i;
  }
  EXPECT_LT(err.front(), 0.02);
  EXPECT_GT(err.back(), 10 * err.front());
}

TEST_F(QuantizedModelTest, ActivationBitsMatterToo) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/3, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  torch::Tensor f = FloatOut(calib[0]);
  std::vector<double> err;
  for (int bits : {16, 8, 4, 2}) {
    QuantOptions options;
    options.weight_bits = 0;
    options.activation_bits = bits;
    std::unique_ptr<QuantizedModel> q = Quantize(options, calib);
    ASSERT_NE(q, nullptr);
    ASSERT_EQ(q->sites().size(), 5u);
    absl::StatusOr<torch::Tensor> y = First(q->Forward(calib[0]));
    ASSERT_TRUE(y.ok());
    err.push_back(RelativeError(*y, f));
    RecordProperty("a" + std::to_string(bits), std::to_string(err.back()));
  }
  EXPECT_LT(err[0], 1e-3);
  for (size_t i = 1; i < err.size(); ++i) EXPECT_GT(err[i], err[i - 1]) << i;
}

TEST_F(QuantizedModelTest, WeightsInTheModuleAreQuantizeWeightsOutput) {
  QuantOptions options;
  options.weight_bits = 4;
  options.layer_bits = {{"fc", 2}, {"block.conv1", 8}};
  options.activation_bits = 0;
  std::unique_ptr<QuantizedModel> q = Quantize(options, {});
  ASSERT_NE(q, nullptr);
  const std::vector<torch::Tensor> floats = FloatWeights();
  std::shared_ptr<torch::jit::Graph> g =
      q->module().get_method("forward").graph();
  const std::vector<torch::Tensor> in_module = GraphWeights(*g);
  ASSERT_EQ(in_module.size(), floats.size());
  const std::vector<int> want_bits = {4, 4, 8, 4, 4, 2};
  ASSERT_EQ(q->layers().size(), 6u);
  for (size_t i = 0; i < floats.size(); ++i) {
    SCOPED_TRACE(q->layers()[i].name);
    EXPECT_EQ(q->layers()[i].bits, want_bits[i]);
    absl::StatusOr<WeightQuantization> want =
        QuantizeWeight(floats[i], want_bits[i]);
    ASSERT_TRUE(want.ok());
    ASSERT_TRUE(in_module[i].defined());
    EXPECT_TRUE(torch::equal(in_module[i], want->dequantized));
    EXPECT_TRUE(torch::equal(q->layers()[i].scale, want->scale));
    EXPECT_TRUE(torch::equal(q->layers()[i].zero_point, want->zero_point));
    EXPECT_EQ(q->layers()[i].scale.numel(), floats[i].size(0));
  }
  // 2 bits: at most 4 values per output row of fc.
  for (int64_t r = 0; r < in_module[5].size(0); ++r) {
    EXPECT_LE(std::get<0>(at::_unique(in_module[5][r])).numel(), 4);
  }
  // Sizes: layers at their own widths.
  double bits = 0;
  for (size_t i = 0; i < floats.size(); ++i) {
    bits += floats[i].numel() * want_bits[i];
  }
  EXPECT_DOUBLE_EQ(q->weight_bytes(), bits / 8);

  // The same weights come back from a saved and reloaded module.
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const std::string path = dir.path() + "/q.pt";
  ASSERT_TRUE(q->Save(path).ok());
  torch::jit::Module loaded = torch::jit::load(path);
  const std::vector<torch::Tensor> reloaded =
      GraphWeights(*loaded.get_method("forward").graph());
  ASSERT_EQ(reloaded.size(), in_module.size());
  for (size_t i = 0; i < reloaded.size(); ++i) {
    ASSERT_TRUE(reloaded[i].defined()) << i;
    EXPECT_TRUE(torch::equal(reloaded[i], in_module[i])) << i;
  }
}

TEST_F(QuantizedModelTest, OneActivationSiteAfterEachRelu) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/4, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  std::vector<CalibrationProgress> progress;
  absl::StatusOr<std::unique_ptr<QuantizedModel>> q = QuantizedModel::Create(
      *model_, QuantOptions(), calib,
      [&](const CalibrationProgress& p) { progress.push_back(p); });
  ASSERT_TRUE(q.ok()) << q.status();
  // fashion_cnn: stem, down1, block (x2: after bn1 and after the sum), down2.
  const auto& sites = (*q)->sites();
  ASSERT_EQ(sites.size(), 5u);
  std::set<std::string> names;
  for (const ActivationSiteInfo& s : sites) {
    EXPECT_TRUE(names.insert(s.name).second) << "duplicate " << s.name;
    EXPECT_EQ(s.after, "aten::relu") << s.name;
    EXPECT_EQ(s.quant.bits, 8);
    EXPECT_EQ(s.quant.lo, 0.0) << s.name;  // ReLU outputs reach 0
    EXPECT_GT(s.quant.hi, 0.0) << s.name;
  }
  EXPECT_THAT(sites[0].name, HasSubstr("stem"));
  EXPECT_THAT(sites[2].name, HasSubstr("block"));
  EXPECT_THAT(sites[4].name, HasSubstr("down2"));
  ASSERT_EQ(progress.size(), 5u);
  for (size_t i = 0; i < progress.size(); ++i) {
    EXPECT_EQ(progress[i].site, static_cast<int>(i) + 1);
    EXPECT_EQ(progress[i].sites, 5);
    EXPECT_EQ(progress[i].name, sites[i].name);
  }

  QuantOptions inputs;
  inputs.quantize_layer_inputs = true;
  std::unique_ptr<QuantizedModel> qi = Quantize(inputs, calib);
  ASSERT_NE(qi, nullptr);
  // Plus the network input (into stem.0) and the pooled features into fc;
  // every other layer input is already a ReLU site.
  ASSERT_EQ(qi->sites().size(), 7u);
  EXPECT_EQ(qi->sites().front().name, "stem.0:input");
  EXPECT_EQ(qi->sites().front().after, "input of stem.0");
  EXPECT_EQ(qi->sites().back().name, "fc:input");
  EXPECT_LT(qi->sites().front().quant.lo, 0.0);  // the input is signed
}

// Site ranges are the min/max over the calibration data of the value at the
// site, with the quantized weights and every upstream quantizer in place.
TEST_F(QuantizedModelTest, RangesAreCalibratedWithUpstreamQuantization) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/5, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  QuantOptions options;
  options.weight_bits = 4;
  options.activation_bits = 3;  // coarse, so upstream quantization shows
  options.activation_range = ActivationRange::kMinMax;
  std::unique_ptr<QuantizedModel> q = Quantize(options, calib);
  ASSERT_NE(q, nullptr);
  ASSERT_EQ(q->sites().size(), 5u);

  torch::jit::Module m = torch::jit::load(ModelPath("fashion_cnn.pt"));
  m.eval();
  auto child = [](const torch::jit::Module& p, const char* name) {
    return p.attr(name).toModule();
  };
  const std::vector<torch::Tensor> floats = FloatWeights();
  auto w4 = [&](int i) { return QuantizeWeight(floats[i], 4)->dequantized; };
  torch::NoGradGuard no_grad;
  const torch::Tensor& x = calib[0];
  // stem = conv(1->16, 3x3, pad 1, no bias), bn, relu.
  torch::jit::Module stem = child(m, "stem");
  torch::Tensor s = torch::relu(
      child(stem, "1").forward({Conv(x, w4(0), /*stride=*/1)}).toTensor());
  EXPECT_NEAR(q->sites()[0].quant.hi, s.max().item<double>(),
              1e-5 * s.max().item<double>());
  // down1 = conv(16->32, stride 2), bn, relu; its input is the quantized
  // stem output.
  torch::jit::Module down1 = child(m, "down1");
  auto down1_out = [&](const torch::Tensor& in) {
    return torch::relu(
        child(down1, "1").forward({Conv(in, w4(1), /*stride=*/2)}).toTensor());
  };
  const double with_upstream =
      down1_out(FakeQuantize(s, q->sites()[0].quant)).max().item<double>();
  const double without_upstream = down1_out(s).max().item<double>();
  EXPECT_NEAR(q->sites()[1].quant.hi, with_upstream, 1e-5 * with_upstream);
  // Make sure the check can tell the two apart.
  EXPECT_GT(std::abs(with_upstream - without_upstream), 1e-3 * with_upstream);
}

TEST_F(QuantizedModelTest, PercentileRangeIsNoWiderThanMinMax) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/6, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  QuantOptions full;
  full.quantize_layer_inputs = true;
  QuantOptions clipped = full;
  clipped.activation_percentile = 99.0;
  std::unique_ptr<QuantizedModel> a = Quantize(full, calib);
  std::unique_ptr<QuantizedModel> b = Quantize(clipped, calib);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_EQ(a->sites().size(), b->sites().size());
  // The first site sees the same values in both (no quantizer upstream).
  const ActivationQuantization& fa = a->sites()[0].quant;
  const ActivationQuantization& fb = b->sites()[0].quant;
  EXPECT_GE(fb.lo, fa.lo);
  EXPECT_LE(fb.hi, fa.hi);
  EXPECT_LT(fb.hi - fb.lo, fa.hi - fa.lo);  // 1% of 12544 values clipped
  // (Later sites see differently quantized inputs in the two models, so
  // their ranges need not nest.)
  // 99th percentile of the network input, computed here.
  torch::Tensor v = calib[0].flatten();
  torch::Tensor sorted = std::get<0>(v.sort());
  const int64_t n = v.numel();
  const double p99 =
      sorted[static_cast<int64_t>(std::llround(0.99 * (n - 1)))].item<double>();
  const double p01 =
      sorted[static_cast<int64_t>(std::llround(0.01 * (n - 1)))].item<double>();
  EXPECT_NEAR(fb.hi, p99, 1e-6 + 1e-3 * std::abs(p99));
  EXPECT_NEAR(fb.lo, p01, 1e-6 + 1e-3 * std::abs(p01));
}

// The MSE range search on a real site: the network input (quantized with
// quantize_layer_inputs) sees the same values whatever the method, so the
// two ranges can be compared on them.
TEST_F(QuantizedModelTest, MseRangeHasNoMoreErrorThanMinMaxOnTheSameValues) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/6, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  QuantOptions minmax;
  minmax.quantize_layer_inputs = true;
  minmax.activation_bits = 4;
  minmax.activation_range = ActivationRange::kMinMax;
  QuantOptions mse = minmax;
  mse.activation_range = ActivationRange::kMse;
  std::unique_ptr<QuantizedModel> a = Quantize(minmax, calib);
  std::unique_ptr<QuantizedModel> b = Quantize(mse, calib);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_EQ(a->sites().size(), b->sites().size());
  for (size_t i = 0; i < a->sites().size(); ++i) {
    EXPECT_EQ(a->sites()[i].range, "minmax");
    EXPECT_EQ(b->sites()[i].range, "mse");
  }
  const ActivationQuantization& fa = a->sites()[0].quant;
  const ActivationQuantization& fb = b->sites()[0].quant;
  EXPECT_EQ(fa.lo, calib[0].min().item<double>());
  EXPECT_EQ(fa.hi, calib[0].max().item<double>());
  EXPECT_GE(fb.lo, fa.lo);
  EXPECT_LE(fb.hi, fa.hi);
  EXPECT_LE(QuantizationMse(calib[0], fb), QuantizationMse(calib[0], fa));
  // Both ends of the distilled input are tails that 4 bits cannot afford.
  EXPECT_LT(fb.hi - fb.lo, fa.hi - fa.lo);
}

// Unset (kAuto): percentile below 100, else the default method.
TEST_F(QuantizedModelTest, AutoRangeIsPercentileBelow100ElseTheDefault) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/6, /*batch=*/8);
  ASSERT_FALSE(calib.empty());
  QuantOptions o;
  o.activation_percentile = 99.0;
  std::unique_ptr<QuantizedModel> p = Quantize(o, calib);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->sites().front().range, "percentile 99");
  EXPECT_EQ(ResolvedActivationRange(o), ActivationRange::kPercentile);
  o = QuantOptions();
  EXPECT_EQ(ResolvedActivationRange(o), kDefaultActivationRange);
  std::unique_ptr<QuantizedModel> d = Quantize(o, calib);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(
      d->sites().front().range,
      kActivationRangeNames[static_cast<int>(kDefaultActivationRange) - 1]);
}

TEST_F(QuantizedModelTest, BadOptionsAreInvalidArgument) {
  std::vector<torch::Tensor> calib = {torch::randn({4, 1, 28, 28})};
  auto code = [&](const QuantOptions& o, const std::vector<torch::Tensor>& c) {
    return QuantizedModel::Create(*model_, o, c).status().code();
  };
  QuantOptions o;
  o.layer_bits = {{"no_such_layer", 4}};
  absl::Status unknown = QuantizedModel::Create(*model_, o, calib).status();
  EXPECT_EQ(unknown.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(unknown.message()), HasSubstr("no_such_layer"));

  o = QuantOptions();
  o.layer_bits = {{"fc", 9}};
  EXPECT_EQ(code(o, calib), absl::StatusCode::kInvalidArgument);
  for (int bits : {1, 9, -2}) {
    o = QuantOptions();
    o.weight_bits = bits;
    EXPECT_EQ(code(o, calib), absl::StatusCode::kInvalidArgument) << bits;
  }
  for (int bits : {1, 17}) {
    o = QuantOptions();
    o.activation_bits = bits;
    EXPECT_EQ(code(o, calib), absl::StatusCode::kInvalidArgument) << bits;
  }
  for (double p : {50.0, 100.5, std::nan("")}) {
    o = QuantOptions();
    o.activation_percentile = p;
    EXPECT_EQ(code(o, calib), absl::StatusCode::kInvalidArgument) << p;
  }
  // Only the percentile method takes a percentile below 100.
  for (ActivationRange r : {ActivationRange::kMinMax, ActivationRange::kMse}) {
    o = QuantOptions();
    o.activation_range = r;
    o.activation_percentile = 99.0;
    absl::Status s = QuantizedModel::Create(*model_, o, calib).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("activation_percentile"));
  }
  o = QuantOptions();
  o.activation_range = static_cast<ActivationRange>(7);
  EXPECT_EQ(code(o, calib), absl::StatusCode::kInvalidArgument);
  // Activation quantization needs calibration data.
  EXPECT_EQ(code(QuantOptions(), {}), absl::StatusCode::kInvalidArgument);
  // Edge widths are fine.
  o = QuantOptions();
  o.weight_bits = 2;
  o.activation_bits = 16;
  o.layer_bits = {{"fc", 0}};
  EXPECT_EQ(code(o, calib), absl::StatusCode::kOk);
}

TEST_F(QuantizedModelTest, FloatLayerViaLayerBitsZero) {
  QuantOptions options;
  options.weight_bits = 2;
  options.activation_bits = 0;
  options.layer_bits = {{"stem.0", 0}};
  std::unique_ptr<QuantizedModel> q = Quantize(options, {});
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->layers()[0].bits, 0);
  EXPECT_FALSE(q->layers()[0].scale.defined());
  const std::vector<torch::Tensor> w =
      GraphWeights(*q->module().get_method("forward").graph());
  EXPECT_TRUE(torch::equal(w[0], FloatWeights()[0]));
  EXPECT_FALSE(torch::equal(w[1], FloatWeights()[1]));
  EXPECT_DOUBLE_EQ(q->weight_bytes(), 144 * 4 + (42256 - 144) * 2 / 8.0);
  // The recipe says which layer stayed float and gives it no scales.
  nlohmann::json j = nlohmann::json::parse(
      RecipeJson(*model_, *q, {{1, 28, 28}, "none"}), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["layers"][0]["bits"], 0);
  EXPECT_FALSE(j["layers"][0].contains("scale"));
  EXPECT_EQ(j["layers"][1]["bits"], 2);
  EXPECT_EQ(j["layers"][1]["scale"].size(), 32u);
  EXPECT_TRUE(j["activations"].empty());
}

TEST_F(QuantizedModelTest, CancelledCalibration) {
  std::vector<torch::Tensor> calib = {torch::randn({4, 1, 28, 28})};
  CancellationToken token;
  token.Cancel();
  absl::StatusOr<std::unique_ptr<QuantizedModel>> q =
      QuantizedModel::Create(*model_, QuantOptions(), calib, {}, &token);
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kCancelled);

  // Cancelled from the progress callback after the second site.
  CancellationToken later;
  int calls = 0;
  q = QuantizedModel::Create(
      *model_, QuantOptions(), calib,
      [&](const CalibrationProgress& p) {
        ++calls;
        if (p.site == 2) later.Cancel();
      },
      &later);
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 2);
}

TEST_F(QuantizedModelTest, SavedModelGivesExactlyTheSameOutputs) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/7, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  QuantOptions options;
  options.weight_bits = 4;
  options.quantize_layer_inputs = true;
  std::unique_ptr<QuantizedModel> q = Quantize(options, calib);
  ASSERT_NE(q, nullptr);
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const std::string path = dir.path() + "/model.zeroq.pt";
  ASSERT_TRUE(q->Save(path).ok());
  torch::manual_seed(33);
  torch::Tensor x = torch::randn({8, 1, 28, 28});
  absl::StatusOr<torch::Tensor> want = First(q->Forward(x));
  ASSERT_TRUE(want.ok());
  torch::jit::Module loaded = torch::jit::load(path);
  loaded.eval();
  torch::NoGradGuard no_grad;
  // Several runs: the graph executor's later, optimised runs too.
  for (int run = 0; run < 3; ++run) {
    torch::Tensor got = loaded.forward({x}).toTensor();
    EXPECT_TRUE(torch::equal(got, *want)) << "run " << run;
  }
  // The saved module is an ordinary model: the core can load it again.
  absl::StatusOr<std::unique_ptr<Model>> again = Model::LoadFromFile(path);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->summary().layers.size(), 6u);
}

TEST_F(QuantizedModelTest, SavedModelRunsInPython) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/8, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  std::unique_ptr<QuantizedModel> q = Quantize(QuantOptions(), calib);
  ASSERT_NE(q, nullptr);
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  ASSERT_TRUE(q->Save(dir.path() + "/model.pt").ok());
  torch::manual_seed(34);
  torch::Tensor x = torch::randn({8, 1, 28, 28});
  absl::StatusOr<torch::Tensor> want = First(q->Forward(x));
  ASSERT_TRUE(want.ok());
  ASSERT_TRUE(SaveTensor(dir.path() + "/x.pt", {x}).ok());
  ASSERT_TRUE(SaveTensor(dir.path() + "/want.pt", {*want}).ok());
  const std::string script = dir.path() + "/check.py";
  {
    std::ofstream out(script);
    out << "import sys, torch\n"
           "d, threads = sys.argv[1], int(sys.argv[2])\n"
           "torch.set_num_threads(threads)\n"
           "m = torch.jit.load(d + '/model.pt')\n"
           "x = torch.load(d + '/x.pt')\n"
           "want = torch.load(d + '/want.pt')\n"
           "with torch.no_grad():\n"
           "    got = m(x)\n"
           "if tuple(got.shape) != (8, 10):\n"
           "    print('shape', got.shape); sys.exit(3)\n"
           "if not torch.equal(got, want):\n"
           "    print('max diff', (got - want).abs().max().item()); "
           "sys.exit(4)\n"
           "sys.exit(0)\n";
  }
  const std::string cmd = absl::StrCat(ZEROQ_PYTHON, " ", script, " ",
                                       dir.path(), " ", at::get_num_threads());
  const int rc = std::system(cmd.c_str());
  ASSERT_NE(rc, -1);
  ASSERT_TRUE(WIFEXITED(rc)) << cmd;
  EXPECT_EQ(WEXITSTATUS(rc), 0) << cmd;
}

TEST_F(QuantizedModelTest, RecipeJsonDescribesEveryLayerAndSite) {
  std::vector<torch::Tensor> calib = Distilled(/*seed=*/9, /*batch=*/16);
  ASSERT_FALSE(calib.empty());
  QuantOptions options;
  options.layer_bits = {{"fc", 4}};
  std::unique_ptr<QuantizedModel> q = Quantize(options, calib);
  ASSERT_NE(q, nullptr);
  const std::string text = RecipeJson(*model_, *q, {{1, 28, 28}, "distilled"});
  nlohmann::json j =
      nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << text.substr(0, 200);
  EXPECT_EQ(j["input_shape"], nlohmann::json({1, 28, 28}));
  EXPECT_EQ(j["calibration"], "distilled");
  ASSERT_TRUE(j["layers"].is_array());
  ASSERT_EQ(j["layers"].size(), 6u);
  const ModelSummary& s = model_->summary();
  for (size_t i = 0; i < 6; ++i) {
    const nlohmann::json& e = j["layers"][i];
    SCOPED_TRACE(s.layers[i].name);
    EXPECT_EQ(e["name"], s.layers[i].name);
    EXPECT_EQ(e["bits"], i == 5 ? 4 : 8);
    EXPECT_EQ(e["params"], s.layers[i].params);
    EXPECT_EQ(e["bn"], s.layers[i].bn);
    ASSERT_TRUE(e["scale"].is_array());
    ASSERT_TRUE(e["zero_point"].is_array());
    const int64_t out_channels = s.layers[i].weight_shape[0];
    ASSERT_EQ(static_cast<int64_t>(e["scale"].size()), out_channels);
    ASSERT_EQ(static_cast<int64_t>(e["zero_point"].size()), out_channels);
    const torch::Tensor& scale = q->layers()[i].scale;
    for (int64_t c = 0; c < out_channels; ++c) {
      EXPECT_EQ(e["scale"][c].get<double>(), scale[c].item<double>());
      const double zp = e["zero_point"][c].get<double>();
      EXPECT_EQ(zp, std::round(zp));  // integers
    }
  }
  ASSERT_TRUE(j["activations"].is_array());
  ASSERT_EQ(j["activations"].size(), q->sites().size());
  for (size_t i = 0; i < q->sites().size(); ++i) {
    const nlohmann::json& a = j["activations"][i];
    EXPECT_EQ(a["name"], q->sites()[i].name);
    EXPECT_EQ(a["bits"], 8);
    EXPECT_LE(a["min"].get<double>(), a["max"].get<double>());
    EXPECT_GT(a["scale"].get<double>(), 0);
    EXPECT_DOUBLE_EQ(a["scale"].get<double>(), q->sites()[i].quant.scale);
  }
  EXPECT_DOUBLE_EQ(j["weight_bytes"].get<double>(), q->weight_bytes());
  EXPECT_DOUBLE_EQ(j["float_weight_bytes"].get<double>(), 42256 * 4.0);
}

// One site per ReLU/ReLU6 op of each architecture (ReLU6 is aten::hardtanh
// after scripting); 8 bits stays close to float on all of them.
TEST_F(QuantizedModelTest, WorksOnOtherArchitectures) {
  struct Case {
    const char* file;
    std::vector<int64_t> shape;
    size_t relu_ops;  // ReLU/ReLU6 calls in forward (python, by hand)
  };
  const std::vector<Case> cases = {
      // stem relu + 4 blocks x 2 calls of block.relu
      {"mini_resnet.pt", {8, 3, 32, 32}, 9},
      // 11 ReLU6 modules
      {"mini_mobilenet_v2.pt", {8, 3, 32, 32}, 11},
      // 17 ReLU modules, each called once
      {"mini_shufflenet_v2.pt", {8, 3, 32, 32}, 17},
      // 15 ReLU modules + F.relu after norm5
      {"mini_densenet.pt", {8, 3, 32, 32}, 16},
      // relu, relu, relu6
      {"tiny_nobn_after_conv.pt", {8, 3, 16, 16}, 3},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.file);
    absl::StatusOr<std::unique_ptr<Model>> m =
        Model::LoadFromFile(ModelPath(c.file));
    ASSERT_TRUE(m.ok()) << m.status();
    torch::manual_seed(35);
    torch::Tensor x = torch::randn(c.shape);
    absl::StatusOr<std::unique_ptr<QuantizedModel>> q =
        QuantizedModel::Create(**m, QuantOptions(), {x});
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_EQ((*q)->layers().size(), (*m)->summary().layers.size());
    EXPECT_EQ((*q)->sites().size(), c.relu_ops);
    std::set<std::string> names;
    for (const ActivationSiteInfo& s : (*q)->sites()) {
      EXPECT_TRUE(names.insert(s.name).second) << "duplicate " << s.name;
      EXPECT_TRUE(s.after == "aten::relu" || s.after == "aten::relu6" ||
                  s.after == "aten::hardtanh")
          << s.after;
    }
    absl::StatusOr<torch::Tensor> y = First((*q)->Forward(x));
    absl::StatusOr<torch::Tensor> f = First((*m)->Forward(x));
    ASSERT_TRUE(y.ok() && f.ok());
    const double err = RelativeError(*y, *f);
    RecordProperty(std::string(c.file) + "_w8a8_error", std::to_string(err));
    EXPECT_LT(err, 0.25);

    QuantOptions inputs;
    inputs.quantize_layer_inputs = true;
    absl::StatusOr<std::unique_ptr<QuantizedModel>> qi =
        QuantizedModel::Create(**m, inputs, {x});
    ASSERT_TRUE(qi.ok()) << qi.status();
    // At least the network input and the classifier's input join.
    EXPECT_GE((*qi)->sites().size(), c.relu_ops + 2);
    absl::StatusOr<torch::Tensor> yi = First((*qi)->Forward(x));
    ASSERT_TRUE(yi.ok());
    EXPECT_LT(RelativeError(*yi, *f), 0.3);
  }
}

// Like Model::Forward: a rejected input is INVALID_ARGUMENT.
TEST_F(QuantizedModelTest, ForwardWithWrongShapeIsInvalidArgument) {
  QuantOptions options;
  options.activation_bits = 0;
  std::unique_ptr<QuantizedModel> q = Quantize(options, {});
  ASSERT_NE(q, nullptr);
  absl::StatusOr<torch::Tensor> y = First(q->Forward(torch::zeros({2, 3, 28, 28})));
  ASSERT_FALSE(y.ok());
  EXPECT_EQ(y.status().code(), absl::StatusCode::kInvalidArgument)
      << y.status();
}

}  // namespace
}  // namespace zeroq::core
