// worker_supervisor.h: runs one zeroq-worker process and watches it.
//
//   WorkerLaunch launch;
//   launch.worker_path = "/usr/lib/zeroq/zeroq-worker";
//   launch.request = request;                  // a zeroq.v1.WorkerRequest
//   launch.work_dir = "/var/lib/zeroq/jobs/j-123";
//   launch.time_limit = absl::Minutes(30);
//   ZQ_ASSIGN_OR_RETURN(auto worker, WorkerProcess::Start(
//       launch, [](const v1::JobEvent& e) { ... },
//       [](WorkerOutcome o) { ... }));
//   worker->Cancel();                          // from any thread
//
// Start writes the request to work_dir/request.pb, starts the worker in its
// own process group with the request path and a pipe on fd 3, its stdout and
// stderr appended to work_dir/worker.log, and `env` added to the server's
// environment (e.g. CUDA_VISIBLE_DEVICES). One thread per worker reads the
// length-delimited WorkerMessages from the pipe: `on_event` runs there for
// each progress event, and `on_exit` runs there exactly once after the
// process has been reaped, with the outcome. The worker is started from that
// same thread and dies with it (PR_SET_PDEATHSIG), so a server that dies takes
// its workers with it.
//
// Cancel() and the time limit send SIGTERM to the process group, then SIGKILL
// after `kill_grace` if it has not exited. The destructor cancels and waits.
// Thread-safe: Cancel() and pid() may be called from any thread, including
// from the callbacks.
#ifndef ZEROQ_SERVER_WORKER_SUPERVISOR_H_
#define ZEROQ_SERVER_WORKER_SUPERVISOR_H_

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "zeroq/v1/worker.pb.h"

namespace zeroq::server {

namespace v1 = ::zeroq::v1;

struct WorkerLaunch {
  std::string worker_path;  // the zeroq-worker executable
  v1::WorkerRequest request;
  std::string work_dir;  // exists; request.pb and worker.log go here
  std::vector<std::pair<std::string, std::string>> env;  // added / overridden
  absl::Duration time_limit = absl::InfiniteDuration();
  absl::Duration kill_grace = absl::Seconds(1);  // SIGTERM -> SIGKILL
};

struct WorkerOutcome {
  enum class Kind {
    kSucceeded,  // a result or inspection message, exit 0
    kFailed,     // the worker reported an error (error.code, error.message)
    kCancelled,  // Cancel() was called and the worker stopped
    kTimedOut,   // the time limit passed and the worker was stopped
    kCrashed,    // died by a signal or exited without a final message
  };
  Kind kind = Kind::kCrashed;
  std::optional<v1::ModelSummary> inspection;
  std::optional<v1::JobResult> result;
  v1::JobError error;    // kFailed: the worker's; otherwise a description
  int exit_code = -1;    // when it exited
  int term_signal = 0;   // when a signal ended it
  std::string log_tail;  // last lines of worker.log (at most 2 KiB)
  absl::Duration elapsed;
};

class WorkerProcess {
 public:
  using EventFn = std::function<void(const v1::JobEvent&)>;
  using ExitFn = std::function<void(WorkerOutcome)>;

  // INTERNAL when the request cannot be written or the process not started.
  static absl::StatusOr<std::unique_ptr<WorkerProcess>> Start(
      WorkerLaunch launch, EventFn on_event, ExitFn on_exit);
  ~WorkerProcess();
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;

  void Cancel();
  // Blocks until on_exit has returned. REQUIRES: not called from a callback.
  void Wait();
  pid_t pid() const;

 private:
  struct State;
  explicit WorkerProcess(std::shared_ptr<State> state);
  std::shared_ptr<State> state_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_WORKER_SUPERVISOR_H_
