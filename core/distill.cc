#include "core/distill.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/graph_util.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

// PyTorch's ReduceLROnPlateau with mode "min", relative threshold 1e-4 and no
// cooldown: the learning rate drops by `factor` once the loss has not improved
// for more than `patience` steps, never below `min_lr`.
class PlateauScheduler {
 public:
  PlateauScheduler(double lr, double factor, int patience, double min_lr)
      : lr_(lr), factor_(factor), patience_(patience), min_lr_(min_lr) {}

  // Returns the learning rate for the next step.
  double Step(double loss) {
    if (loss < best_ * (1.0 - kThreshold)) {
      best_ = loss;
      bad_steps_ = 0;
    } else {
      ++bad_steps_;
    }
    if (bad_steps_ > patience_) {
      double next = std::max(lr_ * factor_, min_lr_);
      if (lr_ - next > kEps) lr_ = next;
      bad_steps_ = 0;
    }
    return lr_;
  }
  double lr() const { return lr_; }

 private:
  static constexpr double kThreshold = 1e-4;
  static constexpr double kEps = 1e-8;
  double lr_, factor_;
  int patience_;
  double min_lr_;
  double best_ = std::numeric_limits<double>::infinity();
  int bad_steps_ = 0;
};


// Statistics term for one value against per-channel targets, differentiable
// (for Loss(); LossAndBackward() computes the same value and its gradient in
// closed form).
torch::Tensor StatsTerm(const torch::Tensor& v, const torch::Tensor& mu,
                        const torch::Tensor& sigma, const DistillOptions& o) {
  const int64_t n = v.size(0), c = v.size(1);
  torch::Tensor flat = v.reshape({n, c, -1});
  const int64_t l = flat.size(2);
  // Per sample over H*W (reference); per batch for [N, C] inputs, which
  // have no spatial extent, and when asked.
  const bool per_sample = o.stats == DistillStats::kPerSample && l > 1;
  const int64_t count = per_sample ? l : n * l;
  auto dims = per_sample ? std::vector<int64_t>{2} : std::vector<int64_t>{0, 2};
  torch::Tensor mean = flat.mean(dims, /*keepdim=*/true);
  torch::Tensor centered = flat - mean;
  torch::Tensor var = (centered * centered).sum(dims, /*keepdim=*/true) /
                      static_cast<double>(std::max<int64_t>(count - 1, 1));
  torch::Tensor s = torch::sqrt(var + o.eps);
  torch::Tensor dm = mu.view({1, c, 1}) - mean;
  torch::Tensor ds = sigma.view({1, c, 1}) - s;
  const double norm = per_sample ? 1.0 / n : 1.0;
  return (dm.pow(2).sum() + ds.pow(2).sum()) * norm;
}

}  // namespace

bool ConvergenceCheck::Add(double loss) {
  const double previous =
      best_.empty() ? std::numeric_limits<double>::infinity() : best_.back();
  best_.push_back(std::isnan(loss) ? previous : std::min(previous, loss));
  const int t = static_cast<int>(best_.size());
  if (window_ <= 0 || t <= window_) return false;
  const double before = best_[t - 1 - window_];
  return std::isfinite(before) && before - best_.back() <= tolerance_ * before;
}

absl::Status ValidateDistillOptions(const DistillOptions& o) {
  auto bad = [](absl::string_view field, auto value, absl::string_view want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "distillation option ", field, " = ", value, ": must be ", want));
  };
  if (!kBatchSize.Contains(o.batch_size))
    return bad("batch_size", o.batch_size, kBatchSize.Describe());
  if (!kNumBatches.Contains(o.num_batches))
    return bad("num_batches", o.num_batches, kNumBatches.Describe());
  if (!kIterations.Contains(o.iterations))
    return bad("iterations", o.iterations, kIterations.Describe());
  if (!kLearningRate.Contains(o.lr))
    return bad("lr", o.lr, kLearningRate.Describe());
  if (!kEarlyStopWindow.Contains(o.early_stop_window)) {
    return bad("early_stop_window", o.early_stop_window,
               kEarlyStopWindow.Describe());
  }
  if (!kEarlyStopTolerance.Contains(o.early_stop_tolerance)) {
    return bad("early_stop_tolerance", o.early_stop_tolerance,
               kEarlyStopTolerance.Describe());
  }
  if (!(o.plateau_factor > 0 && o.plateau_factor < 1))
    return bad("plateau_factor", o.plateau_factor, "in (0, 1)");
  if (o.plateau_patience < 0)
    return bad("plateau_patience", o.plateau_patience, ">= 0");
  if (!(o.min_lr >= 0)) return bad("min_lr", o.min_lr, ">= 0");
  if (!(o.eps > 0)) return bad("eps", o.eps, "> 0");
  return absl::OkStatus();
}

