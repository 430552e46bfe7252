// zeroq-server: the ZeroQ quantization service.
//
//   zeroq-server --data_dir=/var/lib/zeroq --listen=127.0.0.1:50051
//
// Flags are parsed here into the option structs of the layers below; see
// --help. SIGTERM or SIGINT stops it gracefully: watch streams end with
// UNAVAILABLE, new work is refused, running jobs get --shutdown_grace to
// finish and are otherwise stopped and re-queued for the next start.
#include <signal.h>
#include <unistd.h>

#include <climits>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/blob_store.h"
#include "server/device_pool.h"
#include "server/job_manager.h"
#include "server/job_store.h"
#include "server/service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "address:port to serve on (port 0: any free port)");
ABSL_FLAG(std::string, port_file, "",
          "write the bound port here once serving (for scripts and tests)");
ABSL_FLAG(std::string, data_dir, "zeroq-data",
          "job store (zeroq.db), blobs and job folders");
ABSL_FLAG(std::string, worker, "",
          "the zeroq-worker executable (default: beside this program, else the "
          "build's)");
ABSL_FLAG(std::string, devices, "auto",
          "\"auto\" (CUDA devices found, plus the CPU) or a list: "
          "cpu:SLOTS,cuda:INDEX:SLOTS");
ABSL_FLAG(int, cpu_slots, 1, "with --devices=auto: concurrent jobs on the CPU");
ABSL_FLAG(int, cuda_slots, 1,
          "with --devices=auto: concurrent jobs per CUDA device");
ABSL_FLAG(int, threads_per_job, 0,
          "intra-op threads of a job that sets none (0: cores / CPU slots)");
ABSL_FLAG(int, max_attempts, 3,
          "worker starts per job, counting those cut short by server restarts");
ABSL_FLAG(absl::Duration, job_time_limit, absl::Hours(4),
          "default time limit of a job");
ABSL_FLAG(absl::Duration, kill_grace, absl::Seconds(1),
          "SIGTERM to SIGKILL for a stopped worker");
ABSL_FLAG(absl::Duration, heartbeat_interval, absl::Seconds(10),
          "heartbeat on quiet watch streams");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "time running jobs get to finish at shutdown");
ABSL_FLAG(int64_t, max_model_mb, 2048, "largest model upload, MiB");

namespace {

std::string DefaultWorker() {
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = 0;
    std::filesystem::path beside =
        std::filesystem::path(self).parent_path() / "zeroq-worker";
    if (access(beside.c_str(), X_OK) == 0) return beside.string();
  }
#ifdef ZEROQ_DEFAULT_WORKER
  return ZEROQ_DEFAULT_WORKER;
#else
  return "zeroq-worker";
#endif
}

int Fail(const absl::Status& s) {
  std::cerr << "zeroq-server: " << s.message() << std::endl;
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "zeroq-server: the ZeroQ quantization service.\n"
      "  zeroq-server --data_dir=DIR [--listen=127.0.0.1:50051]");
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals in every thread; this one waits for them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  namespace fs = std::filesystem;
  const std::string data_dir = absl::GetFlag(FLAGS_data_dir);
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  if (ec)
    return Fail(absl::InternalError(
        absl::StrCat("creating ", data_dir, ": ", ec.message())));

  auto store = zeroq::server::SqliteJobStore::Open(
      (fs::path(data_dir) / "zeroq.db").string());
  if (!store.ok()) return Fail(store.status());
  auto blobs = zeroq::server::FileBlobStore::Create(
      (fs::path(data_dir) / "blobs").string());
  if (!blobs.ok()) return Fail(blobs.status());
  auto pool = zeroq::server::DevicePool::Parse(absl::GetFlag(FLAGS_devices),
                                               absl::GetFlag(FLAGS_cpu_slots),
                                               absl::GetFlag(FLAGS_cuda_slots));
  if (!pool.ok()) return Fail(pool.status());

  zeroq::server::ManagerOptions options;
  options.data_dir = data_dir;
  options.worker_path = absl::GetFlag(FLAGS_worker).empty()
                            ? DefaultWorker()
                            : absl::GetFlag(FLAGS_worker);
  int cpu_slots = 0;
  for (const auto& d : pool->devices()) {
    if (d.kind == zeroq::v1::DEVICE_CPU) cpu_slots += d.slots;
  }
  int cores =
      static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.cpu_threads_per_job =
      absl::GetFlag(FLAGS_threads_per_job) > 0
          ? absl::GetFlag(FLAGS_threads_per_job)
          : std::max(1, cores / std::max(1, cpu_slots));
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  options.default_time_limit = absl::GetFlag(FLAGS_job_time_limit);
  options.kill_grace = absl::GetFlag(FLAGS_kill_grace);
  options.max_model_bytes = absl::GetFlag(FLAGS_max_model_mb) << 20;
  std::string pool_text = pool->Describe();
  auto manager = zeroq::server::JobManager::Create(
      options, store->get(), blobs->get(), *std::move(pool));
  if (!manager.ok()) return Fail(manager.status());
  if (absl::Status s = (*manager)->Start(); !s.ok()) return Fail(s);

  zeroq::server::ServiceOptions service_options;
  service_options.heartbeat_interval = absl::GetFlag(FLAGS_heartbeat_interval);
  zeroq::server::ZeroQService service(manager->get(), service_options);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen),
                           grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(4 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(
        absl::StrCat("cannot listen on ", absl::GetFlag(FLAGS_listen))));
  }
  std::cerr << "zeroq-server: serving on port " << port << ", data in "
            << data_dir << ", devices " << pool_text << ", "
            << options.cpu_threads_per_job << " threads per CPU job, worker "
            << options.worker_path << std::endl;
  if (!absl::GetFlag(FLAGS_port_file).empty()) {
    std::string tmp = absl::GetFlag(FLAGS_port_file) + ".tmp";
    std::ofstream(tmp) << port << "\n";
    fs::rename(tmp, absl::GetFlag(FLAGS_port_file), ec);
  }

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  std::cerr << "zeroq-server: signal " << signal_number << ", shutting down"
            << std::endl;
  service.Shutdown();
  (*manager)->Stop(absl::GetFlag(FLAGS_shutdown_grace));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  std::cerr << "zeroq-server: stopped" << std::endl;
  return 0;
}
