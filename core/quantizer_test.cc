// Tests of the asymmetric uniform quantizers against cases worked by hand.
//
// For k bits and a range [lo, hi] (ZEROQ.md section 2), round = half to even:
//   scale = (2^k - 1) / max(hi - lo, 1e-8)
//   zp    = round(scale * lo) + 2^(k-1)
//   q     = clamp(round(scale * x - zp), -2^(k-1), 2^(k-1) - 1)
//   x_hat = (q + zp) / scale
// The inputs are chosen so that every intermediate value is exact in float32
// (scales are powers of two or small integers).
#include "core/quantizer.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

std::vector<float> Values(const torch::Tensor& t) {
  torch::Tensor c = t.detach().to(torch::kFloat).contiguous().flatten();
  return std::vector<float>(c.data_ptr<float>(),
                            c.data_ptr<float>() + c.numel());
}

torch::Tensor T(std::vector<float> v) {
  return torch::tensor(v, torch::kFloat);
}

class QuantizerTest : public ::testing::Test {
 protected:
  // One intra-op thread: the models are tiny, and OpenMP threads that spin
  // at barriers slow down by orders of magnitude when other processes (a
  // parallel build) share the cores.
  void SetUp() override { at::set_num_threads(1); }
};

TEST_F(QuantizerTest, FourBitsByHand) {
  // w = [-1, 0, 0.5, 2]: lo = -1, hi = 2.
  //   scale = 15 / 3 = 5;  zp = round(-5) + 8 = 3
  //   -1  : round(-5 - 3)   = -8        -> (-8 + 3) / 5 = -1
  //    0  : round(0 - 3)    = -3        -> 0
  //   0.5 : round(2.5 - 3)  = round(-0.5) = -0 (half to even) -> 3/5 = 0.6
  //         (half away from zero would give -1 -> 0.4)
  //    2  : round(10 - 3)   = 7         -> 10 / 5 = 2
  absl::StatusOr<WeightQuantization> q =
      QuantizeWeight(T({-1.0f, 0.0f, 0.5f, 2.0f}).reshape({1, 4}), 4);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_THAT(Values(q->dequantized), ElementsAre(-1.0f, 0.0f, 0.6f, 2.0f));
  EXPECT_THAT(Values(q->scale), ElementsAre(5.0f));
  EXPECT_THAT(Values(q->zero_point), ElementsAre(3.0f));
}

TEST_F(QuantizerTest, TwoBitsByHandPerChannel) {
  // Channel 0: [0, 1, 2, 3, 4, 6], lo = 0, hi = 6.
  //   scale = 3 / 6 = 0.5;  zp = round(0) + 2 = 2;  q in [-2, 1]
  //   0 : round(-2)   = -2 -> 0
  //   1 : round(-1.5) = -2 (half to even) -> 0
  //   2 : round(-1)   = -1 -> 1 / 0.5 = 2
  //   3 : round(-0.5) = -0 (half to even; away from zero: -1 -> 2) -> 4
  //   4 : round(0)    =  0 -> 4
  //   6 : round(1)    =  1 -> 6
  // Channel 1 is channel 0 times 4: scale = 3 / 24 = 0.125, zp = 2, the same
  // q, values times 4. Channels are quantized independently.
  torch::Tensor w =
      T({0, 1, 2, 3, 4, 6, 0, 4, 8, 12, 16, 24}).reshape({2, 1, 2, 3});
  absl::StatusOr<WeightQuantization> q = QuantizeWeight(w, 2);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_THAT(q->dequantized.sizes().vec(), ElementsAre(2, 1, 2, 3));
  EXPECT_THAT(Values(q->dequantized),
              ElementsAre(0, 0, 2, 4, 4, 6, 0, 0, 8, 16, 16, 24));
  EXPECT_THAT(Values(q->scale), ElementsAre(0.5f, 0.125f));
  EXPECT_THAT(Values(q->zero_point), ElementsAre(2.0f, 2.0f));
}

