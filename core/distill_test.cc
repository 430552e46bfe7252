// Tests of ZeroQ data distillation: the BN-statistics loss itself (against
// values computed by running the original modules), its closed-form gradient
// (against autograd), and Distill's results, determinism, progress,
// cancellation and option checks.
#include "core/distill.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::ElementsAre;

// Small, fast settings; the reference's lr and scheduler.
DistillOptions FastOptions(int iterations, int batch_size) {
  DistillOptions o;
  o.iterations = iterations;
  o.batch_size = batch_size;
  return o;
}

// Mean absolute error of the measured per-channel mean and std against the
// BN targets, averaged over every channel of every BN layer.
struct StatsError {
  double mean = 0, std = 0;
};
StatsError Error(const std::vector<BnStatisticsLoss::LayerStats>& stats) {
  StatsError e;
  int64_t n = 0;
  for (const auto& s : stats) {
    e.mean += (s.mean - s.target_mean).abs().sum().item<double>();
    e.std += (s.std - s.target_std).abs().sum().item<double>();
    n += s.mean.numel();
  }
  e.mean /= n;
  e.std /= n;
  return e;
}

class DistillTest : public ::testing::Test {
 protected:
  // One intra-op thread: the models are tiny, and OpenMP threads that spin
  // at barriers slow down by orders of magnitude when other processes (a
  // parallel build) share the cores.
  void SetUp() override { at::set_num_threads(1); }

  static std::unique_ptr<Model> Load(const std::string& file) {
    return LoadTestModel(file);
  }
};

// What a test needs to replay a distillation step by step: the starting
// noise (Distill after 0 iterations) as a leaf that wants its gradient,
// Distill's own result after `steps` iterations from that noise, and the
// loss to replay them with.
struct Replay {
  torch::Tensor start;
  DistilledData data;
  std::unique_ptr<BnStatisticsLoss> loss;
};
absl::StatusOr<Replay> DistillForReplay(const Model& model,
                                        DistillOptions options, int steps) {
  Replay r;
  options.iterations = 0;
  ZQ_ASSIGN_OR_RETURN(DistilledData noise,
                      Distill(model, {1, 28, 28}, options));
  r.start = noise.batches[0].clone().set_requires_grad(true);
  options.iterations = steps;
  ZQ_ASSIGN_OR_RETURN(r.data, Distill(model, {1, 28, 28}, options));
  ZQ_ASSIGN_OR_RETURN(r.loss, BnStatisticsLoss::Create(model, options));
  return r;
}

// The per-sample loss of ZEROQ.md section 1 for one value:
// (||mu - m||^2 + ||sigma - s||^2) / batch, with m, s over H*W per sample.
torch::Tensor PerSampleTerm(const torch::Tensor& v, const torch::Tensor& mu,
                            const torch::Tensor& sigma, double eps) {
  torch::Tensor m = v.mean({2, 3});
  torch::Tensor s = torch::sqrt(v.var({2, 3}, /*unbiased=*/true) + eps);
  return ((mu.unsqueeze(0) - m).pow(2).sum() +
          (sigma.unsqueeze(0) - s).pow(2).sum()) /
         v.size(0);
}