struct BnStatisticsLoss::Impl {
  Impl(std::shared_ptr<torch::jit::Graph> g, c10::IValue self)
      : probe(std::move(g), std::move(self)) {}
  GraphProgram probe;
  std::vector<torch::Tensor> target_mean, target_std;
  DistillOptions options;
  // LossAndBackward's per-element targets, counts and weights of all terms
  // concatenated; they depend only on the batch shape, so they are kept.
  struct Constants {
    std::vector<int64_t> batch_shape;
    torch::Tensor mu, sigma, count, norm;
  };
  Constants constants;
};

BnStatisticsLoss::BnStatisticsLoss(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
BnStatisticsLoss::~BnStatisticsLoss() = default;

absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> BnStatisticsLoss::Create(
    const Model& model, const DistillOptions& options) {
  ZQ_RETURN_IF_ERROR(ValidateDistillOptions(options));
  return CallTorch(
      "building the BatchNorm statistics probe",
      [&] {
        std::shared_ptr<torch::jit::Graph> g = model.graph();
        std::vector<torch::jit::Node*> nodes = Model::Nodes(*g);
        std::vector<ValueRef> refs;
        auto impl_targets_mean = std::vector<torch::Tensor>();
        auto impl_targets_std = std::vector<torch::Tensor>();
        for (const BnLayer& bn : model.summary().bn_layers) {
          torch::jit::Node* n = nodes.at(bn.node_index);
          // The BN's real input: whatever value flows into it.
          torch::jit::Value* in = n->input(0);
          if (in->node()->owningBlock() != g->block() &&
              in->node()->kind() != c10::prim::Param) {
            throw std::runtime_error("BN input inside control flow");
          }
          ValueRef ref;
          if (in->node()->kind() == c10::prim::Param) {
            ref.node_index = -1;
            ref.output = static_cast<int>(in->offset());
          } else {
            auto it = std::find(nodes.begin(), nodes.end(), in->node());
            ref.node_index = static_cast<int>(it - nodes.begin());
            ref.output = static_cast<int>(in->offset());
          }
          refs.push_back(ref);
          torch::Tensor mean = torch::jit::toIValue(n->input(3))->toTensor();
          torch::Tensor var = torch::jit::toIValue(n->input(4))->toTensor();
          impl_targets_mean.push_back(mean.detach().to(torch::kFloat));
          impl_targets_std.push_back(
              torch::sqrt(var.detach().to(torch::kFloat) + options.eps));
        }
        auto impl = std::make_unique<Impl>(ProbeGraph(*g, refs),
                                           model.frozen()._ivalue());
        impl->target_mean = std::move(impl_targets_mean);
        impl->target_std = std::move(impl_targets_std);
        impl->options = options;
        return std::unique_ptr<BnStatisticsLoss>(
            new BnStatisticsLoss(std::move(impl)));
      },
      absl::StatusCode::kInternal);
}

// The statistics terms of every BN input (and of the input itself) at once,
// with their gradient in closed form: for a term with count L, mean m and
// std s, dL/dx = dL/dm / L + dL/ds * (x - m) / ((L - 1) * s). Per term only
// three passes touch the big tensor (row sums of x, row norms of x, the
// gradient a + b * x); the per-channel arithmetic in between runs once, in
// double, on all terms concatenated, instead of ~30 small ops per BN layer.
// (LibTorch 1.13's var/var_mean CPU kernels are ~20x slower than the sums.)
torch::Tensor BnStatisticsLoss::LossAndBackward(const torch::Tensor& batch) {
  std::vector<torch::Tensor> values = impl_->probe.Run(batch);
  const DistillOptions& o = impl_->options;
  const bool input_term = o.match_input_stats && batch.dim() >= 2;
  const size_t terms = values.size() + (input_term ? 1 : 0);
  std::vector<torch::Tensor> flats(terms), s1(terms), s2(terms);
  std::vector<bool> per_sample(terms);
  torch::Tensor loss;
  std::vector<torch::Tensor> grads(values.size());
  torch::Tensor input_grad;
  Impl::Constants& k = impl_->constants;
  const bool fresh = k.batch_shape != batch.sizes().vec();
  std::vector<torch::Tensor> mu, sigma, count, norm;
  {
    torch::NoGradGuard no_grad;
    auto dopts = batch.options().dtype(torch::kDouble).requires_grad(false);
    for (size_t i = 0; i < terms; ++i) {
      const bool is_input = i == values.size();
      const torch::Tensor v = is_input ? batch.detach() : values[i].detach();
      const int64_t n = v.size(0), c = v.size(1);
      torch::Tensor flat = v.reshape({n, c, -1});
      const int64_t l = flat.size(2);
      per_sample[i] = o.stats == DistillStats::kPerSample && l > 1;
      torch::Tensor rows = flat.reshape({n * c, l});
      // |row|^2 through the norm kernel: one pass, no x*x temporary.
      torch::Tensor a = rows.sum(1);
      torch::Tensor b = at::linalg_vector_norm(rows, 2, at::IntArrayRef{1},
                                               false, c10::nullopt)
                            .to(torch::kDouble)
                            .square();
      if (!per_sample[i]) {
        a = a.view({n, c}).sum(0);
        b = b.view({n, c}).sum(0);
      }
      if (fresh) {
        torch::Tensor m = is_input ? torch::zeros({c}, dopts) : impl_->target_mean[i].to(torch::kDouble);
        torch::Tensor sd = is_input ? torch::ones({c}, dopts) : impl_->target_std[i].to(torch::kDouble);
        const int64_t rep = per_sample[i] ? n : 1;
        mu.push_back(m.repeat({rep}));
        sigma.push_back(sd.repeat({rep}));
        count.push_back(torch::full({rep * c}, static_cast<double>(per_sample[i] ? l : n * l), dopts));
        norm.push_back(torch::full({rep * c}, per_sample[i] ? 1.0 / n : 1.0, dopts));
      }
      flats[i] = flat;
      s1[i] = a;
      s2[i] = b;
    }
    if (fresh) {
      k.batch_shape = batch.sizes().vec();
      k.mu = torch::cat(mu);
      k.sigma = torch::cat(sigma);
      k.count = torch::cat(count);
      k.norm = torch::cat(norm);
    }
    torch::Tensor S1 = torch::cat(s1).to(torch::kDouble);
    torch::Tensor S2 = torch::cat(s2);
    const torch::Tensor& K = k.count;
    const torch::Tensor& W = k.norm;
    torch::Tensor mean = S1 / K;
    torch::Tensor var = ((S2 - S1 * mean) / (K - 1).clamp_min(1)).clamp_min(0);
    torch::Tensor sd = torch::sqrt(var + o.eps);
    torch::Tensor dm = k.mu - mean, ds = k.sigma - sd;
    loss = (W * (dm * dm + ds * ds)).sum().to(batch.scalar_type());
    // d/dx of the term: A + B * (x - mean) = (A - B * mean) + B * x.
    torch::Tensor B = -2.0 * W * ds / ((K - 1).clamp_min(1) * sd);
    torch::Tensor A = -2.0 * W * dm / K - B * mean;
    std::vector<int64_t> sizes;
    for (const torch::Tensor& t : s1) sizes.push_back(t.numel());
    std::vector<torch::Tensor> As = A.to(batch.scalar_type()).split_with_sizes(sizes);
    std::vector<torch::Tensor> Bs = B.to(batch.scalar_type()).split_with_sizes(sizes);
    for (size_t i = 0; i < terms; ++i) {
      const torch::Tensor& f = flats[i];
      std::vector<int64_t> shape = {per_sample[i] ? f.size(0) : 1, f.size(1), 1};
      torch::Tensor g = torch::addcmul(As[i].view(shape), Bs[i].view(shape), f);
      if (i == values.size()) {
        input_grad = g.view(batch.sizes());
      } else {
        grads[i] = g.view(values[i].sizes());
      }
    }
  }
  if (!values.empty()) torch::autograd::backward(values, grads);
  if (input_grad.defined()) {
    torch::NoGradGuard no_grad;
    batch.mutable_grad() = batch.grad().defined() ? batch.grad() + input_grad
                                                  : input_grad;
  }
  return loss;
}

torch::Tensor BnStatisticsLoss::Loss(const torch::Tensor& batch) {
  std::vector<torch::Tensor> values = impl_->probe.Run(batch);
  torch::Tensor loss = torch::zeros({}, batch.options());
  for (size_t i = 0; i < values.size(); ++i) {
    loss = loss + StatsTerm(values[i], impl_->target_mean[i],
                            impl_->target_std[i], impl_->options);
  }
  if (impl_->options.match_input_stats && batch.dim() >= 2) {
    const int64_t c = batch.size(1);
    loss = loss + StatsTerm(batch, torch::zeros({c}, batch.options()),
                            torch::ones({c}, batch.options()), impl_->options);
  }
  return loss;
}

absl::StatusOr<double> BnStatisticsLoss::Evaluate(const torch::Tensor& batch) {
  return CallTorch("BatchNorm statistics loss", [&] {
    torch::NoGradGuard no_grad;
    return Loss(batch).item<double>();
  });
}

absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>>
BnStatisticsLoss::Measure(const torch::Tensor& batch) {
  return CallTorch("BatchNorm statistics", [&] {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> values = impl_->probe.Run(batch);
    std::vector<LayerStats> out;
    for (size_t i = 0; i < values.size(); ++i) {
      const int64_t c = values[i].size(1);
      torch::Tensor t = values[i].transpose(0, 1).reshape({c, -1});
      out.push_back({t.mean(1),
                     torch::sqrt(t.var(1, true) + impl_->options.eps),
                     impl_->target_mean[i], impl_->target_std[i]});
    }
    return out;
  });
}

absl::StatusOr<DistilledData> Distill(const Model& model,
                                      const std::vector<int64_t>& sample_shape,
                                      const DistillOptions& options,
                                      const DistillProgressFn& progress,
                                      const CancellationToken* cancel) {
  ZQ_RETURN_IF_ERROR(ValidateDistillOptions(options));
  std::vector<int64_t> shape = {options.batch_size};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  ZQ_RETURN_IF_ERROR(model.CheckInputShape(shape));
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<BnStatisticsLoss> loss_fn,
                      BnStatisticsLoss::Create(model, options));

  DistilledData data;
  for (int b = 0; b < options.num_batches; ++b) {
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "distillation"));
    absl::Status status = CallTorch(
        "distillation",
        [&] {
          auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed +
                                                              1000003ULL * b);
          torch::Tensor init;
          if (options.init == DistillInit::kReference) {
            init = (torch::randint(0, 255, shape, gen, torch::kFloat) - 127.5) /
                   5418.75;
          } else {
            init = torch::randn(shape, gen, torch::kFloat);
          }
          torch::Tensor x = init.to(model.device()).set_requires_grad(true);
          torch::optim::Adam adam({x}, torch::optim::AdamOptions(options.lr));
          PlateauScheduler scheduler(options.lr, options.plateau_factor,
                                     options.plateau_patience, options.min_lr);
          double first = std::numeric_limits<double>::quiet_NaN();
          ConvergenceCheck converged(options.early_stop_window,
                                     options.early_stop_tolerance);
          int run = 0;
          for (int it = 0; it < options.iterations; ++it) {
            if (cancel != nullptr && cancel->IsCancelled()) return;
            adam.zero_grad();
            torch::Tensor loss = loss_fn->LossAndBackward(x);
            adam.step();
            const double value = loss.item<double>();
            if (it == 0) first = value;
            const double used_lr = scheduler.lr();
            if (options.plateau_scheduler) {
              double next = scheduler.Step(value);
              for (auto& group : adam.param_groups()) {
                static_cast<torch::optim::AdamOptions&>(group.options())
                    .lr(next);
              }
            }
            run = it + 1;
            // The last iteration needs no stop: it ends the batch anyway.
            const bool stop =
                converged.Add(value) && it + 1 < options.iterations;
            if (progress) {
              progress({b, options.num_batches, it + 1, options.iterations,
                        value, used_lr, stop});
            }
            if (stop) break;
          }
          torch::Tensor result = x.detach();
          data.batches.push_back(result);
          data.initial_loss.push_back(first);
          data.iterations.push_back(run);
        },
        absl::StatusCode::kInternal);
    ZQ_RETURN_IF_ERROR(status);
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "distillation"));
    ZQ_ASSIGN_OR_RETURN(double final_loss,
                        loss_fn->Evaluate(data.batches.back()));
    if (std::isnan(data.initial_loss.back()))
      data.initial_loss.back() = final_loss;
    data.final_loss.push_back(final_loss);
  }
  return data;
}

}  // namespace zeroq::core
