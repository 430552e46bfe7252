#include "proto/config_check.h"

#include <cmath>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/pareto.h"

namespace zeroq {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

absl::Status Check(absl::string_view field, int64_t v, const IntField& limit) {
  if (limit.Contains(v)) return absl::OkStatus();
  return Invalid(field, absl::StrCat(v, " is outside ", limit.Describe()));
}

// A field that is one value: its name is the schema's.
absl::Status Check(int64_t v, const IntField& field) {
  return Check(absl::StrCat("config.", field.name), v, field);
}

absl::Status Check(double v, const RealField& field) {
  if (field.Contains(v)) return absl::OkStatus();
  return Invalid(absl::StrCat("config.", field.name),
                 absl::StrFormat("%g is outside %s", v, field.Describe()));
}

}  // namespace

absl::Status ValidateQuantizationConfig(const v1::QuantizationConfig& c) {
  if (c.has_weight_bits())
    ZQ_RETURN_IF_ERROR(Check(c.weight_bits(), kWeightBits));
  if (c.has_activation_bits())
    ZQ_RETURN_IF_ERROR(Check(c.activation_bits(), kActivationBits));
  for (const auto& [name, bits] : c.layer_bits()) {
    if (name.empty()) return Invalid("config.layer_bits", "empty layer name");
    ZQ_RETURN_IF_ERROR(
        Check(absl::StrCat("config.layer_bits[\"", name, "\"]"), bits, kLayerBits));
  }
  if (!c.budget().empty()) {
    absl::StatusOr<core::Budget> b = core::ParseBudget(c.budget());
    if (!b.ok()) return Invalid("config.budget", b.status().message());
  }
  std::set<int> seen;
  for (int i = 0; i < c.candidate_bits_size(); ++i) {
    std::string field = absl::StrCat("config.candidate_bits[", i, "]");
    ZQ_RETURN_IF_ERROR(Check(field, c.candidate_bits(i), kCandidateBits));
    if (!seen.insert(c.candidate_bits(i)).second) {
      return Invalid(field, absl::StrCat(c.candidate_bits(i), " is repeated"));
    }
  }
  if (c.candidate_bits_size() > 0 && c.budget().empty()) {
    return Invalid("config.candidate_bits",
                   "only used with a budget (mixed precision)");
  }
  if (c.has_activation_percentile())
    ZQ_RETURN_IF_ERROR(Check(c.activation_percentile(), kActivationPercentile));
  if (!v1::ActivationRange_IsValid(c.activation_range())) {
    return Invalid(
        absl::StrCat("config.", kActivationRange.name),
        absl::StrCat(c.activation_range(), " is not an ActivationRange"));
  }
  if ((c.activation_range() == v1::ACTIVATION_RANGE_MINMAX ||
       c.activation_range() == v1::ACTIVATION_RANGE_MSE) &&
      c.has_activation_percentile() && c.activation_percentile() < 100.0) {
    return Invalid(
        absl::StrCat("config.", kActivationPercentile.name),
        absl::StrCat("only the percentile activation_range uses it (",
                     v1::ActivationRange_Name(c.activation_range()), ")"));
  }
  if (!v1::ReconstructMethod_IsValid(c.reconstruct())) {
    return Invalid(
        absl::StrCat("config.", kReconstruct.name),
        absl::StrCat(c.reconstruct(), " is not a ReconstructMethod"));
  }
  if (c.reconstruction().has_iterations()) {
    ZQ_RETURN_IF_ERROR(
        Check(c.reconstruction().iterations(), kReconstructIterations));
  }
  const v1::DistillationConfig& d = c.distillation();
  if (d.has_batch_size()) ZQ_RETURN_IF_ERROR(Check(d.batch_size(), kBatchSize));
  if (d.has_num_batches()) ZQ_RETURN_IF_ERROR(Check(d.num_batches(), kNumBatches));
  if (d.has_iterations()) ZQ_RETURN_IF_ERROR(Check(d.iterations(), kIterations));
  if (d.has_lr()) ZQ_RETURN_IF_ERROR(Check(d.lr(), kLearningRate));
  if (d.has_early_stop_window())
    ZQ_RETURN_IF_ERROR(Check(d.early_stop_window(), kEarlyStopWindow));
  if (d.has_early_stop_tolerance())
    ZQ_RETURN_IF_ERROR(Check(d.early_stop_tolerance(), kEarlyStopTolerance));
  if (d.has_tv_weight()) ZQ_RETURN_IF_ERROR(Check(d.tv_weight(), kTvWeight));
  if (!v1::CalibrationSource_IsValid(c.calibration())) {
    return Invalid(
        "config.calibration",
        absl::StrCat(c.calibration(), " is not a CalibrationSource"));
  }
  if (!c.sensitivity_from_job().empty() && c.budget().empty()) {
    return Invalid("config.sensitivity_from_job",
                   "re-planning needs a budget: set config.budget");
  }
  if (c.has_threads())
    ZQ_RETURN_IF_ERROR(Check(c.threads(), kThreads));
  return absl::OkStatus();
}

}  // namespace zeroq