// tiny_nobn_after_conv: pre (no BN) -> relu -> conv1 -> bn1 -> relu -> conv2
// -> bn2. The BN inputs must be conv1's and conv2's outputs, and the targets
// bn1's and bn2's running statistics (with eps 1e-6, not the BN's 1e-5).
TEST_F(DistillTest, LossFollowsTheRealBatchNormInputs) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  torch::jit::Module m = torch::jit::load(ModelPath("tiny_nobn_after_conv.pt"));
  m.eval();
  auto sub = [&](const char* name) { return m.attr(name).toModule(); };
  auto buffer = [&](const char* bn, const char* field) {
    return sub(bn).attr(field).toTensor();
  };

  torch::manual_seed(21);
  torch::Tensor x = torch::randn({4, 3, 16, 16}) * 0.7 + 0.2;
  torch::Tensor c1, c2;
  {
    torch::NoGradGuard no_grad;
    c1 = sub("conv1")
             .forward({torch::relu(sub("pre").forward({x}).toTensor())})
             .toTensor();
    torch::Tensor b1 = torch::relu(sub("bn1").forward({c1}).toTensor());
    c2 = sub("conv2").forward({b1}).toTensor();
  }
  const double eps = 1e-6;
  torch::Tensor mu1 = buffer("bn1", "running_mean");
  torch::Tensor mu2 = buffer("bn2", "running_mean");
  torch::Tensor sd1 = torch::sqrt(buffer("bn1", "running_var") + eps);
  torch::Tensor sd2 = torch::sqrt(buffer("bn2", "running_var") + eps);

  DistillOptions options;  // per-sample statistics, input term on
  options.tv_weight = 0;   // the reference's loss
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> loss =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(loss.ok()) << loss.status();

  absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>> stats =
      (*loss)->Measure(x);
  ASSERT_TRUE(stats.ok()) << stats.status();
  ASSERT_EQ(stats->size(), 2u);
  EXPECT_TRUE(torch::allclose((*stats)[0].target_mean, mu1));
  EXPECT_TRUE(torch::allclose((*stats)[0].target_std, sd1));
  EXPECT_TRUE(torch::allclose((*stats)[1].target_mean, mu2));
  EXPECT_TRUE(torch::allclose((*stats)[1].target_std, sd2));
  // Measure: per channel over the whole batch.
  EXPECT_TRUE(
      torch::allclose((*stats)[0].mean, c1.mean({0, 2, 3}), 1e-4, 1e-5));
  EXPECT_TRUE(torch::allclose(
      (*stats)[0].std,
      torch::sqrt(c1.transpose(0, 1).reshape({8, -1}).var(1, true) + eps), 1e-4,
      1e-5));
  EXPECT_TRUE(
      torch::allclose((*stats)[1].mean, c2.mean({0, 2, 3}), 1e-4, 1e-5));

  const double want =
      (PerSampleTerm(c1, mu1, sd1, eps) + PerSampleTerm(c2, mu2, sd2, eps) +
       PerSampleTerm(x, torch::zeros({3}), torch::ones({3}), eps))
          .item<double>();
  absl::StatusOr<double> got = (*loss)->Evaluate(x);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_NEAR(*got, want, 1e-4 * std::abs(want));

  // Without the input term.
  options.match_input_stats = false;
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> no_input =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(no_input.ok());
  absl::StatusOr<double> got2 = (*no_input)->Evaluate(x);
  ASSERT_TRUE(got2.ok());
  const double want2 =
      (PerSampleTerm(c1, mu1, sd1, eps) + PerSampleTerm(c2, mu2, sd2, eps))
          .item<double>();
  EXPECT_NEAR(*got2, want2, 1e-4 * std::abs(want2));

  // With the image prior: plus the weight times the mean absolute difference
  // between neighbours along W, plus the same along H.
  options.tv_weight = 3.5;
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> with_prior =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(with_prior.ok());
  absl::StatusOr<double> got3 = (*with_prior)->Evaluate(x);
  ASSERT_TRUE(got3.ok());
  const double tv = (torch::diff(x, 1, 3).abs().sum() / (4 * 3 * 16 * 15) +
                     torch::diff(x, 1, 2).abs().sum() / (4 * 3 * 15 * 16))
                        .item<double>();
  EXPECT_GT(tv, 0.5);
  EXPECT_NEAR(*got3, want2 + 3.5 * tv, 1e-4 * (want2 + 3.5 * tv));
}

TEST_F(DistillTest, PerBatchLossByHand) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options;
  options.stats = DistillStats::kPerBatch;
  options.match_input_stats = false;
  options.tv_weight = 0;
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> loss =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(loss.ok()) << loss.status();
  torch::manual_seed(22);
  torch::Tensor x = torch::randn({3, 3, 16, 16});
  absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>> stats =
      (*loss)->Measure(x);
  ASSERT_TRUE(stats.ok());
  // Per batch: sum over layers of ||mu - m||^2 + ||sigma - s||^2 with the
  // whole-batch statistics Measure reports, not divided by the batch.
  double want = 0;
  for (const auto& s : *stats) {
    want += ((s.target_mean - s.mean).pow(2).sum() +
             (s.target_std - s.std).pow(2).sum())
                .item<double>();
  }
  absl::StatusOr<double> got = (*loss)->Evaluate(x);
  ASSERT_TRUE(got.ok());
  EXPECT_NEAR(*got, want, 1e-4 * want);
}

// LossAndBackward computes the gradient in closed form; it must be what
// autograd gives for Loss(): the value, the gradient (on a leaf with
// `base`'s layout), and that a second call accumulates.
void ExpectClosedFormMatchesAutograd(const Model& model,
                                     const DistillOptions& options,
                                     const torch::Tensor& base) {
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> loss =
      BnStatisticsLoss::Create(model, options);
  ASSERT_TRUE(loss.ok()) << loss.status();

  torch::Tensor a = base.contiguous().clone().set_requires_grad(true);
  torch::Tensor value = (*loss)->Loss(a);
  value.backward();
  torch::Tensor want = a.grad().clone();

  torch::Tensor b = base.clone().set_requires_grad(true);  // same strides
  torch::Tensor value2 = (*loss)->LossAndBackward(b);
  ASSERT_TRUE(b.grad().defined());
  EXPECT_NEAR(value2.item<double>(), value.item<double>(),
              1e-4 * std::abs(value.item<double>()));
  EXPECT_FALSE(value2.requires_grad());
  const double scale = want.abs().max().item<double>();
  EXPECT_GT(scale, 0);
  EXPECT_TRUE(torch::allclose(b.grad(), want, 1e-3, 1e-4 * scale))
      << "max diff " << (b.grad() - want).abs().max().item<double>()
      << " of max " << scale;
  // Accumulates, like backward().
  (*loss)->LossAndBackward(b);
  EXPECT_TRUE(torch::allclose(b.grad(), 2 * want, 1e-3, 2e-4 * scale));
}

// The same with per-sample and with per-batch statistics.
void ExpectClosedFormMatchesAutogradForBothStats(const Model& model,
                                                 const torch::Tensor& base) {
  for (DistillStats stats :
       {DistillStats::kPerSample, DistillStats::kPerBatch}) {
    SCOPED_TRACE(::testing::Message()
                 << "per_batch=" << (stats == DistillStats::kPerBatch));
    DistillOptions options;
    options.stats = stats;
    ExpectClosedFormMatchesAutograd(model, options, base);
  }
}

