// config_schema.h: a quantization config's fields, in one place for every
// layer that reads them: the range, what 0 means where it means something,
// the default, and the help text.
//
//   if (!kBatchSize.Contains(v)) return Invalid(kBatchSize.name, kBatchSize.Describe());
//   ABSL_FLAG(int, batch_size, kBatchSize.def, kBatchSize.help);
//
// SubmitJob's validation (proto/config_check.cc, which the worker runs again),
// the core's own option checks (core/distill.cc, core/quantized_model.cc,
// core/pipeline.cc's ValidateJobSpec), the core's defaults (core/options.h),
// zeroq-quantize's flags and the zeroq command line all read these, so a
// config that one of them accepts is never refused later by another for a
// range reason. Tests: core's LimitsTest walks every edge through both
// checks; tests/config_schema_test.cc walks them through a real server's
// SubmitJob and the zeroq-quantize binary; the help texts are checked
// against the ranges and defaults.
// Plain C++ (no Abseil, no LibTorch): every layer may include it.
#ifndef ZEROQ_COMMON_CONFIG_SCHEMA_H_
#define ZEROQ_COMMON_CONFIG_SCHEMA_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace zeroq {

// An integer field: an inclusive range, and 0 besides it where `zero` says
// what 0 means.
struct IntField {
  const char* name;  // as in QuantizationConfig, e.g. "distillation.batch_size"
  int64_t lo;
  int64_t hi;
  const char* zero;  // nullptr: 0 is only valid inside [lo, hi]
  int64_t def;       // the value when the field is not set
  // One line for a flag's help; states the range and the default.
  const char* help;

  constexpr bool Contains(int64_t v) const {
    return (zero != nullptr && v == 0) || (v >= lo && v <= hi);
  }
  // "0 (float) or 2..8", "1..1024".
  std::string Describe() const {
    std::string range = std::to_string(lo) + ".." + std::to_string(hi);
    if (zero == nullptr) return range;
    return "0 (" + std::string(zero) + ") or " + range;
  }
};

inline constexpr IntField kWeightBits{
    "weight_bits", 2, 8, "float", 8,
    "weight width of every layer, 2..8 (0: float; default 8)"};
inline constexpr IntField kLayerBits{
    "layer_bits", 2, 8, "float", 8,
    "per-layer weight widths overriding weight_bits, 2..8 (0: float)"};
inline constexpr IntField kCandidateBits{
    "candidate_bits", 2, 8, nullptr, 0,
    "mixed-precision widths to choose from, each 2..8 (default 2,3,4,6,8)"};
// The default set of kCandidateBits.
inline constexpr int kDefaultCandidateBits[] = {2, 3, 4, 6, 8};
inline constexpr IntField kActivationBits{
    "activation_bits", 2, 16, "float", 8,
    "activation width, 2..16 (0: float; default 8)"};
inline constexpr IntField kBatchSize{
    "distillation.batch_size", 1, 1024, nullptr, 32,
    "distilled images per batch, 1..1024 (default 32)"};
inline constexpr IntField kNumBatches{
    "distillation.num_batches", 1, 64, nullptr, 1,
    "distilled batches, 1..64 (default 1)"};
inline constexpr IntField kIterations{
    "distillation.iterations", 0, 100000, nullptr, 500,
    "distillation iterations per batch, 0..100000 (default 500, or 200 when "
    "every weight and activation width is 8 bits or more)"};
// An unset distillation.iterations of a job whose widths are all 8 bits or
// more (no budget, no learned rounding): there the data only sets the
// activation ranges, and 200 iterations gave the same top-1 as 500 on the
// Fashion-MNIST models (README, "Distillation iterations at 8 bits").
inline constexpr int kEightBitIterations = 200;
// Distillation stops early once the best loss has improved by less than
// early_stop_tolerance (relative) over the last early_stop_window iterations.
// A window shorter than the plateau scheduler's patience (100) stops on the
// plateau that precedes a learning-rate drop, so the useful windows are
// longer than that.
inline constexpr IntField kEarlyStopWindow{
    "distillation.early_stop_window", 1, 100000, "off", 0,
    "stop distilling once the loss improved by less than the tolerance over "
    "this many iterations, 1..100000 (0: off; default 0: off)"};
inline constexpr IntField kThreads{
    "threads", 1, 256, "the default", 0,
    "intra-op threads of a CPU job, 1..256 (0: the default: the server's "
    "per-job share, or all cores offline)"};

// Every integer field, for tables that walk them.
inline constexpr const IntField* kIntFields[] = {
    &kWeightBits, &kLayerBits,  &kCandidateBits, &kActivationBits,
    &kBatchSize,  &kNumBatches, &kIterations,    &kEarlyStopWindow,
    &kThreads};

// A real field on a half-open range (lo, hi], and 0 besides it where `zero`
// says what 0 means.
struct RealField {
  const char* name;
  double lo;  // excluded
  double hi;  // included
  double def;
  const char* help;
  const char* zero = nullptr;  // nullptr: 0 is only valid inside (lo, hi]

