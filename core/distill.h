// distill.h: ZeroQ distilled data (ZEROQ.md section 1).
//
//   DistillOptions options;                      // the reference's choices
//   ZQ_ASSIGN_OR_RETURN(DistilledData data,
//       Distill(*model, {3, 224, 224}, options, on_progress, &cancel));
//   // data.batches: num_batches tensors of [batch_size, 3, 224, 224]
//
// Each batch starts from noise and is optimised (Adam on the input alone; the
// model is frozen) so that the input of every BatchNorm layer has the mean and
// standard deviation that layer stored: the loss is, over BN layers i,
//   ||mu_i - m_i(x)||^2 + ||sigma_i - s_i(x)||^2   (/ batch, per-sample stats)
// plus the same terms for the input against mean 0 / std 1. The BN inputs are
// found by data flow (Model), so convs without a BN are handled correctly.
// Beyond the reference, DistillOptions::tv_weight adds an image prior: that
// weight times the input's total variation, the mean |x[j+1] - x[j]| between
// neighbours along each spatial dimension, summed over those dimensions
// (tv_weight 0 is the reference's loss).
//
// With an early stop (DistillOptions::early_stop_window), a batch ends once
// its loss has converged: the data is exactly what a run with that many
// iterations gives.
//
// Deterministic for a given seed and intra-op thread count. Not thread-safe
// with respect to the same Model (one distillation per model at a time).
#ifndef ZEROQ_CORE_DISTILL_H_
#define ZEROQ_CORE_DISTILL_H_

#include <functional>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"

namespace zeroq::core {

struct DistillProgress {
  int batch = 0;        // 0-based batch index
  int num_batches = 0;
  int iteration = 0;    // 1-based iteration within the batch
  int iterations = 0;
  double loss = 0.0;    // loss before this iteration's step
  double lr = 0.0;      // learning rate used for this step
  // This is the batch's last iteration although iteration < iterations: the
  // early stop found the loss converged.
  bool converged = false;
};
using DistillProgressFn = std::function<void(const DistillProgress&)>;

struct DistilledData {
  std::vector<torch::Tensor> batches;  // on the model's device, no grad
  std::vector<double> initial_loss;    // per batch, at the starting noise
  std::vector<double> final_loss;      // per batch, after the last step
  std::vector<int> iterations;         // per batch, steps run (early stop)
};

// The early-stop rule of DistillOptions over one batch's losses, fed one
// iteration at a time: Add() returns true when the batch should stop after
// this iteration. With window 0 it never does.
class ConvergenceCheck {
 public:
  ConvergenceCheck(int window, double tolerance)
      : window_(window), tolerance_(tolerance) {}
  bool Add(double loss);

 private:
  int window_;
  double tolerance_;
  std::vector<double> best_;  // best_[t]: least loss of iterations 1..t+1
};

// INVALID_ARGUMENT naming the option when one is out of its range (the
// ranges of common/config_schema.h, which SubmitJob checks too).
absl::Status ValidateDistillOptions(const DistillOptions& options);

// `sample_shape` is one input without the batch dimension, e.g. {1, 28, 28}.
// INVALID_ARGUMENT for bad options or a shape the model rejects; CANCELLED if
// the token fires (checked every iteration).
absl::StatusOr<DistilledData> Distill(const Model& model,
                                      const std::vector<int64_t>& sample_shape,
                                      const DistillOptions& options,
                                      const DistillProgressFn& progress = {},
                                      const CancellationToken* cancel = nullptr);

// Computes the BN-statistics loss of ZeroQ for any batch (e.g. to compare
// distilled data with noise or real images), with the options' image prior.
// Reusable across batches.
class BnStatisticsLoss {
 public:
  static absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> Create(
      const Model& model, const DistillOptions& options);
  ~BnStatisticsLoss();

  // The loss as a differentiable scalar tensor. May throw c10::Error; use
  // Evaluate() outside the core.
  torch::Tensor Loss(const torch::Tensor& batch);
  absl::StatusOr<double> Evaluate(const torch::Tensor& batch);

  // The loss value (no autograd history), with its gradient accumulated into
  // batch.grad(): what Loss(batch).backward() gives (to float rounding),
  // with the statistics and their gradient in closed form, taken where the
  // BNs read their inputs and pass their gradient back (about the cost of
  // the model's own forward and backward). `batch` must require grad. May
  // throw c10::Error.
  torch::Tensor LossAndBackward(const torch::Tensor& batch);

  // Per BN layer (Model::summary() order): the batch's per-channel mean and
  // std of that layer's input over the whole batch, and the stored targets.
  struct LayerStats {
    torch::Tensor mean, std, target_mean, target_std;
  };
  absl::StatusOr<std::vector<LayerStats>> Measure(const torch::Tensor& batch);

 private:
  struct Impl;
  explicit BnStatisticsLoss(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_DISTILL_H_
