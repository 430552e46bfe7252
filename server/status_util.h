// status_util.h: absl::Status <-> grpc::Status, in one place (the edge).
//
//   return ToGrpcStatus(manager->CancelJob(tenant, id).status());
//
// The codes are the same canonical codes; messages are capped so that an
// oversized error (a worker's log tail, say) never exceeds metadata limits.
#ifndef ZEROQ_SERVER_STATUS_UTIL_H_
#define ZEROQ_SERVER_STATUS_UTIL_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace zeroq::server {

inline constexpr size_t kMaxStatusMessageBytes = 4096;

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_STATUS_UTIL_H_
