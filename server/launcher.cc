#include "server/launcher.h"

#include <utility>

namespace zeroq::server {
namespace {

class ProcessHandle : public WorkerHandle {
 public:
  explicit ProcessHandle(std::unique_ptr<WorkerProcess> process)
      : process_(std::move(process)) {}
  void Cancel() override { process_->Cancel(); }

 private:
  std::unique_ptr<WorkerProcess> process_;
};

class ProcessLauncher : public Launcher {
 public:
  absl::StatusOr<std::unique_ptr<WorkerHandle>> Start(
      WorkerLaunch launch, EventFn on_event, ExitFn on_exit) override {
    absl::StatusOr<std::unique_ptr<WorkerProcess>> process =
        WorkerProcess::Start(std::move(launch), std::move(on_event),
                             std::move(on_exit));
    if (!process.ok()) return process.status();
    return std::unique_ptr<WorkerHandle>(
        new ProcessHandle(*std::move(process)));
  }
};

}  // namespace

std::unique_ptr<Launcher> NewProcessLauncher() {
  return std::make_unique<ProcessLauncher>();
}

}  // namespace zeroq::server
