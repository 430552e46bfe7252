// job_events.h: job events between the store and this replica's watchers.
//
//   JobEvents events(store);
//   ZQ_ASSIGN_OR_RETURN(std::shared_ptr<EventLog> log, events.Watch(job_id));
//   ... a write of this replica stored `written` ...
//   events.Stored(job_id, written);  // its watchers see them at once
//   events.Changed(job_id);          // a store notification: another
//                                    // replica wrote; read from the store
//
// Every event is in the store (with its seq, which the store assigns) before
// any watcher sees it. The watchers of one job on this replica share one
// EventLog, filled from two paths: this replica's own writes (at once) and a
// follower thread that reads the store for the jobs watched here, woken by
// Changed() (PostgreSQL's notifications) and otherwise every `poll` (the
// fallback when notifications are lost). A log that a write finds out of
// step (a gap) is left to the follower, so each watcher sees seqs 1, 2, ...
// exactly once and in order, whichever replica runs the job. A log is
// forgotten when its last watcher lets go or its job has ended.
// Thread-safe.
#ifndef ZEROQ_SERVER_JOB_EVENTS_H_
#define ZEROQ_SERVER_JOB_EVENTS_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/event_log.h"
#include "server/job_store.h"

namespace zeroq::server {

// Whether an event ends its job (a state event with a final state).
bool IsTerminalEvent(const v1::JobEvent& event);

class JobEvents {
 public:
  // `store` must outlive this.
  explicit JobEvents(JobStore* store,
                     absl::Duration poll = absl::Milliseconds(250));
  ~JobEvents();

  // The job's history, then its live events, ending with its final state.
  // The caller has checked that the job exists and is the tenant's.
  absl::StatusOr<std::shared_ptr<EventLog>> Watch(const std::string& job_id);
  // Events this replica has just stored for the job, with their seqs.
  void Stored(const std::string& job_id,
              const std::vector<v1::JobEvent>& events);
  // The job has new events in the store (written by any replica).
  void Changed(const std::string& job_id);
  // Jobs whose logs are followed now (watched, not finished).
  int followed() const;

 private:
  void Loop();
  // Reads the job's events after its log's last seq from the store.
  void CatchUp(const std::string& job_id, const std::shared_ptr<EventLog>& log);

  JobStore* const store_;
  const absl::Duration poll_;
  // Wakes the watchers of every log, off the threads that append.
  EventFanOut fan_out_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::weak_ptr<EventLog>> logs_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> dirty_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread follower_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_JOB_EVENTS_H_