TEST_F(QuantizerTest, EightBitsByHand) {
  // lo = -2, hi = 127/64 = 1.984375: range 255/64, scale = 64, zp = -128 +
  // 128 = 0, so q = clamp(round(64 w), -128, 127):
  //   -2        -> -128           -> -2
  //   0.1       -> round(6.4) = 6 -> 6/64 = 0.09375
  //   32.5/64   -> 32 (even)      -> 0.5
  //   33.5/64   -> 34 (even)      -> 0.53125
  //   127/64    -> 127            -> 1.984375
  torch::Tensor w = T({-2.0f, 0.1f, 32.5f / 64, 33.5f / 64, 127.0f / 64});
  absl::StatusOr<WeightQuantization> q = QuantizeWeight(w.reshape({1, 5}), 8);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_THAT(Values(q->dequantized),
              ElementsAre(-2.0f, 0.09375f, 0.5f, 0.53125f, 1.984375f));
  EXPECT_THAT(Values(q->scale), ElementsAre(64.0f));
  EXPECT_THAT(Values(q->zero_point), ElementsAre(0.0f));

  // Shifted up by 2: lo = 0, scale = 64, zp = 0 + 128 = 128;
  // q = round(64 w - 128): 0 -> -128 -> 0; 255/64 -> 127 -> 255/64.
  absl::StatusOr<WeightQuantization> up =
      QuantizeWeight(T({0.0f, 0.1f, 255.0f / 64}).reshape({1, 3}), 8);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_THAT(Values(up->dequantized),
              ElementsAre(0.0f, 0.09375f, 255.0f / 64));
  EXPECT_THAT(Values(up->zero_point), ElementsAre(128.0f));
}

TEST_F(QuantizerTest, ChannelsAreIndependent) {
  torch::manual_seed(11);
  torch::Tensor w = torch::randn({4, 3, 3, 3});
  // Channel ranges that differ by orders of magnitude.
  w[1].mul_(100.0);
  w[2].mul_(0.01);
  w[3].add_(5.0);
  absl::StatusOr<WeightQuantization> all = QuantizeWeight(w, 4);
  ASSERT_TRUE(all.ok()) << all.status();
  for (int64_t c = 0; c < 4; ++c) {
    absl::StatusOr<WeightQuantization> one =
        QuantizeWeight(w.slice(0, c, c + 1), 4);
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_TRUE(
        torch::equal(one->dequantized, all->dequantized.slice(0, c, c + 1)))
        << "channel " << c;
    EXPECT_EQ(one->scale.item<float>(), all->scale[c].item<float>());
    // The per-channel step follows that channel's range alone.
    const float range = (w[c].max() - w[c].min()).item<float>();
    EXPECT_FLOAT_EQ(all->scale[c].item<float>(), 15.0f / range);
  }
  // Changing one channel leaves the others untouched.
  torch::Tensor w2 = w.clone();
  w2[1].mul_(1000.0);
  absl::StatusOr<WeightQuantization> changed = QuantizeWeight(w2, 4);
  ASSERT_TRUE(changed.ok());
  EXPECT_TRUE(torch::equal(changed->dequantized[0], all->dequantized[0]));
  EXPECT_TRUE(torch::equal(changed->dequantized[2], all->dequantized[2]));
  EXPECT_FALSE(torch::equal(changed->dequantized[1], all->dequantized[1]));
}

TEST_F(QuantizerTest, AtMostTwoToTheBitsValuesPerChannel) {
  torch::manual_seed(12);
  torch::Tensor w = torch::randn({6, 200});
  for (int bits : {1, 2, 3, 4}) {
    absl::StatusOr<WeightQuantization> q = QuantizeWeight(w, bits);
    ASSERT_TRUE(q.ok()) << q.status();
    for (int64_t c = 0; c < 6; ++c) {
      std::vector<float> v = Values(q->dequantized[c]);
      std::set<float> distinct(v.begin(), v.end());
      EXPECT_LE(distinct.size(), size_t{1} << bits) << bits << " bits";
      // 200 normal samples use (nearly) the whole grid.
      EXPECT_GE(distinct.size(), (size_t{1} << bits) - 1) << bits << " bits";
    }
  }
}

TEST_F(QuantizerTest, ConstantChannelStaysFinite) {
  // max == min: the range is clamped to 1e-8 instead of dividing by zero.
  torch::Tensor w =
      T({0.7f, 0.7f, 0.7f, 0.0f, 0.0f, 0.0f, -3.25f, -3.25f, -3.25f})
          .reshape({3, 3});
  for (int bits : {2, 4, 8}) {
    absl::StatusOr<WeightQuantization> q = QuantizeWeight(w, bits);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_TRUE(torch::isfinite(q->dequantized).all().item<bool>()) << bits;
    EXPECT_TRUE(torch::isfinite(q->scale).all().item<bool>()) << bits;
    EXPECT_TRUE(torch::allclose(q->dequantized, w, 1e-5, 1e-6))
        << bits << " bits: " << q->dequantized;
    // An all-zero channel comes back exactly zero.
    EXPECT_TRUE(torch::equal(q->dequantized[1], torch::zeros({3}))) << bits;
  }
}

