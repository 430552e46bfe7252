// event_log.h: the in-memory event history of one job, shared by its watchers.
//
//   std::shared_ptr<EventLog> log = ...;              // from JobManager::Watch
//   std::vector<v1::JobEvent> batch;
//   switch (log->ReadAfter(last_seq, 64, &batch, listener)) {
//     case EventLog::Read::kEvents: ...send batch...
//     case EventLog::Read::kWait:   ...listener->OnEvents() comes later...
//     case EventLog::Read::kDone:   ...all sent and the job is finished...
//   }
//
// Events are appended after they are stored, so what a watcher reads here
// is never ahead of the job store. Listeners are one-shot: a
// listener registered by ReadAfter is told once, then must read again.
// Thread-safe. OnEvents runs on the appending thread, without this log's
// lock held; it must not block.
#ifndef ZEROQ_SERVER_EVENT_LOG_H_
#define ZEROQ_SERVER_EVENT_LOG_H_

#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

namespace v1 = ::zeroq::v1;

class EventListener {
 public:
  virtual ~EventListener() = default;
  virtual void OnEvents() = 0;
};

// Wakes listeners on a thread of its own, so that whoever appends (the job
// manager, under its lock) does not run every watcher's write itself: with
// 1,000 watchers that took tens of milliseconds per event, during which
// every other call waited for the lock. Wakes are handed over in order; a
// listener reads the log from its own cursor, so a late wake loses nothing.
class EventFanOut {
 public:
  EventFanOut();
  ~EventFanOut();  // wakes what is queued, then joins

  void Wake(std::vector<std::weak_ptr<EventListener>> listeners);

 private:
  void Loop();

  absl::Mutex mu_;
  std::vector<std::weak_ptr<EventListener>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

class EventLog {
 public:
  enum class Read { kEvents, kWait, kDone };

  // `fan_out`: where Append hands the listeners to wake; nullptr: Append
  // wakes them itself. Must outlive the log's appends.
  explicit EventLog(EventFanOut* fan_out = nullptr);
  // A log that already holds a finished job's whole history.
  EventLog(std::vector<v1::JobEvent> events, bool terminal,
           EventFanOut* fan_out = nullptr);

  // Appends `events` (in seq order) after the log's last: those it already
  // has are skipped, so the same events may arrive by two paths (this
  // replica's own write, and a read of the store). false, and nothing is
  // appended, when they do not continue the log (a gap): the caller reads
  // the missing ones from the store.
  bool Append(const std::vector<v1::JobEvent>& events, bool terminal);
  int64_t last_seq() const;
  bool terminal() const;

  // Copies up to `max` events with seq > after_seq into *out. kWait (and
  // `listener`, when not null, is registered) when there are none yet;
  // kDone when there are none and the job has finished.
  Read ReadAfter(int64_t after_seq, int max, std::vector<v1::JobEvent>* out,
                 const std::shared_ptr<EventListener>& listener);

 private:
  EventFanOut* const fan_out_;
  mutable absl::Mutex mu_;
  std::vector<v1::JobEvent> events_
      ABSL_GUARDED_BY(mu_);  // events_[i].seq == i + 1
  bool terminal_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::weak_ptr<EventListener>> waiting_ ABSL_GUARDED_BY(mu_);
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_EVENT_LOG_H_