// fashion_cnn: every BN input but the last is read by its BN, which
// LossAndBackward replaces by one that also takes the statistics. With and
// without the input's statistics term and the image prior.
TEST_F(DistillTest, ClosedFormGradientMatchesAutograd) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  for (DistillStats stats :
       {DistillStats::kPerSample, DistillStats::kPerBatch}) {
    for (bool input_term : {true, false}) {
      for (double tv_weight : {0.0, kTvWeight.def}) {
        SCOPED_TRACE(::testing::Message()
                     << "per_batch=" << (stats == DistillStats::kPerBatch)
                     << " input_term=" << input_term
                     << " tv_weight=" << tv_weight);
        DistillOptions options;
        options.stats = stats;
        options.match_input_stats = input_term;
        options.tv_weight = tv_weight;
        torch::manual_seed(23);
        ExpectClosedFormMatchesAutograd(*model, options,
                                        torch::randn({4, 1, 28, 28}) * 0.5);
      }
    }
  }
}

// The same options without the image prior and with it at `weight`.
std::pair<DistillOptions, DistillOptions> WithoutAndWithPrior(
    DistillOptions options, double weight) {
  options.tv_weight = 0;
  DistillOptions with = options;
  with.tv_weight = weight;
  return {options, with};
}

// The image prior's gradient alone (the difference between the losses with
// and without it): each difference's sign times the weight over the count of
// differences, into the later element and out of the earlier one, with 0
// where neighbours are equal (a flat row here).
TEST_F(DistillTest, ImagePriorGradientIsTheSignOfEachDifference) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  const auto [without, with] = WithoutAndWithPrior(FastOptions(0, 2), 2.0);
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> a =
      BnStatisticsLoss::Create(*model, without);
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> b =
      BnStatisticsLoss::Create(*model, with);
  ASSERT_TRUE(a.ok() && b.ok());
  torch::manual_seed(24);
  torch::Tensor base = torch::randn({2, 3, 16, 16});
  base.index_put_({0, 0, 5}, 0.25);  // a flat row: equal neighbours along W

  torch::Tensor xa = base.clone().set_requires_grad(true);
  torch::Tensor xb = base.clone().set_requires_grad(true);
  const double la = (*a)->LossAndBackward(xa).item<double>();
  const double lb = (*b)->LossAndBackward(xb).item<double>();
  torch::Tensor got = xb.grad() - xa.grad();

  torch::Tensor want = torch::zeros_like(base);
  double tv = 0;
  for (int64_t d : {2, 3}) {
    torch::Tensor diff = torch::diff(base, 1, d);
    const double count = static_cast<double>(diff.numel());
    tv += diff.abs().sum().item<double>() / count;
    torch::Tensor s = diff.sign() * (2.0 / count);
    want.narrow(d, 1, 15) += s;
    want.narrow(d, 0, 15) -= s;
  }
  EXPECT_NEAR(lb - la, 2.0 * tv, 1e-4 * tv);
  const double scale = want.abs().max().item<double>();
  EXPECT_TRUE(torch::allclose(got, want, 1e-3, 1e-3 * scale))
      << "max diff " << (got - want).abs().max().item<double>();
  // The flat row's W differences are exactly 0: their sign adds nothing.
  EXPECT_EQ(torch::diff(base[0][0][5], 1, 0).abs().max().item<double>(), 0.0);
}

// The prior gives flatter images that still match the BatchNorm statistics:
// fashion_cnn distilled with and without it from the same noise.
TEST_F(DistillTest, ImagePriorFlattensTheDistilledImages) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  const auto [reference, prior] =
      WithoutAndWithPrior(FastOptions(100, 16), kTvWeight.def);
  absl::StatusOr<DistilledData> plain = Distill(*model, {1, 28, 28}, reference);
  absl::StatusOr<DistilledData> flat = Distill(*model, {1, 28, 28}, prior);
  ASSERT_TRUE(plain.ok() && flat.ok());
  auto tv = [](const torch::Tensor& x) {
    return (torch::diff(x, 1, 3).abs().mean() +
            torch::diff(x, 1, 2).abs().mean())
        .item<double>();
  };
  const double tv_plain = tv(plain->batches[0]);
  const double tv_flat = tv(flat->batches[0]);
  RecordProperty("tv_ratio", std::to_string(tv_flat / tv_plain));
  EXPECT_LT(tv_flat, 0.75 * tv_plain) << tv_plain << " -> " << tv_flat;
  // Both losses report the objective they minimised: the prior's includes
  // the weighted total variation.
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> bn =
      BnStatisticsLoss::Create(*model, reference);
  ASSERT_TRUE(bn.ok());
  absl::StatusOr<double> bn_flat = (*bn)->Evaluate(flat->batches[0]);
  ASSERT_TRUE(bn_flat.ok());
  EXPECT_NEAR(flat->final_loss[0], *bn_flat + prior.tv_weight * tv_flat,
              1e-3 * flat->final_loss[0]);
  // The statistics are still matched: the BN loss fell by an order of
  // magnitude from the noise's.
  EXPECT_LT(*bn_flat, flat->initial_loss[0] / 10)
      << flat->initial_loss[0] << " -> " << *bn_flat;
}

