// validation.h: up-front checks of client requests, before anything is
// accepted. Every error is INVALID_ARGUMENT and names the field, e.g.
// "config.weight_bits: 9 is outside 2..8".
//
//   ZQ_RETURN_IF_ERROR(ValidateSubmitJob(request));
//   ZQ_RETURN_IF_ERROR(ValidateConfigForModel(request.config(), model));
//
// Pure functions of their arguments; thread-safe.
#ifndef ZEROQ_SERVER_VALIDATION_H_
#define ZEROQ_SERVER_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

namespace v1 = ::zeroq::v1;

inline constexpr int64_t kMaxChunkBytes = 1 << 20;

// Name, input shape, size (1 .. max_model_bytes) and SHA-256 (64 hex digits).
absl::Status ValidateModelMetadata(const v1::ModelMetadata& metadata,
                                   int64_t max_model_bytes);

// The request alone: ids, ranges, the budget's syntax, priority, limits.
absl::Status ValidateSubmitJob(const v1::SubmitJobRequest& request);

// The config against the model it will run on: pinned layer names exist, and
// a budget is not below the smallest size the candidate widths can reach.
// REQUIRES: model.state() == MODEL_READY.
absl::Status ValidateConfigForModel(const v1::QuantizationConfig& config,
                                    const v1::Model& model);

// Page size: 0 -> 50; INVALID_ARGUMENT below 0; capped at 500.
absl::StatusOr<int> NormalizePageSize(int page_size);

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_VALIDATION_H_
