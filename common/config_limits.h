// config_limits.h: the ranges of a quantization config's fields, in one
// place for every layer that checks them.
//
//   if (!kBatchSize.Contains(v)) return Invalid("batch_size", kBatchSize.Describe());
//
// SubmitJob's validation (server/validation.cc), the worker's conversion of
// a config (core/worker/convert.cc), the core's own option checks
// (core/distill.cc, core/quantized_model.cc), zeroq-quantize and the zeroq
// command line all read these, so a config that one of them accepts is never
// refused later by another for a range reason (tests: validation_test,
// core's LimitsTest, and the CLI's flag tests walk each range's edges).
// Plain C++ (no Abseil, no LibTorch): every layer may include it.
#ifndef ZEROQ_COMMON_CONFIG_LIMITS_H_
#define ZEROQ_COMMON_CONFIG_LIMITS_H_

#include <cstdint>
#include <string>

namespace zeroq {

// An inclusive integer range; `zero_ok`: 0 also allowed (keep float).
struct IntLimit {
  int64_t lo;
  int64_t hi;
  bool zero_ok = false;
  constexpr bool Contains(int64_t v) const {
    return (zero_ok && v == 0) || (v >= lo && v <= hi);
  }
  std::string Describe() const {
    return (zero_ok ? "0 (float) or " : "") + std::to_string(lo) + ".." +
           std::to_string(hi);
  }
};

inline constexpr IntLimit kWeightBits{2, 8, /*zero_ok=*/true};
inline constexpr IntLimit kLayerBits{2, 8, /*zero_ok=*/true};
inline constexpr IntLimit kCandidateBits{2, 8};
inline constexpr IntLimit kActivationBits{2, 16, /*zero_ok=*/true};
inline constexpr IntLimit kBatchSize{1, 1024};
inline constexpr IntLimit kNumBatches{1, 64};
inline constexpr IntLimit kIterations{0, 100000};
inline constexpr IntLimit kThreads{1, 256};

// activation_percentile: in (50, 100]. At 50 a site's range would be the
// median alone (zero width).
inline constexpr double kPercentileAbove = 50.0;
inline constexpr double kPercentileMax = 100.0;
inline constexpr bool PercentileOk(double p) {
  return p > kPercentileAbove && p <= kPercentileMax;
}
inline constexpr const char* kPercentileRange = "(50, 100]";

// distillation lr: in (0, 100].
inline constexpr bool LrOk(double lr) { return lr > 0 && lr <= 100; }
inline constexpr const char* kLrRange = "(0, 100]";

}  // namespace zeroq

#endif  // ZEROQ_COMMON_CONFIG_LIMITS_H_
