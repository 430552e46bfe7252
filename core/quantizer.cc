#include "core/quantizer.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace zeroq::core {
namespace {
constexpr double kMinRange = 1e-8;

absl::Status CheckBits(int bits) {
  if (bits < 1 || bits > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("bit width ", bits, " is outside 1..16"));
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<WeightQuantization> QuantizeWeight(const torch::Tensor& weight,
                                                  int bits) {
  if (absl::Status s = CheckBits(bits); !s.ok()) return s;
  if (!weight.defined() || weight.dim() < 1 || !weight.is_floating_point()) {
    return absl::InvalidArgumentError(
        "weight must be a floating-point tensor of rank >= 1");
  }
  torch::NoGradGuard no_grad;
  const int64_t channels = weight.size(0);
  torch::Tensor w = weight.detach().to(torch::kFloat).reshape({channels, -1});
  torch::Tensor lo = std::get<0>(w.min(1));
  torch::Tensor hi = std::get<0>(w.max(1));
  const double n = std::ldexp(1.0, bits) - 1.0;
  const double half = std::ldexp(1.0, bits - 1);
  torch::Tensor scale = n / (hi - lo).clamp_min(kMinRange);
  torch::Tensor zp = torch::round(scale * lo) + half;
  torch::Tensor s = scale.unsqueeze(1), z = zp.unsqueeze(1);
  torch::Tensor q = torch::clamp(torch::round(s * w - z), -half, half - 1.0);
  WeightQuantization out;
  out.dequantized = ((q + z) / s).reshape(weight.sizes()).to(weight.dtype());
  out.scale = scale;
  out.zero_point = zp;
  return out;
}

absl::StatusOr<ActivationQuantization> ActivationParams(double lo, double hi,
                                                        int bits) {
  if (absl::Status s = CheckBits(bits); !s.ok()) return s;
  if (!std::isfinite(lo) || !std::isfinite(hi) || hi < lo) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation range [", lo, ", ", hi, "] is not finite"));
  }
  ActivationQuantization q;
  q.bits = bits;
  q.lo = lo;
  q.hi = hi;
  // Same arithmetic as the weight quantizer, in float32 like the tensors.
  const float scale =
      static_cast<float>(std::ldexp(1.0, bits) - 1.0) /
      std::max(static_cast<float>(hi - lo), static_cast<float>(kMinRange));
  q.scale = scale;
  q.zero_point = std::nearbyint(scale * static_cast<float>(lo)) +
                 std::ldexp(1.0, bits - 1);
  return q;
}

torch::Tensor FakeQuantize(const torch::Tensor& x,
                           const ActivationQuantization& q) {
  const double half = std::ldexp(1.0, q.bits - 1);
  return (torch::clamp(torch::round(x * q.scale - q.zero_point), -half,
                       half - 1.0) +
          q.zero_point) /
         q.scale;
}

double QuantizationMse(const torch::Tensor& x,
                       const ActivationQuantization& q) {
  torch::NoGradGuard no_grad;
  return (FakeQuantize(x, q) - x).square().mean().item<double>();
}

absl::StatusOr<ActivationQuantization> MseActivationParams(
    const torch::Tensor& values, double lo, double hi, int bits,
    int candidates) {
  ZQ_ASSIGN_OR_RETURN(ActivationQuantization best,
                      ActivationParams(lo, hi, bits));
  if (!values.defined() || values.numel() == 0 || !values.is_floating_point()) {
    return absl::InvalidArgumentError(
        "the range search needs a non-empty float tensor of values");
  }
  if (candidates < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "range search candidates = ", candidates, ": must be >= 1"));
  }
  torch::NoGradGuard no_grad;
  const torch::Tensor x = values.detach().to(torch::kFloat).flatten();
  double best_mse = QuantizationMse(x, best);
  // From the widest down: a narrower range must be strictly better.
  for (int i = candidates - 1; i >= 1; --i) {
    const double a = static_cast<double>(i) / candidates;
    // Only an end beyond 0 moves (towards 0), so the range keeps 0 inside
    // when it had it, and a one-signed range keeps its near end.
    const double clo = lo < 0 ? a * lo : lo;
    const double chi = hi > 0 ? a * hi : hi;
    if (chi <= clo) break;
    ZQ_ASSIGN_OR_RETURN(ActivationQuantization q,
                        ActivationParams(clo, chi, bits));
    const double mse = QuantizationMse(x, q);
    if (mse < best_mse) {
      best_mse = mse;
      best = q;
    }
  }
  return best;
}

}  // namespace zeroq::core
