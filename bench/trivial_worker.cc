// A stand-in for zeroq-worker that does no work, for bench/replica_bench.py:
// it measures what the server does around a job (claims, events, watchers),
// not the job itself.
//
//   trivial_worker --request=FILE --progress_fd=3 [--parent_pid=PID]
//
// A RunRequest: writes config.distillation.iterations progress events (none
// when unset), config.distillation.seed milliseconds apart (unset:
// ZEROQ_BENCH_EVENT_MS, else 20), then
// an empty JobResult (no artifacts), and exits 0. With ZEROQ_BENCH_HOLD=1 in
// the environment it instead waits for SIGTERM and exits 1 without a result
// (the server re-queues a job its shutdown stopped).
// An InspectRequest (a model upload): execs ZEROQ_BENCH_REAL_WORKER (the
// real zeroq-worker) with the same arguments, so that models become READY.
//
// Links only the protobuf messages (zeroq_proto): no LibTorch, no gRPC.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "zeroq/v1/worker.pb.h"

namespace {

bool WriteAll(int fd, const std::string& bytes) {
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    left -= static_cast<size_t>(n);
  }
  return true;
}

// Length-delimited: the length as a varint, then the message.
bool Send(int fd, const zeroq::v1::WorkerMessage& m) {
  std::string body;
  if (!m.SerializeToString(&body)) return false;
  std::string framed;
  uint64_t n = body.size();
  do {
    uint8_t b = n & 0x7f;
    n >>= 7;
    if (n != 0) b |= 0x80;
    framed.push_back(static_cast<char>(b));
  } while (n != 0);
  framed += body;
  return WriteAll(fd, framed);
}

const char* Flag(int argc, char** argv, const char* name) {
  const size_t len = std::strlen(name);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], name, len) == 0 && argv[i][len] == '=')
      return argv[i] + len + 1;
  }
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  const char* request_path = Flag(argc, argv, "--request");
  const char* fd_flag = Flag(argc, argv, "--progress_fd");
  if (request_path == nullptr) {
    std::fprintf(stderr, "trivial_worker: no --request=FILE\n");
    return 2;
  }
  const int fd = fd_flag != nullptr ? std::atoi(fd_flag) : 3;
  if (Flag(argc, argv, "--parent_pid") != nullptr) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  }

  std::ifstream in(request_path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  zeroq::v1::WorkerRequest request;
  if (!in || !request.ParseFromString(ss.str())) {
    std::fprintf(stderr, "trivial_worker: cannot read %s\n", request_path);
    return 2;
  }

  if (request.has_inspect()) {
    const char* real = std::getenv("ZEROQ_BENCH_REAL_WORKER");
    if (real == nullptr || *real == 0) {
      std::fprintf(stderr, "trivial_worker: inspection needs ZEROQ_BENCH_REAL_WORKER\n");
      return 2;
    }
    argv[0] = const_cast<char*>(real);
    ::execv(real, argv);
    std::fprintf(stderr, "trivial_worker: exec %s: %s\n", real, std::strerror(errno));
    return 2;
  }
  if (!request.has_run()) {
    std::fprintf(stderr, "trivial_worker: an empty request\n");
    return 2;
  }

  const char* hold = std::getenv("ZEROQ_BENCH_HOLD");
  if (hold != nullptr && std::strcmp(hold, "1") == 0) {
    for (;;) ::pause();  // SIGTERM (default action) ends it
  }

  const auto& d = request.run().config().distillation();
  const int events = d.has_iterations() ? d.iterations() : 0;
  const char* ms_env = std::getenv("ZEROQ_BENCH_EVENT_MS");
  const int interval_ms = d.has_seed()          ? static_cast<int>(d.seed())
                          : ms_env != nullptr ? std::atoi(ms_env)
                                              : 20;
  for (int i = 1; i <= events; ++i) {
    if (interval_ms > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms));
    }
    zeroq::v1::WorkerMessage m;
    zeroq::v1::JobEvent* e = m.mutable_event();
    e->set_type(zeroq::v1::EVENT_PROGRESS);
    e->set_stage(zeroq::v1::STAGE_DISTILL);
    e->set_step(i);
    e->set_total(events);
    e->set_loss(1.0 / i);
    if (!Send(fd, m)) return 1;
  }

  zeroq::v1::WorkerMessage m;
  zeroq::v1::JobResult* r = m.mutable_result();
  r->set_threads(1);
  r->set_device(request.run().device());
  if (!Send(fd, m)) return 1;
  return 0;
}