  constexpr bool Contains(double v) const {
    return (zero != nullptr && v == 0) || (v > lo && v <= hi);
  }
  // "(0, 1]", "0 (off) or (0, 1000]".
  std::string Describe() const {
    auto text = [](double v) {
      std::string s = std::to_string(v);
      s.erase(s.find_last_not_of('0') + 1);
      if (!s.empty() && s.back() == '.') s.pop_back();
      return s;
    };
    std::string range = "(" + text(lo) + ", " + text(hi) + "]";
    if (zero == nullptr) return range;
    return "0 (" + std::string(zero) + ") or " + range;
  }
};

// At 50 a site's range would be the median alone (zero width).
inline constexpr RealField kActivationPercentile{
    "activation_percentile", 50.0, 100.0, 100.0,
    "percentile of each activation's absolute values that sets its range, "
    "in (50, 100] (default 100: min/max)"};
inline constexpr RealField kLearningRate{
    "distillation.lr", 0.0, 100.0, 0.5,
    "distillation Adam learning rate, in (0, 100] (default 0.5)"};

inline constexpr RealField kEarlyStopTolerance{
    "distillation.early_stop_tolerance", 0.0, 1.0, 0.01,
    "relative loss improvement over the early-stop window below which "
    "distillation stops, in (0, 1] (default 0.01)"};

// The weight of the distillation's image prior: the input's total variation
// (the mean absolute difference between neighbouring elements along each
// spatial dimension), added to the BatchNorm statistics loss. 0 gives the
// reference's loss alone. Natural images are mostly flat; without the prior
// the distilled ones have no flat regions, and the 4-bit activation ranges
// chosen on them were worse: with it, the Fashion-MNIST models' W4A4 top-1
// rose by 0.3-0.8 points on average over seeds (README, "The distillation's
// image prior").
inline constexpr RealField kTvWeight{
    "distillation.tv_weight", 0.0, 1000.0, 10.0,
    "weight of the distilled images' total-variation prior, 0 (off) or "
    "(0, 1000] (default 10, or 0 when every weight and activation width is "
    "8 bits or more)",
    "off"};

inline constexpr const RealField* kRealFields[] = {
    &kActivationPercentile, &kLearningRate, &kEarlyStopTolerance, &kTvWeight};
// kReconstructIterations is not in kIntFields: the core's ValidateJobSpec
// (zeroq-quantize --check_config) does not check it, and its help does not
// say "default 1000". tests/config_schema_test.cc and core's LimitsTest walk
// its edges, and kActivationRange's and kReconstruct's words, separately.

// A field that names one of a few methods (a proto enum, a flag's word).
struct ChoiceField {
  const char* name;
  const char* const* choices;  // the words, in the proto enum's order from 1
  int count;
  int def;                     // index into choices: the value when unset
  const char* help;

  // The index of `word`, or -1.
  constexpr int Find(std::string_view word) const {
    for (int i = 0; i < count; ++i) {
      if (word == choices[i]) return i;
    }
    return -1;
  }
  // "minmax, percentile or mse".
  std::string Describe() const {
    std::string out;
    for (int i = 0; i < count; ++i) {
      if (i > 0) out += i + 1 == count ? " or " : ", ";
      out += choices[i];
    }
    return out;
  }
};

// QuantizationConfig.activation_range: ACTIVATION_RANGE_MINMAX = 1, _PERCENTILE
// = 2, _MSE = 3; unset (0) is the default, or percentile when
// activation_percentile is below 100.
inline constexpr const char* kActivationRangeNames[] = {"minmax", "percentile",
                                                        "mse"};
inline constexpr ChoiceField kActivationRange{
    "activation_range", kActivationRangeNames, 3, 2,
    "how each activation range is set: minmax, percentile "
    "(activation_percentile) or mse (the clip with the least quantization "
    "error) (default mse; percentile when activation_percentile < 100)"};

// QuantizationConfig.reconstruct: RECONSTRUCT_NONE = 1, _ADAROUND = 2,
// _BLOCK = 3, _AUTO = 4; unset (0) is the default.
inline constexpr const char* kReconstructNames[] = {"none", "adaround", "block",
                                                    "auto"};
inline constexpr ChoiceField kReconstruct{
    "reconstruct", kReconstructNames, 4, 3,
    "learned weight rounding after calibration: none (round to nearest), "
    "adaround (layer by layer), block (block by block) or auto (block where a "
    "weight or activation width is under 5 bits, else none) (default auto)"};

inline constexpr IntField kReconstructIterations{
    "reconstruction.iterations", 1, 100000, "the default", 1000,
    "Adam steps per layer or block of the reconstruction, 1..100000 (0: the "
    "default, 1000)"};

}  // namespace zeroq

#endif  // ZEROQ_COMMON_CONFIG_SCHEMA_H_
