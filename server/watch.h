// watch.h: one watcher's stream of a job's events, whatever carries it (a
// gRPC WatchJob stream, an HTTP event stream), and the hub that keeps every
// open one for heartbeats, the open-streams gauges and shutdown.
//
//   class MySink : public WatchSink { ... };       // the transport's side
//   auto stream = std::make_shared<WatchStream>(log, after_seq, &sink);
//   if (!hub.Add(stream, WatchTransport::kHttp)) { /* stopping: refuse */ }
//   stream->Start();
//   // sink.Write(e) -> send e -> stream->WriteDone(ok)
//   // the client went away -> stream->Cancel()
//   // sink.Finish(status) is the last call the stream makes
//
// The contract both transports share: the events with seq > after_seq
// replayed from the job's EventLog, then live ones as they are stored, a
// heartbeat (EVENT_HEARTBEAT carrying the newest seq) when nothing was sent
// for the heartbeat interval, and the end: OK after the terminal event,
// UNAVAILABLE "the server is stopping; resume with after_seq=N" at
// shutdown, CANCELLED when the client left. One write at a time; nothing is
// skipped or repeated. Thread-safe; decisions are taken under the stream's
// lock and the sink is called without it (a transport may react inline).
#ifndef ZEROQ_SERVER_WATCH_H_
#define ZEROQ_SERVER_WATCH_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/event_log.h"
#include "server/metrics.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

class WatchSink {
 public:
  virtual ~WatchSink() = default;
  // Sends one event (a heartbeat included); the transport calls
  // WatchStream::WriteDone when it is sent (or failed).
  virtual void Write(const v1::JobEvent& event) = 0;
  // Ends the stream; called once, never while a write is in flight, and
  // nothing is called after it.
  virtual void Finish(const absl::Status& status) = 0;
};

class WatchStream : public EventListener,
                    public std::enable_shared_from_this<WatchStream> {
 public:
  // `sink` must stay valid until its Finish has been called.
  WatchStream(std::shared_ptr<EventLog> log, int64_t after_seq,
              WatchSink* sink);

  // Sends what there is; later events wake it through the log.
  void Start();
  void WriteDone(bool ok);
  // The client went away or gave up: end (CANCELLED) after the write in
  // flight.
  void Cancel();
  // Ends with UNAVAILABLE naming the seq to resume after.
  void AbortForShutdown();
  // Sends a heartbeat if nothing was written for `interval`.
  void Heartbeat(absl::Time now, absl::Duration interval);
  // EventListener: the job's log has new events.
  void OnEvents() override;

 private:
  void Pump();

  const std::shared_ptr<EventLog> log_;
  WatchSink* const sink_;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  int64_t cursor_ ABSL_GUARDED_BY(mu_);  // seq of the last event handed out
  std::deque<v1::JobEvent> buffer_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool heartbeat_due_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<absl::Status> finish_with_ ABSL_GUARDED_BY(mu_);
  absl::Time last_write_ ABSL_GUARDED_BY(mu_);
  v1::JobEvent out_;  // the event being written; the sink reads it
};

enum class WatchTransport { kGrpc, kHttp };

// Every open stream, for heartbeats, the gauges (zeroq_watch_streams for
// gRPC, zeroq_sse_streams for HTTP) and shutdown. Holds weak references: a
// stream that ended drops out at the next sweep.
class WatchHub {
 public:
  WatchHub(absl::Duration heartbeat_interval, Metrics* metrics);
  ~WatchHub();  // Shutdown()

  // False once shut down (the caller refuses the stream with UNAVAILABLE).
  bool Add(std::shared_ptr<WatchStream> stream, WatchTransport transport);
  // Ends every open stream with UNAVAILABLE and refuses new ones. Idempotent.
  void Shutdown();
  bool shut_down();

 private:
  void Loop();

  const absl::Duration interval_;
  Metrics* const metrics_;
  absl::Mutex mu_;
  absl::CondVar wake_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  struct Entry {
    std::weak_ptr<WatchStream> stream;
    WatchTransport transport;
  };
  std::vector<Entry> streams_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_WATCH_H_