TEST_F(QuantizerTest, EightBitErrorIsAtMostHalfAStep) {
  torch::manual_seed(13);
  torch::Tensor w =
      torch::randn({16, 8, 3, 3}) * torch::rand({16, 1, 1, 1}) * 3;
  absl::StatusOr<WeightQuantization> q = QuantizeWeight(w, 8);
  ASSERT_TRUE(q.ok()) << q.status();
  torch::Tensor err = (q->dequantized - w).abs().reshape({16, -1});
  torch::Tensor half_step = 0.5 / q->scale;
  torch::Tensor worst = std::get<0>(err.max(1));
  EXPECT_TRUE((worst <= half_step * (1 + 1e-4) + 1e-7).all().item<bool>())
      << worst << half_step;
  // Extremes land within half a step too (nothing is clipped away).
  EXPECT_TRUE(
      torch::allclose(std::get<0>(q->dequantized.reshape({16, -1}).max(1)),
                      std::get<0>(w.reshape({16, -1}).max(1)), 0,
                      (half_step.max() * 1.001).item<double>()));
}

TEST_F(QuantizerTest, ErrorShrinksWithBits) {
  torch::manual_seed(14);
  torch::Tensor w = torch::randn({8, 64});
  double last = std::numeric_limits<double>::infinity();
  for (int bits : {2, 3, 4, 6, 8, 12}) {
    absl::StatusOr<WeightQuantization> q = QuantizeWeight(w, bits);
    ASSERT_TRUE(q.ok());
    double mse = (q->dequantized - w).pow(2).mean().item<double>();
    EXPECT_LT(mse, last) << bits;
    last = mse;
  }
  EXPECT_LT(last, 1e-6);
}

TEST_F(QuantizerTest, ShapesArePreserved) {
  torch::Tensor conv = torch::randn({5, 3, 3, 3});
  absl::StatusOr<WeightQuantization> qc = QuantizeWeight(conv, 8);
  ASSERT_TRUE(qc.ok());
  EXPECT_THAT(qc->dequantized.sizes().vec(), ElementsAre(5, 3, 3, 3));
  EXPECT_THAT(qc->scale.sizes().vec(), ElementsAre(5));
  EXPECT_THAT(qc->zero_point.sizes().vec(), ElementsAre(5));
  EXPECT_EQ(qc->dequantized.scalar_type(), torch::kFloat);

  torch::Tensor linear = torch::randn({10, 64});
  absl::StatusOr<WeightQuantization> ql = QuantizeWeight(linear, 4);
  ASSERT_TRUE(ql.ok());
  EXPECT_THAT(ql->dequantized.sizes().vec(), ElementsAre(10, 64));
  EXPECT_THAT(ql->scale.sizes().vec(), ElementsAre(10));

  // A non-contiguous weight (a transposed view) is quantized by its dim 0.
  torch::Tensor t = torch::randn({64, 10}).t();
  absl::StatusOr<WeightQuantization> qt = QuantizeWeight(t, 4);
  ASSERT_TRUE(qt.ok());
  absl::StatusOr<WeightQuantization> qtc = QuantizeWeight(t.contiguous(), 4);
  ASSERT_TRUE(qtc.ok());
  EXPECT_TRUE(torch::equal(qt->dequantized, qtc->dequantized));

  // Double weights come back as doubles.
  absl::StatusOr<WeightQuantization> qd =
      QuantizeWeight(torch::randn({3, 4}, torch::kDouble), 8);
  ASSERT_TRUE(qd.ok());
  EXPECT_EQ(qd->dequantized.scalar_type(), torch::kDouble);
}