// With two threads the kernels split the rows of the larger BN inputs
// ([8, 16, 28, 28] here) between them.
TEST_F(DistillTest, ClosedFormGradientOnTwoThreads) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  at::set_num_threads(2);
  torch::manual_seed(29);
  ExpectClosedFormMatchesAutograd(*model, DistillOptions(),
                                  torch::randn({8, 1, 28, 28}) * 0.5);
  at::set_num_threads(1);
}

TEST_F(DistillTest, ClosedFormGradientOfANonContiguousBatch) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  torch::manual_seed(25);
  torch::Tensor base = torch::randn({28, 28, 1, 4}).permute({3, 2, 0, 1});
  ASSERT_FALSE(base.is_contiguous());
  ExpectClosedFormMatchesAutograd(*model, DistillOptions(), base * 0.5);
}

// In double the kernels do not apply: the BNs stay tensor ops, the moments
// and gradients too, and the terms go in through autograd hooks.
TEST_F(DistillTest, ClosedFormGradientOfADoubleModel) {
  if (TestDevice() != "cpu") GTEST_SKIP() << "a CPU model";
  torch::jit::Module m = torch::jit::load(ModelPath("tiny_nobn_after_conv.pt"));
  m.to(torch::kDouble);
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::FromModule(m, torch::kCPU);
  ASSERT_TRUE(model.ok()) << model.status();
  torch::manual_seed(26);
  ExpectClosedFormMatchesAutogradForBothStats(
      **model, torch::randn({3, 3, 16, 16}, torch::kDouble) * 0.7 + 0.2);
}

// A value read by two BNs keeps them (its terms go in through hooks on its
// grad_fn); the third BN is replaced; the last BN input has no spatial
// extent ([N, C]: statistics over the batch).
TEST_F(DistillTest, ClosedFormGradientWhenAValueFeedsTwoBatchNorms) {
  if (TestDevice() != "cpu") GTEST_SKIP() << "a CPU model";
  torch::manual_seed(27);
  torch::jit::Module m("TwoBatchNormsOnOneValue");
  m.register_buffer("w1", torch::randn({6, 3, 3, 3}) * 0.3);
  m.register_buffer("w2", torch::randn({4, 6, 3, 3}) * 0.3);
  for (const auto& [bn, c] : std::vector<std::pair<std::string, int64_t>>{
           {"a", 6}, {"b", 6}, {"c", 4}, {"d", 4}}) {
    m.register_buffer("g" + bn, torch::rand({c}) + 0.5);
    m.register_buffer("b" + bn, torch::randn({c}) * 0.1);
    m.register_buffer("m" + bn, torch::randn({c}) * 0.2);
    m.register_buffer("v" + bn, torch::rand({c}) + 0.5);
  }
  m.define(R"JIT(
    def forward(self, x):
        v = torch.conv2d(x, self.w1, None, [1, 1], [1, 1])
        a = torch.batch_norm(v, self.ga, self.ba, self.ma, self.va,
                             False, 0.1, 1e-5, False)
        b = torch.batch_norm(v, None, None, self.mb, self.vb,
                             False, 0.1, 1e-5, False)
        w = torch.conv2d(torch.relu(a) + b, self.w2, None, [2, 2], [1, 1])
        c = torch.batch_norm(w, self.gc, self.bc, self.mc, self.vc,
                             False, 0.1, 1e-5, False)
        p = torch.relu(c).mean([2, 3])
        return torch.batch_norm(p, self.gd, self.bd, self.md, self.vd,
                                False, 0.1, 1e-5, False)
  )JIT");
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::FromModule(m, torch::kCPU);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_EQ((*model)->summary().bn_layers.size(), 4u);
  torch::manual_seed(28);
  ExpectClosedFormMatchesAutogradForBothStats(**model,
                                              torch::randn({5, 3, 12, 12}));
}

// On the trained models, at the reference's starting noise and along the
// path Adam takes from it on autograd's gradient of Loss() (the default
// rate: the first steps are the large ones), LossAndBackward gives Loss()
// and its gradient at every point: every BN input's term included once and
// at its scale, whether its BN reads it (MobileNetV2's residual adds and
// ReLU6s behind the fused BatchNorms) or it starts the backward. The
// gradients are compared by the norm of their difference: the fused
// BatchNorm need not round its output as ATen's does, so now and then a
// ReLU or ReLU6 input within rounding of its kink goes the other way and
// changes the gradient of a few pixels (by up to about 1% of the norm); a
// term missing or off by 10% changes it at every point. Distill's own
// steps (its Adam, its learning rate) end where this path does.
TEST_F(DistillTest, ClosedFormGradientAlongADistillationOfTrainedModels) {
  constexpr int kSteps = 12;
  for (const char* file : {"fashion_mobilenet_v2.pt", "fashion_resnet.pt"}) {
    SCOPED_TRACE(file);
    std::unique_ptr<Model> model = Load(file);
    ASSERT_NE(model, nullptr);
    const DistillOptions options = FastOptions(0, 8);
    absl::StatusOr<Replay> r = DistillForReplay(*model, options, kSteps);
    ASSERT_TRUE(r.ok()) << r.status();
    torch::Tensor x = r->start;
    torch::optim::Adam adam({x}, torch::optim::AdamOptions(options.lr));
    int rough = 0;  // points where a kink may have gone the other way
    for (int it = 0; it < kSteps; ++it) {
      SCOPED_TRACE(::testing::Message() << "step " << it);
      adam.zero_grad();
      torch::Tensor value = r->loss->Loss(x);
      value.backward();
      const torch::Tensor want = x.grad();

      torch::Tensor b = x.detach().clone().set_requires_grad(true);
      const double got = r->loss->LossAndBackward(b).item<double>();
      ASSERT_TRUE(b.grad().defined());
      const double expected = value.item<double>();
      EXPECT_NEAR(got, expected, 1e-5 * expected);
      const double error =
          ((b.grad() - want).norm() / want.norm()).item<double>();
      EXPECT_LT(error, 2e-2);
      if (error > 1e-4) ++rough;
      adam.step();
    }
    EXPECT_LE(rough, kSteps / 4);
    absl::StatusOr<double> reached = r->loss->Evaluate(x.detach());
    ASSERT_TRUE(reached.ok()) << reached.status();
    EXPECT_LT(*reached, r->data.initial_loss[0] / 2);
    EXPECT_NEAR(r->data.final_loss[0], *reached, 2e-3 * *reached);
  }
}

