// records.h: small helpers over the API's records shared by the control
// plane's parts (job manager, dispatcher, model registry).
#ifndef ZEROQ_SERVER_RECORDS_H_
#define ZEROQ_SERVER_RECORDS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/timestamp.pb.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

namespace v1 = ::zeroq::v1;

void SetNow(google::protobuf::Timestamp* t);
double SecondsBetween(const google::protobuf::Timestamp& a,
                      const google::protobuf::Timestamp& b);
// "QUEUED", "RUNNING", ... (the enum name without "JOB_").
const char* StateName(v1::JobState s);
bool IsTerminal(v1::JobState s);
// An EVENT_STATE event for the job's current state, stage and error.
v1::JobEvent StateEvent(const v1::Job& job, const std::string& message);
// Closes the job's newest attempt, unless it is already closed.
void EndAttempt(v1::Job& job, const std::string& outcome,
                const std::string& reason = "");
// Ends the job in `state` (SUCCEEDED, FAILED or CANCELLED) with `error`
// (already fit for the tenant: no server paths) and adds the state event.
void FinishJob(v1::Job& job, v1::JobState state, const absl::Status& error,
               std::vector<v1::JobEvent>* events);
// Lowercase hex, `digits` long, from a process-wide random generator.
std::string RandomHex(int digits);

// Another tenant's record answers exactly as a missing one does, so ids
// cannot be probed across tenants.
template <typename Record>
absl::StatusOr<Record> OwnedBy(absl::StatusOr<Record> record,
                               const std::string& tenant,
                               absl::string_view kind, const std::string& id) {
  bool missing =
      !record.ok() && record.status().code() == absl::StatusCode::kNotFound;
  if (missing || (record.ok() && record->tenant() != tenant)) {
    return absl::NotFoundError(absl::StrCat(kind, " \"", id, "\" not found"));
  }
  return record;
}

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_RECORDS_H_
