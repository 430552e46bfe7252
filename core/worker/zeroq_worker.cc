// zeroq-worker: runs one ZeroQ job, or one model inspection, for zeroq-server.
//
//   zeroq-worker --request=FILE --progress_fd=3 [--parent_pid=PID]
//
// FILE holds a serialized zeroq.v1.WorkerRequest. The worker writes
// zeroq.v1.WorkerMessages to --progress_fd, each preceded by its length as a
// varint and written out whole before the next (proto/zeroq/v1/worker.proto):
// progress events, then one `inspection`, `result` or `error`. Human-readable
// lines (stage changes, messages, errors) go to stderr.
//
// SIGTERM or SIGINT cancels a job: RunJob stops at its next check and the
// worker reports CANCELLED (code 1). An inspection has no such checks, so
// there the signals keep their default action and end it at once.
// With --parent_pid the worker dies with its parent (PR_SET_PDEATHSIG), and
// exits at once if that parent is already gone, so an orphan never runs on.
//
// Exit status: 0 after a result or inspection, 1 after an error message (or
// when the parent is gone or the progress pipe broke), 2 for bad usage.
// Unknown flags are rejected by Abseil's parser, which exits with 1.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "core/cancellation.h"
#include "core/pipeline.h"
#include "core/worker/convert.h"
#include "google/protobuf/io/coded_stream.h"
#include "zeroq/v1/worker.pb.h"

ABSL_FLAG(std::string, request, "",
          "serialized zeroq.v1.WorkerRequest (required)");
ABSL_FLAG(int, progress_fd, 3, "file descriptor the WorkerMessages go to");
ABSL_FLAG(int, parent_pid, 0,
          "if > 0: die with this parent process, and exit at once if it is "
          "not our parent any more");

namespace zeroq::worker {
namespace {

using Clock = std::chrono::steady_clock;

// The job's token. The signal handler only stores to its lock-free atomic.
core::CancellationToken g_cancel;
static_assert(std::atomic<bool>::is_always_lock_free);

void OnCancelSignal(int) { g_cancel.Cancel(); }

const Clock::time_point g_start = Clock::now();

// One human line on stderr, with the seconds since the worker started.
template <typename... Args>
void Log(const absl::FormatSpec<Args...>& format, const Args&... args) {
  const double secs =
      std::chrono::duration<double>(Clock::now() - g_start).count();
  std::fprintf(stderr, "zeroq-worker [%7.2fs] %s\n", secs,
               absl::StrFormat(format, args...).c_str());
  std::fflush(stderr);
}

int Usage(const std::string& message) {
  std::fprintf(stderr,
               "zeroq-worker: %s\nusage: zeroq-worker --request=FILE "
               "[--progress_fd=3] [--parent_pid=PID]\n",
               message.c_str());
  return 2;
}

// Writes length-delimited WorkerMessages to a pipe, each with one write(2)
// sequence completed before returning, so the reader sees every message as
// soon as it is produced and a killed worker leaves at most one partial
// message (which the reader treats as a crash).
class MessageWriter {
 public:
  explicit MessageWriter(int fd) : fd_(fd) {}

  // False once the pipe is gone (the server stopped reading).
  bool Write(const v1::WorkerMessage& message) {
    if (broken_) return false;
    std::string body;
    if (!message.SerializeToString(&body)) {
      Log("cannot serialize a %s message", message.GetDescriptor()->name());
      return false;
    }
    uint8_t header[10];  // a varint32 takes at most 5
    uint8_t* end =
        google::protobuf::io::CodedOutputStream::WriteVarint32ToArray(
            static_cast<uint32_t>(body.size()), header);
    std::string frame(reinterpret_cast<const char*>(header), end - header);
    frame += body;
    const char* p = frame.data();
    size_t left = frame.size();
    while (left > 0) {
      ssize_t n = ::write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        Log("progress pipe (fd %d) is gone: %s", fd_, std::strerror(errno));
        broken_ = true;
        return false;
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    return true;
  }

  bool broken() const { return broken_; }

 private:
  int fd_;
  bool broken_ = false;
};

// Thins EVENT_PROGRESS out: per stage the first event, the last (step ==
// total), distillation's last step of every batch, and otherwise an event
// only when it reaches the next 1% of the stage (of the batch, when
// distilling) and 50 ms have passed since the last one sent. Other event
// types always pass. RECONSTRUCT, whatever its unit (a layer, a block, an
// Adam step), is thinned like any stage but DISTILL: by 1% of its total.
class ProgressThrottle {
 public:
  explicit ProgressThrottle(int64_t distill_steps_per_batch)
      : per_batch_(std::max<int64_t>(1, distill_steps_per_batch)) {}