// Distill's optimiser is torch::optim::Adam, step for step.
TEST_F(DistillTest, DistillStepsAreTorchAdamSteps) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  constexpr int kSteps = 5;
  DistillOptions options = FastOptions(0, 8);
  options.plateau_scheduler = false;
  absl::StatusOr<Replay> r = DistillForReplay(*model, options, kSteps);
  ASSERT_TRUE(r.ok()) << r.status();
  torch::Tensor x = r->start;
  torch::optim::Adam adam({x}, torch::optim::AdamOptions(options.lr));
  for (int it = 0; it < kSteps; ++it) {
    adam.zero_grad();
    r->loss->LossAndBackward(x);
    adam.step();
  }
  const double scale = x.abs().max().item<double>();
  EXPECT_TRUE(
      torch::allclose(r->data.batches[0], x.detach(), 1e-4, 1e-5 * scale))
      << "max diff "
      << (r->data.batches[0] - x.detach()).abs().max().item<double>()
      << " of max " << scale;
}

TEST_F(DistillTest, DistilledFashionDataMatchesBatchNormStatistics) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(100, 16);
  absl::StatusOr<DistilledData> data = Distill(*model, {1, 28, 28}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->batches.size(), 1u);
  ASSERT_EQ(data->initial_loss.size(), 1u);
  ASSERT_EQ(data->final_loss.size(), 1u);

  // The starting noise is what Distill returns after 0 iterations.
  options.iterations = 0;
  absl::StatusOr<DistilledData> noise = Distill(*model, {1, 28, 28}, options);
  ASSERT_TRUE(noise.ok()) << noise.status();

  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> loss =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(loss.ok());
  absl::StatusOr<double> before = (*loss)->Evaluate(noise->batches[0]);
  absl::StatusOr<double> after = (*loss)->Evaluate(data->batches[0]);
  ASSERT_TRUE(before.ok() && after.ok());
  EXPECT_NEAR(data->initial_loss[0], *before, 1e-4 * *before);
  EXPECT_NEAR(data->final_loss[0], *after, 1e-4 * *after + 1e-9);
  RecordProperty("loss_ratio", std::to_string(*before / *after));
  EXPECT_GT(*before, 10.0 * *after) << "loss " << *before << " -> " << *after;

  absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>> s0 =
      (*loss)->Measure(noise->batches[0]);
  absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>> s1 =
      (*loss)->Measure(data->batches[0]);
  ASSERT_TRUE(s0.ok() && s1.ok());
  ASSERT_EQ(s1->size(), 5u);  // fashion_cnn has 5 BNs
  StatsError e0 = Error(*s0), e1 = Error(*s1);
  RecordProperty("mean_error_ratio", std::to_string(e0.mean / e1.mean));
  RecordProperty("std_error_ratio", std::to_string(e0.std / e1.std));
  EXPECT_LT(e1.mean, 0.5 * e0.mean) << e0.mean << " -> " << e1.mean;
  EXPECT_LT(e1.std, 0.5 * e0.std) << e0.std << " -> " << e1.std;
  // Every layer individually gets closer to its targets.
  for (size_t i = 0; i < s1->size(); ++i) {
    StatsError a = Error({(*s0)[i]}), b = Error({(*s1)[i]});
    EXPECT_LT(b.mean + b.std, a.mean + a.std) << "BN " << i;
  }
}

TEST_F(DistillTest, DistilledTinyModelMatchesBatchNormStatistics) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(60, 8);
  // The reference's loss: this model's statistics loss is small against the
  // image prior at its default weight, and 60 steps at the full learning rate
  // would leave the prior's term far from converged.
  options.tv_weight = 0;
  absl::StatusOr<DistilledData> data = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  RecordProperty("loss_ratio",
                 std::to_string(data->initial_loss[0] / data->final_loss[0]));
  EXPECT_GT(data->initial_loss[0], 20.0 * data->final_loss[0])
      << data->initial_loss[0] << " -> " << data->final_loss[0];
  options.iterations = 0;
  absl::StatusOr<DistilledData> noise = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(noise.ok());
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> loss =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(loss.ok());
  absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>> s0 =
      (*loss)->Measure(noise->batches[0]);
  absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>> s1 =
      (*loss)->Measure(data->batches[0]);
  ASSERT_TRUE(s0.ok() && s1.ok());
  StatsError e0 = Error(*s0), e1 = Error(*s1);
  EXPECT_LT(e1.mean, e0.mean);
  EXPECT_LT(e1.std, e0.std);
}

