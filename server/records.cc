#include "server/records.h"

#include <cstdint>
#include <random>

#include "absl/base/const_init.h"
#include "absl/strings/ascii.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace zeroq::server {

void SetNow(google::protobuf::Timestamp* t) {
  const int64_t nanos = absl::ToUnixNanos(absl::Now());
  t->set_seconds(nanos / 1000000000);
  t->set_nanos(static_cast<int32_t>(nanos % 1000000000));
}

double SecondsBetween(const google::protobuf::Timestamp& a,
                      const google::protobuf::Timestamp& b) {
  return static_cast<double>(b.seconds() - a.seconds()) +
         (b.nanos() - a.nanos()) * 1e-9;
}

const char* StateName(v1::JobState s) {
  return v1::JobState_Name(s).c_str() + 4;  // drop "JOB_"
}

bool IsTerminal(v1::JobState s) {
  return s == v1::JOB_SUCCEEDED || s == v1::JOB_FAILED ||
         s == v1::JOB_CANCELLED;
}

v1::JobEvent StateEvent(const v1::Job& job, const std::string& message) {
  v1::JobEvent e;
  e.set_type(v1::EVENT_STATE);
  e.set_state(job.state());
  e.set_stage(job.stage());
  if (job.has_error()) *e.mutable_error() = job.error();
  e.set_message(message);
  SetNow(e.mutable_time());
  return e;
}

void EndAttempt(v1::Job& job, const std::string& outcome,
                const std::string& reason) {
  if (job.attempt_history().empty()) return;
  v1::JobAttempt& a = *job.mutable_attempt_history()->rbegin();
  if (a.outcome() != "running") return;
  a.set_outcome(outcome);
  a.set_reason(reason);
  SetNow(a.mutable_end_time());
}

void FinishJob(v1::Job& job, v1::JobState state, const absl::Status& error,
               std::vector<v1::JobEvent>* events) {
  job.set_state(state);
  SetNow(job.mutable_end_time());
  // Closes the attempt unless its outcome was already recorded (crashed,
  // timed out, ...).
  EndAttempt(job,
             state == v1::JOB_SUCCEEDED   ? "succeeded"
             : state == v1::JOB_CANCELLED ? "cancelled"
                                          : "failed",
             std::string(error.message()));
  if (!error.ok()) {
    job.mutable_error()->set_code(static_cast<int>(error.code()));
    job.mutable_error()->set_message(std::string(error.message()));
  }
  std::string message = absl::AsciiStrToLower(StateName(state));
  if (!error.ok()) absl::StrAppend(&message, ": ", error.message());
  events->push_back(StateEvent(job, message));
}

std::string RandomHex(int digits) {
  static absl::Mutex mu(absl::kConstInit);
  static std::mt19937_64* rng = nullptr;
  absl::MutexLock lock(&mu);
  if (rng == nullptr) {
    std::random_device rd;
    rng = new std::mt19937_64((static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                              static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));
  }
  std::string out;
  while (static_cast<int>(out.size()) < digits)
    absl::StrAppend(&out, absl::Hex((*rng)(), absl::kZeroPad16));
  out.resize(digits);
  return out;
}

}  // namespace zeroq::server