  bool ShouldSend(const v1::JobEvent& e, Clock::time_point now) {
    if (e.type() != v1::EVENT_PROGRESS) return true;
    const bool new_stage = first_ || e.stage() != stage_;
    first_ = false;
    stage_ = e.stage();
    const bool distill = e.stage() == v1::STAGE_DISTILL;
    const bool last = e.total() > 0 && e.step() >= e.total();
    const bool batch_end =
        distill && e.step() > 0 && e.step() % per_batch_ == 0;
    const int64_t span = distill ? per_batch_ : e.total();
    // Unknown totals: every step is "new", so only the 50 ms rule thins.
    const int64_t bucket = span > 0 ? e.step() * 100 / span : e.step();
    const bool send = new_stage || last || batch_end ||
                      (bucket != last_bucket_ &&
                       now - last_sent_ >= std::chrono::milliseconds(50));
    if (send) {
      last_bucket_ = bucket;
      last_sent_ = now;
    }
    return send;
  }

 private:
  const int64_t per_batch_;
  bool first_ = true;
  v1::Stage stage_ = v1::STAGE_UNSPECIFIED;
  int64_t last_bucket_ = -1;
  Clock::time_point last_sent_;
};

v1::WorkerMessage ErrorMessage(const absl::Status& status) {
  v1::WorkerMessage m;
  *m.mutable_error() = ErrorFromStatus(status);
  return m;
}

// Reports `status` (not OK) and returns the exit code for it.
int Fail(MessageWriter& out, const absl::Status& status) {
  Log("error: %s: %s", absl::StatusCodeToString(status.code()),
      std::string(status.message()));
  out.Write(ErrorMessage(status));
  return 1;
}

int Inspect(const v1::InspectRequest& request, MessageWriter& out) {
  // Nothing in an inspection polls the token: let the signals end it.
  std::signal(SIGTERM, SIG_DFL);
  std::signal(SIGINT, SIG_DFL);
  if (g_cancel.IsCancelled()) {
    return Fail(out, absl::CancelledError("cancelled before the inspection"));
  }
  // A forward at batch 1: a few threads are plenty, and inspections may run
  // beside jobs.
  core::SetUpProcess(static_cast<int>(
      std::clamp(std::thread::hardware_concurrency(), 1u, 4u)));
  const std::vector<int64_t> shape(request.input_shape().begin(),
                                   request.input_shape().end());
  Log("inspecting %s", request.model_path());
  absl::StatusOr<core::ModelInfo> info =
      core::InspectModel(request.model_path(), shape, "cpu");
  if (!info.ok()) return Fail(out, info.status());

  v1::WorkerMessage m;
  v1::ModelSummary* s = m.mutable_inspection();
  for (const auto& [name, channels] : info->bn_layers) {
    v1::BnLayer* bn = s->add_bn_layers();
    bn->set_name(name);
    bn->set_channels(channels);
  }
  for (const core::ModelInfo::Layer& l : info->layers) {
    v1::QuantizableLayer* layer = s->add_layers();
    layer->set_name(l.name);
    layer->set_kind(l.kind);
    for (int64_t d : l.weight_shape) layer->add_weight_shape(d);
    layer->set_params(l.params);
    layer->set_bn(l.bn);
  }
  s->set_total_params(info->total_params);
  s->set_quantizable_params(info->quantizable_params);
  for (int64_t d : info->output_shape) s->add_output_shape(d);
  Log("inspected: %d BatchNorm layers, %d quantizable layers, %d weights",
      info->bn_layers.size(), info->layers.size(), info->quantizable_params);
  return out.Write(m) ? 0 : 1;
}

int Run(const v1::RunRequest& request, MessageWriter& out) {
  absl::StatusOr<core::JobSpec> spec = JobSpecFromRunRequest(request);
  if (!spec.ok()) return Fail(out, spec.status());

  ProgressThrottle throttle(spec->distill.iterations);
  v1::Stage logged_stage = v1::STAGE_UNSPECIFIED;
  auto on_progress = [&](const core::ProgressEvent& progress) {
    v1::JobEvent e = EventFromProgress(progress);
    // Clients see artifact names, never the server's folders.
    const std::string prefix = request.output_dir() + "/";
    if (absl::StrContains(e.message(), prefix) ||
        absl::StrContains(e.message(), request.model_path())) {
      e.set_message(absl::StrReplaceAll(
          e.message(), {{prefix, ""}, {request.model_path(), "the model"}}));
    }
    if (e.stage() != logged_stage) {
      logged_stage = e.stage();
      Log("stage %s", core::StageName(progress.stage));
    }
    if (!throttle.ShouldSend(e, Clock::now())) return;
    // Calibration names every activation site: too chatty for the log.
    // The learning stages log their last step's loss.
    if (!e.message().empty() && e.stage() != v1::STAGE_CALIBRATE) {
      Log("%s: %s", core::StageName(progress.stage), e.message());
    } else if ((e.stage() == v1::STAGE_DISTILL ||
                e.stage() == v1::STAGE_RECONSTRUCT) &&
               e.total() > 0 && e.step() == e.total()) {
      Log("%s %d/%d loss %.4g", core::StageName(progress.stage), e.step(),
          e.total(), e.loss());
    }
    v1::WorkerMessage m;
    *m.mutable_event() = std::move(e);
    // Nobody is listening any more: stop working for nothing.
    if (!out.Write(m)) g_cancel.Cancel();
  };

  if (g_cancel.IsCancelled()) {
    return Fail(out, absl::CancelledError("cancelled before the job started"));
  }
  Log("job: %s -> %s (%s, %d threads)", spec->model_path, spec->output_dir,
      spec->device, spec->threads);
  absl::StatusOr<core::JobResult> result =
      core::RunJob(*spec, on_progress, &g_cancel);
  if (!result.ok()) return Fail(out, result.status());
  if (out.broken()) return 1;

  v1::WorkerMessage m;
  *m.mutable_result() = ResultToProto(*result);
  Log("done: %d layers, %.1f KiB of weights, top-1 agreement %.2f%%",
      result->layers.size(), result->weight_bytes / 1024,
      100 * result->top1_agreement);
  return out.Write(m) ? 0 : 1;
}

int Main(int argc, char** argv) {
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1)
    return Usage(absl::StrCat("unexpected argument ", rest[1]));