TEST_F(DistillTest, ReferenceInitIsTinyUniformIntegerNoise) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(0, 8);
  absl::StatusOr<DistilledData> data = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  // (randint(0, 255) - 127.5) / 5418.75: undo it and get integers 0..254.
  torch::Tensor k = data->batches[0].to(torch::kDouble) * 5418.75 + 127.5;
  EXPECT_TRUE(torch::allclose(k, k.round(), 0, 1e-3));
  EXPECT_GE(k.min().item<double>(), -1e-3);
  EXPECT_LE(k.max().item<double>(), 254 + 1e-3);
  EXPECT_GT(k.max().item<double>(), 240);  // spread over the whole range
  EXPECT_LT(k.min().item<double>(), 14);
  // No iterations: the final loss is the initial one.
  EXPECT_DOUBLE_EQ(data->initial_loss[0], data->final_loss[0]);
}

TEST_F(DistillTest, GaussianInitIsStandardNormal) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(0, 16);
  options.init = DistillInit::kGaussian;
  absl::StatusOr<DistilledData> data = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  const torch::Tensor& x = data->batches[0];
  EXPECT_NEAR(x.mean().item<double>(), 0.0, 0.05);
  EXPECT_NEAR(x.std().item<double>(), 1.0, 0.05);
}

TEST_F(DistillTest, ShapeAndBatches) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(5, 4);
  options.num_batches = 3;
  absl::StatusOr<DistilledData> data = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->batches.size(), 3u);
  EXPECT_EQ(data->initial_loss.size(), 3u);
  EXPECT_EQ(data->final_loss.size(), 3u);
  for (const torch::Tensor& b : data->batches) {
    EXPECT_THAT(b.sizes().vec(), ElementsAre(4, 3, 16, 16));
    EXPECT_FALSE(b.requires_grad());
    EXPECT_EQ(b.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::isfinite(b).all().item<bool>());
  }
  // Each batch starts from its own noise.
  EXPECT_FALSE(torch::equal(data->batches[0], data->batches[1]));
  EXPECT_FALSE(torch::equal(data->batches[1], data->batches[2]));
  // Other spatial sizes work (adaptive pooling).
  absl::StatusOr<DistilledData> small = Distill(*model, {3, 8, 12}, options);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_THAT(small->batches[0].sizes().vec(), ElementsAre(4, 3, 8, 12));
}

TEST_F(DistillTest, SameSeedSameDataDifferentSeedDifferentData) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(20, 4);
  options.num_batches = 2;
  options.seed = 42;
  absl::StatusOr<DistilledData> a = Distill(*model, {3, 16, 16}, options);
  absl::StatusOr<DistilledData> b = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(a.ok() && b.ok());
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(torch::equal(a->batches[i], b->batches[i])) << "batch " << i;
    EXPECT_EQ(a->final_loss[i], b->final_loss[i]);
  }
  options.seed = 43;
  absl::StatusOr<DistilledData> c = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(torch::equal(a->batches[0], c->batches[0]));
  EXPECT_FALSE(torch::equal(a->batches[1], c->batches[1]));
}

TEST_F(DistillTest, ProgressIsCalledEveryIterationOfEveryBatch) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(7, 4);
  options.num_batches = 2;
  std::vector<DistillProgress> events;
  absl::StatusOr<DistilledData> data =
      Distill(*model, {3, 16, 16}, options,
              [&](const DistillProgress& p) { events.push_back(p); });
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(events.size(), 14u);
  for (size_t i = 0; i < events.size(); ++i) {
    const DistillProgress& p = events[i];
    EXPECT_EQ(p.batch, static_cast<int>(i / 7)) << i;
    EXPECT_EQ(p.iteration, static_cast<int>(i % 7) + 1) << i;
    EXPECT_EQ(p.num_batches, 2);
    EXPECT_EQ(p.iterations, 7);
    EXPECT_TRUE(std::isfinite(p.loss)) << i;
    EXPECT_GT(p.loss, 0) << i;
    EXPECT_DOUBLE_EQ(p.lr, 0.5) << i;  // patience 100: no drop in 7 steps
  }
  // The first event's loss is the loss at the starting noise.
  EXPECT_NEAR(events[0].loss, data->initial_loss[0],
              1e-5 * data->initial_loss[0]);
  EXPECT_NEAR(events[7].loss, data->initial_loss[1],
              1e-5 * data->initial_loss[1]);
}

