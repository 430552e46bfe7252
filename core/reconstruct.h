// reconstruct.h: learned weight rounding on the calibration data, after the
// widths are chosen and the activation ranges calibrated (beyond plain
// ZeroQ, which rounds every weight to nearest).
//
//   ReconstructOptions r;            // AdaRound, 1000 Adam steps per layer
//   ZQ_ASSIGN_OR_RETURN(ReconstructResult out,
//       Reconstruct(*model, qmodel.get(), distilled.batches, r, on_layer));
//
// Layer by layer in graph order (AdaRound, Nagel et al. 2020): each
// quantized weight w becomes w_hat = (clamp(floor(s w - z) + h, lo, hi) + z)
// / s with the per-channel s, z of quantizer.h and a learned h in {0, 1}
// instead of round-to-nearest. h is relaxed to a rectified sigmoid h(V) that
// starts at the fractional part (so the first step is round-to-nearest's
// error) and a regulariser annealed from beta 20 to 2 pushes it to 0 or 1.
// The loss is the squared error of the layer's output, after the BatchNorm
// that consumes it when there is one (so channels count as much as BN
// scales them), against the float model's on the same samples.
//
// The layer's input is the quantized model's, with every upstream layer
// already reconstructed and every activation quantizer active, so a layer
// learns to absorb the error upstream of it. With drop_probability p > 0
// each input element is, per step, the float model's instead with
// probability p (QDrop's idea, Wei et al. 2022, at the layer's input): it
// keeps a layer from fitting the particular noise of the few distilled
// samples.
//
// Block by block (BRECQ, Li et al. 2021): the graph's top level is cut where
// a single tensor is live right after an activation quantizer (in a ResNet:
// the stem and each residual block, with its shortcut), and the rounding of
// every layer of a block is learned together against the float block's
// output, the activation quantizers inside it in the loop (rounding passes
// gradients straight through). Each block is fed the quantized model's
// output of the one before. A graph that cannot be cut (control flow with
// outputs at its top level) is reconstructed layer by layer instead.
//
// Options of the block method (ReconstructOptions): `fisher_bits` weighs a
// narrow block's output error by the squared gradient of the float model's
// cross-entropy against its own predictions, per sample scaled to mean 1
// (BRECQ's Fisher weighting without labels), so that the errors that move
// the model's outputs count most; `activation_lr` learns the activation
// quantizers' steps with the rounding (LSQ); `holdout` and `check_every`
// judge the rounding on held-out samples and keep the best judged one;
// `low_width_*` give the narrowest widths their own rate and steps.
//
// Not thread-safe; runs on the model's device. The quantized model must not
// have run a forward yet (QuantizedModel::SetLearnedWeight).
#ifndef ZEROQ_CORE_RECONSTRUCT_H_
#define ZEROQ_CORE_RECONSTRUCT_H_

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/quantized_model.h"

namespace zeroq::core {

struct ReconstructProgress {
  int layer = 0;              // 1-based, of `layers`
  int layers = 0;             // layers with quantized weights
  std::string name;
  double loss_before = 0;     // output MSE with round-to-nearest
  double loss_after = 0;      // with the learned rounding
  double flipped = 0;         // share of weights rounded the other way
};
using ReconstructProgressFn = std::function<void(const ReconstructProgress&)>;

struct ReconstructResult {
  // "adaround" or "block" ("adaround" also when blocks were asked for but
  // the graph cannot be cut into them).
  std::string method;
  std::vector<ReconstructProgress> layers;  // layers, or blocks
};

// INVALID_ARGUMENT for bad options or no calibration data; CANCELLED via the
// token (checked every 32 steps). After an error the quantized model may
// hold some layers' learned weights: drop it.
absl::StatusOr<ReconstructResult> Reconstruct(
    const Model& model, QuantizedModel* qmodel,
    const std::vector<torch::Tensor>& calibration,
    const ReconstructOptions& options,
    const ReconstructProgressFn& progress = {},
    const CancellationToken* cancel = nullptr);

absl::Status ValidateReconstructOptions(const ReconstructOptions& options);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_RECONSTRUCT_H_