TEST_F(QuantizerTest, BadArgumentsAreInvalidArgument) {
  torch::Tensor w = torch::randn({4, 4});
  for (int bits : {0, -1, 17, 32}) {
    absl::StatusOr<WeightQuantization> q = QuantizeWeight(w, bits);
    ASSERT_FALSE(q.ok()) << bits;
    EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument) << bits;
  }
  EXPECT_EQ(QuantizeWeight(torch::tensor(1.5f), 8).status().code(),
            absl::StatusCode::kInvalidArgument);  // rank 0
  EXPECT_EQ(QuantizeWeight(torch::ones({2, 2}, torch::kInt), 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeWeight(torch::Tensor(), 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(QuantizeWeight(w, 1).ok());
  EXPECT_TRUE(QuantizeWeight(w, 16).ok());
}

TEST_F(QuantizerTest, ActivationParamsTwoBitsByHand) {
  // [0, 6] at 2 bits: scale = 3/6 = 0.5, zp = round(0) + 2 = 2, q in [-2, 1].
  //   7  : round(3.5 - 2) = round(1.5) = 2 -> clamped to 1 -> 6
  //   -1 : round(-0.5 - 2) = round(-2.5) = -2 (half to even) -> 0
  //   others as in TwoBitsByHandPerChannel.
  absl::StatusOr<ActivationQuantization> q = ActivationParams(0.0, 6.0, 2);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->scale, 0.5);
  EXPECT_EQ(q->zero_point, 2.0);
  EXPECT_EQ(q->bits, 2);
  EXPECT_EQ(q->lo, 0.0);
  EXPECT_EQ(q->hi, 6.0);
  torch::Tensor x = T({0, 1, 2, 3, 4, 6, 7, -1});
  EXPECT_THAT(Values(FakeQuantize(x, *q)), ElementsAre(0, 0, 2, 4, 4, 6, 6, 0));
}

TEST_F(QuantizerTest, ActivationParamsEightBitsByHand) {
  // [-2, 127/64] at 8 bits: scale = 64, zp = 0 (see EightBitsByHand);
  // outside the range values clamp to the ends.
  absl::StatusOr<ActivationQuantization> q =
      ActivationParams(-2.0, 127.0 / 64, 8);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->scale, 64.0);
  EXPECT_EQ(q->zero_point, 0.0);
  torch::Tensor x = T({-3.0f, -2.0f, 0.1f, 32.5f / 64, 33.5f / 64, 2.5f});
  EXPECT_THAT(Values(FakeQuantize(x, *q)),
              ElementsAre(-2.0f, -2.0f, 0.09375f, 0.5f, 0.53125f, 1.984375f));

  // [0, 6] at 8 bits: scale = 255/6 = 42.5, zp = 128.
  absl::StatusOr<ActivationQuantization> r = ActivationParams(0.0, 6.0, 8);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scale, 42.5);
  EXPECT_EQ(r->zero_point, 128.0);
  // 6 -> round(255 - 128) = 127 -> 255 / 42.5 = 6; 3 -> round(127.5 - 128)
  // = round(-0.5) = -0 -> 128 / 42.5.
  EXPECT_THAT(Values(FakeQuantize(T({6.0f, 3.0f, 0.0f}), *r)),
              ElementsAre(6.0f, static_cast<float>(128.0f / 42.5f), 0.0f));
}

TEST_F(QuantizerTest, FakeQuantizeMatchesWeightQuantizerOnOneChannel) {
  torch::manual_seed(15);
  torch::Tensor x = torch::randn({1, 500}) * 2 + 0.3;
  for (int bits : {2, 4, 8}) {
    absl::StatusOr<WeightQuantization> w = QuantizeWeight(x, bits);
    ASSERT_TRUE(w.ok());
    absl::StatusOr<ActivationQuantization> a =
        ActivationParams(x.min().item<float>(), x.max().item<float>(), bits);
    ASSERT_TRUE(a.ok());
    EXPECT_FLOAT_EQ(static_cast<float>(a->scale), w->scale.item<float>());
    EXPECT_EQ(a->zero_point, w->zero_point.item<float>());
    EXPECT_TRUE(
        torch::allclose(FakeQuantize(x, *a), w->dequantized, 1e-6, 1e-6))
        << bits;
  }
}

TEST_F(QuantizerTest, ActivationParamsDegenerateRangeIsFinite) {
  absl::StatusOr<ActivationQuantization> q = ActivationParams(0.0, 0.0, 8);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(std::isfinite(q->scale));
  EXPECT_TRUE(std::isfinite(q->zero_point));
  torch::Tensor y = FakeQuantize(T({0.0f, 0.0f}), *q);
  EXPECT_THAT(Values(y), ElementsAre(0.0f, 0.0f));
}

