// quantizer.h: ZeroQ's asymmetric uniform quantizers (ZEROQ.md section 2).
//
//   ZQ_ASSIGN_OR_RETURN(WeightQuantization q, QuantizeWeight(conv_w, 4));
//   conv_w_hat = q.dequantized;   // what the fake-quant model computes with
//
// For k bits and a range [lo, hi] (per output channel for weights, per tensor
// for activations), with round = round half to even:
//   scale = (2^k - 1) / max(hi - lo, 1e-8)
//   zp    = round(scale * lo) + 2^(k-1)
//   q     = clamp(round(scale * x - zp), -2^(k-1), 2^(k-1) - 1)
//   x_hat = (q + zp) / scale
// Pure functions of their inputs; safe from any thread.
#ifndef ZEROQ_CORE_QUANTIZER_H_
#define ZEROQ_CORE_QUANTIZER_H_

#include <torch/torch.h>

#include "absl/status/statusor.h"

namespace zeroq::core {

struct WeightQuantization {
  torch::Tensor dequantized;  // same shape as the weight, float
  torch::Tensor scale;        // [out_channels], float
  torch::Tensor zero_point;   // [out_channels], float holding integers
};

// Per output channel (dimension 0). INVALID_ARGUMENT unless 1 <= bits <= 16
// and the weight is a float tensor of rank >= 1.
absl::StatusOr<WeightQuantization> QuantizeWeight(const torch::Tensor& weight,
                                                  int bits);

// Per-tensor parameters for an activation range [lo, hi].
struct ActivationQuantization {
  double scale = 1.0;
  double zero_point = 0.0;
  int bits = 8;
  double lo = 0.0, hi = 0.0;
};
absl::StatusOr<ActivationQuantization> ActivationParams(double lo, double hi,
                                                        int bits);

// x_hat for a per-tensor quantizer; the graph rewrite inserts these same ops.
torch::Tensor FakeQuantize(const torch::Tensor& x,
                           const ActivationQuantization& q);

// The clipping range with the least mean squared error ||x - x_hat||^2 over
// `values` (any shape; a sample of a site's calibration activations) at
// `bits`, among [a * lo, a * hi] for a = 1/candidates, 2/candidates, ..., 1
// ([lo, hi]: the full range the site saw, e.g. its min/max; only an end
// beyond 0 is scaled, so a ReLU output, lo = 0, is clipped at the top only).
// Ties keep the wider range: min/max unless clipping strictly helps. Costs
// `candidates` elementwise passes over `values`. INVALID_ARGUMENT for a bad
// width or range, an empty or non-float `values`, or candidates < 1.
absl::StatusOr<ActivationQuantization> MseActivationParams(
    const torch::Tensor& values, double lo, double hi, int bits,
    int candidates = 100);

// Mean of (x - FakeQuantize(x, q))^2 over x's elements.
double QuantizationMse(const torch::Tensor& x, const ActivationQuantization& q);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_QUANTIZER_H_