// The early-stop rule on synthetic losses: geometric decrease, then flat.
TEST(ConvergenceCheckTest, StopsWithinTheWindowOnceConvergedNeverBefore) {
  const int window = 20;
  const double tolerance = 0.01;
  ConvergenceCheck check(window, tolerance);
  const int flat_from = 60;  // iterations 60.. repeat iteration 59's loss
  int stopped = 0;
  for (int t = 1; t <= 500 && stopped == 0; ++t) {
    const double loss = 100.0 * std::pow(0.9, std::min(t, flat_from - 1));
    if (check.Add(loss)) stopped = t;
  }
  // Flat from 59 on: the window's improvement is below 1% once it starts at
  // an iteration where the decrease already was (0.9^k > 0.99 never holds,
  // so only a window that is entirely flat qualifies).
  EXPECT_EQ(stopped, flat_from - 1 + window);
  EXPECT_GT(stopped, window);
}

TEST(ConvergenceCheckTest, FlatFromTheStartStopsRightAfterTheWindow) {
  for (int window : {1, 5, 150}) {
    ConvergenceCheck check(window, 0.01);
    int stopped = 0;
    for (int t = 1; t <= 1000 && stopped == 0; ++t) {
      if (check.Add(7.0)) stopped = t;
    }
    EXPECT_EQ(stopped, window + 1) << window;
  }
}

// A slow but steady decrease (2% per window) never stops at 1%; noise
// above the best (Adam's oscillations) does not count against it.
TEST(ConvergenceCheckTest, SteadyImprovementAndNoiseDoNotStop) {
  const int window = 50;
  ConvergenceCheck check(window, 0.01);
  const double per_step = std::pow(0.98, 1.0 / window);
  for (int t = 1; t <= 2000; ++t) {
    double loss = 10.0 * std::pow(per_step, t);
    if (t % 3 == 0) loss *= 5;  // spikes
    ASSERT_FALSE(check.Add(loss)) << t;
  }
}

TEST(ConvergenceCheckTest, WindowZeroNeverStopsAndNanIsNoImprovement) {
  ConvergenceCheck off(0, 0.5);
  for (int t = 1; t <= 1000; ++t) ASSERT_FALSE(off.Add(1.0)) << t;
  ConvergenceCheck check(3, 0.01);
  EXPECT_FALSE(check.Add(std::nan("")));
  EXPECT_FALSE(check.Add(4.0));
  EXPECT_FALSE(check.Add(std::nan("")));
  EXPECT_FALSE(check.Add(2.0));           // best inf -> 2: not a measure
  EXPECT_FALSE(check.Add(1.0));           // best 4 -> 1 over 3
  EXPECT_FALSE(check.Add(std::nan("")));  // best 4 -> 1
  EXPECT_FALSE(check.Add(1.0));           // best 2 -> 1
  EXPECT_TRUE(check.Add(1.0));            // best 1 -> 1: converged
}

// A real distillation with an early stop ends a batch once converged, and
// its data is exactly what a run of that many iterations gives.
TEST_F(DistillTest, EarlyStopEndsTheBatchWithTheDataOfThatManyIterations) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(300, 4);
  options.num_batches = 2;
  options.early_stop_window = 10;
  options.early_stop_tolerance = 0.05;
  std::vector<DistillProgress> events;
  absl::StatusOr<DistilledData> data =
      Distill(*model, {3, 16, 16}, options,
              [&](const DistillProgress& p) { events.push_back(p); });
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->iterations.size(), 2u);
  size_t first_batch_events = 0;
  for (int b = 0; b < 2; ++b) {
    SCOPED_TRACE(b);
    const int n = data->iterations[b];
    EXPECT_GT(n, options.early_stop_window);
    EXPECT_LT(n, options.iterations);
    std::vector<DistillProgress> batch;
    for (const DistillProgress& p : events) {
      if (p.batch == b) batch.push_back(p);
    }
    ASSERT_EQ(static_cast<int>(batch.size()), n);
    for (int i = 0; i + 1 < n; ++i) EXPECT_FALSE(batch[i].converged) << i;
    EXPECT_TRUE(batch.back().converged);
    EXPECT_EQ(batch.back().iteration, n);
    EXPECT_EQ(batch.back().iterations, options.iterations);
    if (b == 0) first_batch_events = batch.size();
  }
  EXPECT_EQ(events.size(), first_batch_events + data->iterations[1]);

  DistillOptions fixed = options;
  fixed.early_stop_window = 0;
  fixed.iterations = data->iterations[0];
  fixed.num_batches = 1;
  absl::StatusOr<DistilledData> same = Distill(*model, {3, 16, 16}, fixed);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->iterations, std::vector<int>{data->iterations[0]});
  EXPECT_TRUE(torch::equal(same->batches[0], data->batches[0]));
}

TEST_F(DistillTest, WithoutEarlyStopEveryBatchRunsAllIterations) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(12, 4);
  options.num_batches = 2;
  absl::StatusOr<DistilledData> data = Distill(*model, {3, 16, 16}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->iterations, (std::vector<int>{12, 12}));
}

