#include "server/job_store_common.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

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

void NumberEvents(int64_t last_seq, absl::Time now, v1::Job& job,
                  std::vector<v1::JobEvent>& events) {
  for (v1::JobEvent& event : events) {
    event.set_seq(++last_seq);
    if (!event.has_time()) {
      const int64_t nanos = absl::ToUnixNanos(now);
      event.mutable_time()->set_seconds(nanos / 1000000000);
      event.mutable_time()->set_nanos(static_cast<int32_t>(nanos % 1000000000));
    }
  }
  job.set_last_seq(last_seq);
}

int64_t UnixMillis(absl::Time time) {
  return std::max<int64_t>(0, absl::ToUnixMillis(time));
}

absl::Status CheckFence(const Fence* fence, const v1::Job& stored,
                        const std::string& owner) {
  if (fence == nullptr) return absl::OkStatus();
  if (stored.state() == v1::JOB_RUNNING && owner == fence->owner &&
      stored.attempts() == fence->attempt) {
    return absl::OkStatus();
  }
  return absl::AbortedError(absl::StrCat(
      "the lease on job ", stored.id(), " was lost: held by ",
      owner.empty() ? "nobody" : owner, " at attempt ", stored.attempts(),
      ", not ", fence->owner, " at attempt ", fence->attempt));
}

absl::Status CheckStarted(const v1::Job& before, const v1::Job& after) {
  if (after.state() == v1::JOB_RUNNING &&
      after.attempts() == before.attempts() + 1) {
    return absl::OkStatus();
  }
  return absl::InternalError(absl::StrCat(
      "claim of job ", before.id(), ": the start left it in state ",
      v1::JobState_Name(after.state()), " at attempt ", after.attempts(),
      "; it must be RUNNING at attempt ", before.attempts() + 1));
}

absl::Status CheckReclaimed(const v1::Job& after) {
  if (after.state() != v1::JOB_RUNNING) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("reclaim of job ", after.id(),
                   " left it RUNNING; it must be re-queued or ended"));
}

absl::Status CheckSameJob(const std::string& id, const v1::Job& after) {
  if (after.id() == id) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("an edit of job ", id, " changed its id to ", after.id()));
}

}  // namespace zeroq::server::store_common