TEST_F(QuantizerTest, ActivationParamsBadArguments) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(ActivationParams(1.0, 0.0, 8).status().code(),
            absl::StatusCode::kInvalidArgument);  // hi < lo
  EXPECT_EQ(ActivationParams(0.0, inf, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ActivationParams(nan, 1.0, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ActivationParams(0.0, 1.0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ActivationParams(0.0, 1.0, 17).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A heavy-tailed non-negative tensor (as after a ReLU): a few large values
// stretch min/max so that 4 bits leave the bulk with one or two levels; the
// search clips below the max, keeps 0 as the bottom, and has no more error
// than min/max on the same values.
TEST_F(QuantizerTest, MseRangeClipsAHeavyTailBelowItsMax) {
  torch::manual_seed(7);
  torch::Tensor x = torch::randn({20000}).abs();
  x.index_put_({torch::arange(0, 20000, 7000)}, 40.0);  // 3 outliers
  const double lo = x.min().item<double>(), hi = x.max().item<double>();
  absl::StatusOr<ActivationQuantization> minmax = ActivationParams(lo, hi, 4);
  absl::StatusOr<ActivationQuantization> mse =
      MseActivationParams(x, lo, hi, 4);
  ASSERT_TRUE(minmax.ok()) << minmax.status();
  ASSERT_TRUE(mse.ok()) << mse.status();
  EXPECT_LT(mse->hi, 0.5 * hi);
  EXPECT_GT(mse->hi, 0.0);
  EXPECT_EQ(mse->lo, lo);
  EXPECT_EQ(mse->bits, 4);
  const double e_mse = QuantizationMse(x, *mse);
  const double e_minmax = QuantizationMse(x, *minmax);
  EXPECT_LE(e_mse, e_minmax);
  EXPECT_LT(e_mse, 0.5 * e_minmax);
  // It is the best of its grid: every other candidate is no better.
  for (int i = 1; i <= 100; ++i) {
    const double a = i / 100.0;
    ActivationQuantization q = *ActivationParams(lo, a * hi, 4);
    EXPECT_GE(QuantizationMse(x, q), e_mse) << a;
  }
}

// Signed heavy tails (the input of a layer): both ends move towards 0.
TEST_F(QuantizerTest, MseRangeClipsBothEndsOfASignedTensor) {
  torch::manual_seed(8);
  torch::Tensor x = torch::randn({20000});
  x[0] = -30.0;
  x[1] = 30.0;
  const double lo = x.min().item<double>(), hi = x.max().item<double>();
  absl::StatusOr<ActivationQuantization> mse =
      MseActivationParams(x, lo, hi, 4);
  ASSERT_TRUE(mse.ok()) << mse.status();
  EXPECT_LT(mse->lo, 0.0);
  EXPECT_GT(mse->lo, 0.5 * lo);
  EXPECT_LT(mse->hi, 0.5 * hi);
  EXPECT_LE(QuantizationMse(x, *mse),
            QuantizationMse(x, *ActivationParams(lo, hi, 4)));
}

// Values on min/max's own grid quantize exactly; any clip is worse, and the
// search keeps min/max.
TEST_F(QuantizerTest, MseRangeKeepsMinMaxWhenClippingCannotHelp) {
  torch::Tensor x = torch::arange(0, 16, torch::kFloat).repeat({10});
  absl::StatusOr<ActivationQuantization> mse = MseActivationParams(x, 0, 15, 4);
  ASSERT_TRUE(mse.ok()) << mse.status();
  EXPECT_EQ(mse->lo, 0.0);
  EXPECT_EQ(mse->hi, 15.0);
  EXPECT_EQ(QuantizationMse(x, *mse), 0.0);
}

TEST_F(QuantizerTest, MseRangeBadInputsAreInvalidArgument) {
  torch::Tensor x = torch::rand({100});
  EXPECT_EQ(MseActivationParams(torch::Tensor(), 0, 1, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MseActivationParams(torch::zeros({0}), 0, 1, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MseActivationParams(torch::arange(5), 0, 4, 4).status().code(),
            absl::StatusCode::kInvalidArgument);  // integers
  EXPECT_EQ(MseActivationParams(x, 0, 1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MseActivationParams(x, 1, 0, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MseActivationParams(x, 0, 1, 4, /*candidates=*/0).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A constant tensor: a zero-width range, nothing to clip.
  absl::StatusOr<ActivationQuantization> flat =
      MseActivationParams(torch::zeros({10}), 0, 0, 4);
  ASSERT_TRUE(flat.ok()) << flat.status();
  EXPECT_EQ(flat->hi, 0.0);
}

}  // namespace
}  // namespace zeroq::core