TEST_F(DistillTest, PlateauSchedulerLowersTheRateDownToMinLr) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(60, 4);
  options.plateau_patience = 0;  // drop on every step without improvement
  options.plateau_factor = 0.5;
  options.min_lr = 0.1;
  options.lr = 2.0;  // large: the loss will not improve every step
  std::vector<double> lrs;
  absl::StatusOr<DistilledData> data =
      Distill(*model, {3, 16, 16}, options,
              [&](const DistillProgress& p) { lrs.push_back(p.lr); });
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(lrs.size(), 60u);
  EXPECT_DOUBLE_EQ(lrs.front(), 2.0);
  for (size_t i = 1; i < lrs.size(); ++i) {
    EXPECT_LE(lrs[i], lrs[i - 1]) << i;
    EXPECT_GE(lrs[i], 0.1 - 1e-12) << i;
  }
  EXPECT_LT(lrs.back(), 2.0);

  options.plateau_scheduler = false;
  lrs.clear();
  ASSERT_TRUE(
      Distill(*model, {3, 16, 16}, options, [&](const DistillProgress& p) {
        lrs.push_back(p.lr);
      }).ok());
  for (double lr : lrs) EXPECT_DOUBLE_EQ(lr, 2.0);
}

TEST_F(DistillTest, CancelFromProgressCallback) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(50, 4);
  options.num_batches = 2;
  CancellationToken token;
  int calls = 0;
  absl::StatusOr<DistilledData> data = Distill(
      *model, {3, 16, 16}, options,
      [&](const DistillProgress& p) {
        ++calls;
        if (p.iteration == 3) token.Cancel();
      },
      &token);
  ASSERT_FALSE(data.ok());
  EXPECT_EQ(data.status().code(), absl::StatusCode::kCancelled)
      << data.status();
  EXPECT_LE(calls, 4);  // stops at the next iteration's check
  EXPECT_GE(calls, 3);
}

TEST_F(DistillTest, AlreadyCancelledTokenDoesNoWork) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  CancellationToken token;
  token.Cancel();
  int calls = 0;
  absl::StatusOr<DistilledData> data = Distill(
      *model, {3, 16, 16}, FastOptions(50, 4),
      [&](const DistillProgress&) { ++calls; }, &token);
  ASSERT_FALSE(data.ok());
  EXPECT_EQ(data.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 0);
}

TEST_F(DistillTest, BadOptionsAreInvalidArgument) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  auto code = [&](DistillOptions o) {
    return Distill(*model, {3, 16, 16}, o).status().code();
  };
  const DistillOptions good = FastOptions(1, 2);
  ASSERT_EQ(code(good), absl::StatusCode::kOk);
  DistillOptions o = good;
  o.batch_size = 0;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.lr = 0;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.lr = -0.5;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.lr = std::nan("");
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.num_batches = 0;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.iterations = -1;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.eps = 0;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  o = good;
  o.plateau_factor = 1.0;
  EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument);
  for (double w : {-1.0, 1000.5, std::nan("")}) {
    o = good;
    o.tv_weight = w;
    EXPECT_EQ(code(o), absl::StatusCode::kInvalidArgument) << w;
  }
  o = good;
  o.tv_weight = 0;  // off
  EXPECT_EQ(code(o), absl::StatusCode::kOk);
  // BnStatisticsLoss checks the same options.
  o = good;
  o.batch_size = 0;
  EXPECT_EQ(BnStatisticsLoss::Create(*model, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(DistillTest, ShapeTheModelRejectsIsInvalidArgument) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  absl::StatusOr<DistilledData> data =
      Distill(*model, {4, 16, 16}, FastOptions(1, 2));
  ASSERT_FALSE(data.ok());
  EXPECT_EQ(data.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(data.status().message()),
              ::testing::HasSubstr("channels"));
}

TEST_F(DistillTest, GaussianInitReducesTheLoss) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(60, 8);
  options.init = DistillInit::kGaussian;
  absl::StatusOr<DistilledData> data = Distill(*model, {1, 28, 28}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  RecordProperty("loss_ratio",
                 std::to_string(data->initial_loss[0] / data->final_loss[0]));
  EXPECT_LT(data->final_loss[0], 0.2 * data->initial_loss[0])
      << data->initial_loss[0] << " -> " << data->final_loss[0];
}

TEST_F(DistillTest, PerBatchStatisticsReduceTheLoss) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  DistillOptions options = FastOptions(60, 8);
  options.stats = DistillStats::kPerBatch;
  absl::StatusOr<DistilledData> data = Distill(*model, {1, 28, 28}, options);
  ASSERT_TRUE(data.ok()) << data.status();
  RecordProperty("loss_ratio",
                 std::to_string(data->initial_loss[0] / data->final_loss[0]));
  EXPECT_LT(data->final_loss[0], 0.1 * data->initial_loss[0])
      << data->initial_loss[0] << " -> " << data->final_loss[0];
  // Per-batch matching pulls the whole-batch statistics to the targets.
  absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> loss =
      BnStatisticsLoss::Create(*model, options);
  ASSERT_TRUE(loss.ok());
  options.iterations = 0;
  absl::StatusOr<DistilledData> noise = Distill(*model, {1, 28, 28}, options);
  ASSERT_TRUE(noise.ok());
  auto s0 = (*loss)->Measure(noise->batches[0]);
  auto s1 = (*loss)->Measure(data->batches[0]);
  ASSERT_TRUE(s0.ok() && s1.ok());
  EXPECT_LT(Error(*s1).mean, 0.5 * Error(*s0).mean);
  EXPECT_LT(Error(*s1).std, 0.5 * Error(*s0).std);
}

}  // namespace
}  // namespace zeroq::core