  const int parent = absl::GetFlag(FLAGS_parent_pid);
  if (parent > 0) {
    // First ask to die with the parent, then check it is still there: in
    // this order no window is left in which it could die unnoticed.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
      Log("prctl(PR_SET_PDEATHSIG): %s", std::strerror(errno));
    }
    if (::getppid() != parent) {
      Log("parent %d is gone; exiting", parent);
      return 1;
    }
  }

  // Before anything slow, so that an early SIGTERM cancels too. SA_RESTART:
  // LibTorch's file writes are not all prepared for EINTR.
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnCancelSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  // A closed pipe shows as EPIPE from write(), which cancels the job.
  std::signal(SIGPIPE, SIG_IGN);

  const std::string request_path = absl::GetFlag(FLAGS_request);
  if (request_path.empty()) return Usage("--request is required");
  const int fd = absl::GetFlag(FLAGS_progress_fd);
  if (fd < 0 || ::fcntl(fd, F_GETFD) < 0) {
    return Usage(
        absl::StrCat("--progress_fd=", fd, " is not an open descriptor"));
  }
  MessageWriter out(fd);

  v1::WorkerRequest request;
  {
    std::ifstream in(request_path, std::ios::binary);
    std::stringstream bytes;
    if (in) bytes << in.rdbuf();
    if (!in || !request.ParseFromString(bytes.str())) {
      return Fail(out, absl::InternalError(absl::StrCat(
                           "cannot read a WorkerRequest from ", request_path)));
    }
  }
  switch (request.kind_case()) {
    case v1::WorkerRequest::kInspect:
      return Inspect(request.inspect(), out);
    case v1::WorkerRequest::kRun:
      return Run(request.run(), out);
    case v1::WorkerRequest::KIND_NOT_SET:
      break;
  }
  return Fail(out, absl::InvalidArgumentError(absl::StrCat(
                       request_path, " holds an empty WorkerRequest")));
}

}  // namespace
}  // namespace zeroq::worker

int main(int argc, char** argv) { return zeroq::worker::Main(argc, argv); }
