// config_check.h: the one check of a QuantizationConfig's fields.
//
//   ZQ_RETURN_IF_ERROR(ValidateQuantizationConfig(request.config()));
//
// SubmitJob runs it before a job is accepted and the worker runs it again
// before converting the config for the core, with the ranges of
// common/config_schema.h that the core itself enforces: a config the server
// accepts is never refused later for a range reason. INVALID_ARGUMENT names
// the field ("config.distillation.batch_size: 2048 is outside 1..1024").
// Needs only the messages (zeroq_proto) and the planner's budget parser.
#ifndef ZEROQ_PROTO_CONFIG_CHECK_H_
#define ZEROQ_PROTO_CONFIG_CHECK_H_

#include "absl/status/status.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq {

absl::Status ValidateQuantizationConfig(const v1::QuantizationConfig& config);

}  // namespace zeroq

#endif  // ZEROQ_PROTO_CONFIG_CHECK_H_
