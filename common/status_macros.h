// status_macros.h: RETURN_IF_ERROR and ASSIGN_OR_RETURN for absl::Status code.
//
// Debian's Abseil (20220623) ships no status macros, so the project keeps these
// two. Example:
//
//   absl::StatusOr<int> Parse(absl::string_view s);
//   absl::Status Use(absl::string_view s) {
//     ZQ_ASSIGN_OR_RETURN(int n, Parse(s));
//     ZQ_RETURN_IF_ERROR(Check(n));
//     return absl::OkStatus();
//   }
#ifndef ZEROQ_COMMON_STATUS_MACROS_H_
#define ZEROQ_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ZQ_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::absl::Status zq_status_ = (expr);          \
    if (!zq_status_.ok()) return zq_status_;     \
  } while (0)

#define ZQ_STATUS_MACROS_CONCAT_INNER_(x, y) x##y
#define ZQ_STATUS_MACROS_CONCAT_(x, y) ZQ_STATUS_MACROS_CONCAT_INNER_(x, y)

#define ZQ_ASSIGN_OR_RETURN(lhs, rexpr) \
  ZQ_ASSIGN_OR_RETURN_IMPL_(            \
      ZQ_STATUS_MACROS_CONCAT_(zq_statusor_, __LINE__), lhs, rexpr)

#define ZQ_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                              \
  if (!statusor.ok()) return statusor.status();         \
  lhs = std::move(statusor).value()

#endif  // ZEROQ_COMMON_STATUS_MACROS_H_
