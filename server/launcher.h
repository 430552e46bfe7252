// launcher.h: how the control plane starts workers, behind an interface, so
// that the dispatcher and the model registry can be tested with a fake
// launcher (crashes, timeouts, cancel races) without processes.
//
//   std::unique_ptr<Launcher> launcher = NewProcessLauncher();
//   ZQ_ASSIGN_OR_RETURN(std::unique_ptr<WorkerHandle> w,
//       launcher->Start(launch, on_event, on_exit));
//   w->Cancel();  // from any thread; on_exit follows
//
// The contract is WorkerProcess's (worker_supervisor.h): on_event runs for
// each progress event and on_exit exactly once, both on a thread of the
// launcher's; Cancel stops the worker (on_exit then reports kCancelled unless
// it had already finished). A handle's destructor may wait for that thread:
// never destroy a handle inside its own callbacks.
#ifndef ZEROQ_SERVER_LAUNCHER_H_
#define ZEROQ_SERVER_LAUNCHER_H_

#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "server/worker_supervisor.h"

namespace zeroq::server {

class WorkerHandle {
 public:
  virtual ~WorkerHandle() = default;
  virtual void Cancel() = 0;
};

class Launcher {
 public:
  using EventFn = std::function<void(const v1::JobEvent&)>;
  using ExitFn = std::function<void(WorkerOutcome)>;
  virtual ~Launcher() = default;
  virtual absl::StatusOr<std::unique_ptr<WorkerHandle>> Start(
      WorkerLaunch launch, EventFn on_event, ExitFn on_exit) = 0;
};

// zeroq-worker processes (WorkerProcess).
std::unique_ptr<Launcher> NewProcessLauncher();

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_LAUNCHER_H_
