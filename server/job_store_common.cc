#include "server/job_store_common.h"

#include <cstdint>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"

namespace zeroq::server::store_common {

int ClampPageSize(int page_size) {
  if (page_size <= 0) return kDefaultPageSize;
  return page_size > kMaxPageSize ? kMaxPageSize : page_size;
}

absl::StatusOr<int64_t> ParsePageToken(absl::string_view token,
                                       absl::string_view prefix) {
  if (token.empty()) return std::numeric_limits<int64_t>::max();
  absl::string_view digits = token;
  bool ok = absl::ConsumePrefix(&digits, prefix) && !digits.empty() &&
            digits.size() <= 19;
  for (char c : digits)
    ok = ok && absl::ascii_isdigit(static_cast<unsigned char>(c));
  int64_t seq = 0;
  if (!ok || !absl::SimpleAtoi(digits, &seq) || seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed page token \"", token, "\""));
  }
  return seq;
}

bool IsTerminal(v1::JobState state) {
  return state == v1::JOB_SUCCEEDED || state == v1::JOB_FAILED ||
         state == v1::JOB_CANCELLED;
}

int64_t EndUnix(const v1::Job& job) {
  return job.has_end_time() ? job.end_time().seconds()
                            : job.create_time().seconds();
}

}  // namespace zeroq::server::store_common
