#include "server/validation.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/pareto.h"
#include "proto/config_check.h"
#include "server/sha256.h"

namespace zeroq::server {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

absl::Status CheckRange(absl::string_view field, int64_t v, int64_t lo,
                        int64_t hi) {
  if (v < lo || v > hi) {
    return Invalid(field, absl::StrCat(v, " is outside ", lo, "..", hi));
  }
  return absl::OkStatus();
}

std::vector<int> CandidateBits(const v1::QuantizationConfig& config) {
  if (config.candidate_bits().empty()) {
    return {std::begin(kDefaultCandidateBits), std::end(kDefaultCandidateBits)};
  }
  return {config.candidate_bits().begin(), config.candidate_bits().end()};
}

}  // namespace

absl::Status ValidateModelMetadata(const v1::ModelMetadata& m,
                                   int64_t max_model_bytes) {
  if (m.name().size() > 256)
    return Invalid("metadata.name", "longer than 256 bytes");
  if (m.input_shape().empty() || m.input_shape_size() > 5) {
    return Invalid("metadata.input_shape",
                   "give the shape of one sample without the batch dimension, "
                   "1 to 5 sizes, e.g. [3, 224, 224]");
  }
  int64_t elements = 1;
  for (int i = 0; i < m.input_shape_size(); ++i) {
    ZQ_RETURN_IF_ERROR(CheckRange(absl::StrCat("metadata.input_shape[", i, "]"),
                                  m.input_shape(i), 1, 1 << 16));
    elements *= m.input_shape(i);
    if (elements > (int64_t{1} << 26)) {
      return Invalid("metadata.input_shape",
                     "more than 2^26 elements per sample");
    }
  }
  if (m.size_bytes() <= 0) {
    return Invalid("metadata.size_bytes",
                   "give the exact size of the archive in bytes");
  }
  if (m.size_bytes() > max_model_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("metadata.size_bytes: ", m.size_bytes(),
                     " bytes is over the server's limit of ", max_model_bytes,
                     " bytes per model"));
  }
  if (!IsSha256Hex(m.sha256())) {
    return Invalid(
        "metadata.sha256",
        "give the SHA-256 of the archive as 64 lowercase hex digits");
  }
  return absl::OkStatus();
}

absl::Status ValidateSubmitJob(const v1::SubmitJobRequest& r) {
  if (r.model_id().empty()) return Invalid("model_id", "required");
  if (r.request_id().size() > 128)
    return Invalid("request_id", "longer than 128 bytes");
  ZQ_RETURN_IF_ERROR(CheckRange("priority", r.priority(), -100, 100));
  if (!v1::DeviceKind_IsValid(r.device())) {
    return Invalid("device", absl::StrCat(r.device(), " is not a DeviceKind"));
  }
  if (!std::isfinite(r.time_limit_seconds()) || r.time_limit_seconds() < 0) {
    return Invalid("time_limit_seconds",
                   "must be >= 0 (0: the server's default)");
  }
  return zeroq::ValidateQuantizationConfig(r.config());
}

absl::Status ValidateConfigForModel(const v1::QuantizationConfig& c,
                                    const v1::Model& model) {
  const v1::ModelSummary& s = model.summary();
  std::set<std::string> names;
  for (const v1::QuantizableLayer& l : s.layers()) names.insert(l.name());
  for (const auto& [name, bits] : c.layer_bits()) {
    if (names.count(name) == 0) {
      std::vector<std::string> some(names.begin(), names.end());
      if (some.size() > 12) some.resize(12), some.push_back("...");
      return Invalid(
          absl::StrCat("config.layer_bits[\"", name, "\"]"),
          absl::StrCat(
              "the model has no quantizable layer of that name; it has: ",
              absl::StrJoin(some, ", ")));
    }
  }
  if (s.layers().empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model ", model.id(), " has no conv or linear layers to quantize"));
  }
  if (c.budget().empty()) return absl::OkStatus();
  ZQ_ASSIGN_OR_RETURN(core::Budget budget, core::ParseBudget(c.budget()));
  std::vector<core::LayerSize> layers;
  for (const v1::QuantizableLayer& l : s.layers())
    layers.push_back({l.name(), l.params()});
  absl::Status reachable = core::CheckBudgetReachable(
      c.budget(), budget, layers, CandidateBits(c),
      std::map<std::string, int>(c.layer_bits().begin(), c.layer_bits().end()));
  if (!reachable.ok()) return Invalid("config.budget", reachable.message());
  return absl::OkStatus();
}

absl::StatusOr<int> NormalizePageSize(int page_size) {
  if (page_size < 0) return Invalid("page_size", "must be >= 0");
  if (page_size == 0) return 50;
  return std::min(page_size, 500);
}

}  // namespace zeroq::server
