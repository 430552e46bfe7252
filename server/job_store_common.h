// job_store_common.h: what the JobStore backends share, so that they agree
// on page tokens, page sizes, the end time of a job and record encoding.
// Internal to the store implementations (job_store.cc, pg_job_store.cc).
//
//   ZQ_ASSIGN_OR_RETURN(int64_t before,
//                       ParsePageToken(token, kModelTokenPrefix));
//   ... rows with created_seq < before, newest first, LIMIT size + 1 ...
//   page.next_page_token = absl::StrCat(kModelTokenPrefix, last_seq);
#ifndef ZEROQ_SERVER_JOB_STORE_COMMON_H_
#define ZEROQ_SERVER_JOB_STORE_COMMON_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/job_store.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server::store_common {

namespace v1 = ::zeroq::v1;

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 500;

// Page tokens carry the last returned row's created_seq; the prefix keeps a
// models token from being accepted by ListJobs and vice versa. Tokens are
// part of the API (clients keep them across restarts), so every backend
// writes the same ones.
constexpr absl::string_view kModelTokenPrefix = "m";
constexpr absl::string_view kJobTokenPrefix = "j";

// page_size <= 0: the default; above the cap: the cap.
int ClampPageSize(int page_size);

// The created_seq below which the page starts; an empty token starts at the
// newest row. INVALID_ARGUMENT for anything that is not prefix + a positive
// decimal number.
absl::StatusOr<int64_t> ParsePageToken(absl::string_view token,
                                       absl::string_view prefix);

bool IsTerminal(v1::JobState state);

// When a terminal job ended, in unix seconds (its end time; the creation time
// for a record that lacks one).
int64_t EndUnix(const v1::Job& job);

// ---- the queue

// Numbers `events` after `last_seq` (1, 2, ... for a new job), gives those
// without a time `now`, and makes job.last_seq the last of them.
void NumberEvents(int64_t last_seq, absl::Time now, v1::Job& job,
                  std::vector<v1::JobEvent>& events);

// A time as the stores keep not_before and SQLite's lease_until: unix
// milliseconds, and 0 for InfinitePast ("at once").
int64_t UnixMillis(absl::Time time);

// ABORTED unless the stored job (held by `owner`, "" for nobody) is RUNNING
// under `fence`; OK without a fence.
absl::Status CheckFence(const Fence* fence, const v1::Job& stored,
                        const std::string& owner);

// INTERNAL unless a claim's `start` left the job RUNNING with one attempt
// more than `before` had.
absl::Status CheckStarted(const v1::Job& before, const v1::Job& after);

// INTERNAL when a reclaim left the job RUNNING: its lease would be gone
// while it still looked taken.
absl::Status CheckReclaimed(const v1::Job& after);

// INTERNAL when an edit changed the job's id: the store writes by id.
absl::Status CheckSameJob(const std::string& id, const v1::Job& after);

template <typename Message>
absl::Status ParseRecord(absl::string_view bytes, absl::string_view what,
                         Message* out) {
  if (!out->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::DataLossError(
        absl::StrCat("stored ", what, " record does not parse"));
  }
  return absl::OkStatus();
}

template <typename Message>
absl::StatusOr<std::string> Serialize(const Message& message,
                                      absl::string_view what) {
  std::string bytes;
  if (!message.SerializeToString(&bytes)) {
    return absl::InternalError(
        absl::StrCat("cannot serialize ", what, " record"));
  }
  return bytes;
}

}  // namespace zeroq::server::store_common

#endif  // ZEROQ_SERVER_JOB_STORE_COMMON_H_
