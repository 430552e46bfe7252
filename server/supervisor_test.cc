// Tests of WorkerProcess with the real zeroq-worker (ZEROQ_WORKER) on the
// committed models, and with small shell scripts standing in for a worker
// that misbehaves. Suite WorkerSupervisor: the supervisor's contract; suite
// Worker: the worker binary's protocol and its conversions.
//
// A start of zeroq-worker costs about a second (loading LibTorch), so the
// jobs here are tiny: fashion_cnn, a few distillation iterations, 1 thread.
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/worker_supervisor.h"

namespace zeroq::server {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;
using Kind = WorkerOutcome::Kind;

constexpr absl::Duration kPatience = absl::Seconds(120);

std::string ModelPath(const std::string& file) {
  return std::string(ZEROQ_TEST_MODELS_DIR) + "/" + file;
}

// A fresh folder under the system temp folder, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string tmpl =
        (fs::temp_directory_path() / "zeroq_supervisor_XXXXXX").string();
    if (char* p = ::mkdtemp(tmpl.data())) path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string Kinds(Kind k) {
  switch (k) {
    case Kind::kSucceeded:
      return "kSucceeded";
    case Kind::kFailed:
      return "kFailed";
    case Kind::kCancelled:
      return "kCancelled";
    case Kind::kTimedOut:
      return "kTimedOut";
    case Kind::kCrashed:
      return "kCrashed";
  }
  return "?";
}

std::string Describe(const WorkerOutcome& o) {
  return absl::StrCat(Kinds(o.kind), " code ", o.error.code(), ": ",
                      o.error.message(), " (exit ", o.exit_code, ", signal ",
                      o.term_signal, ")\nworker.log ends:\n", o.log_tail);
}

// What one worker reported, gathered from its callbacks.
class Recorder {
 public:
  WorkerProcess::EventFn OnEvent() {
    return [this](const v1::JobEvent& e) {
      absl::MutexLock lock(&mu_);
      events_.push_back(e);
    };
  }
  WorkerProcess::ExitFn OnExit() {
    return [this](WorkerOutcome o) {
      absl::MutexLock lock(&mu_);
      ++exits_;
      exit_time_ = absl::Now();
      outcome_ = std::move(o);
    };
  }

  // Waits for an event matching `pred`; false on timeout or exit.
  bool WaitForEvent(const std::function<bool(const v1::JobEvent&)>& pred,
                    absl::Duration timeout = kPatience) {
    absl::MutexLock lock(&mu_);
    auto found = [&] {
      for (const v1::JobEvent& e : events_) {
        if (pred(e)) return true;
      }
      return outcome_.has_value();
    };
    mu_.AwaitWithTimeout(absl::Condition(&found), timeout);
    for (const v1::JobEvent& e : events_) {
      if (pred(e)) return true;
    }
    return false;
  }

  WorkerOutcome Outcome(absl::Duration timeout = kPatience) {
    absl::MutexLock lock(&mu_);
    auto done = [&] { return outcome_.has_value(); };
    if (!mu_.AwaitWithTimeout(absl::Condition(&done), timeout)) {
      ADD_FAILURE() << "no outcome after " << timeout;
      return WorkerOutcome();
    }
    return *outcome_;
  }

  std::vector<v1::JobEvent> events() {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  absl::Time exit_time() {
    absl::MutexLock lock(&mu_);
    return exit_time_;
  }
  int exits() {
    absl::MutexLock lock(&mu_);
    return exits_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::JobEvent> events_;
  std::optional<WorkerOutcome> outcome_;
  absl::Time exit_time_;
  int exits_ = 0;
};

WorkerLaunch InspectLaunch(const std::string& work_dir,
                           const std::string& model,
                           std::vector<int64_t> shape) {
  WorkerLaunch launch;
  launch.worker_path = ZEROQ_WORKER;
  launch.work_dir = work_dir;
  v1::InspectRequest* inspect = launch.request.mutable_inspect();
  inspect->set_model_path(model);
  for (int64_t d : shape) inspect->add_input_shape(d);
  return launch;
}

// fashion_cnn, W8A8, one thread; artifacts go to work_dir/out.
WorkerLaunch RunLaunch(const std::string& work_dir, int iterations,
                       int batch = 8) {
  WorkerLaunch launch;
  launch.worker_path = ZEROQ_WORKER;
  launch.work_dir = work_dir;
  fs::create_directories(work_dir + "/out");
  v1::RunRequest* run = launch.request.mutable_run();
  run->set_model_path(ModelPath("fashion_cnn.pt"));
  for (int64_t d : {1, 28, 28}) run->add_input_shape(d);
  run->set_output_dir(work_dir + "/out");
  run->set_threads(1);
  run->set_device("cpu");
  v1::QuantizationConfig* config = run->mutable_config();
  config->set_weight_bits(8);
  config->set_activation_bits(8);
  config->mutable_distillation()->set_iterations(iterations);
  config->mutable_distillation()->set_batch_size(batch);
  return launch;
}

std::string WriteScript(const std::string& dir, const std::string& body) {
  const std::string path = dir + "/fake-worker.sh";
  std::ofstream(path) << "#!/bin/sh\n" << body;
  ::chmod(path.c_str(), 0755);
  return path;
}

bool IsDistill(const v1::JobEvent& e) {
  return e.type() == v1::EVENT_PROGRESS && e.stage() == v1::STAGE_DISTILL;
}

TEST(WorkerSupervisor, InspectsAModel) {
  TempDir dir;
  Recorder rec;
  const absl::Time t0 = absl::Now();
  auto worker = WorkerProcess::Start(
      InspectLaunch(dir.path(), ModelPath("fashion_cnn.pt"), {1, 28, 28}),
      rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  // Start returns at once; the worker is a process of its own group.
  EXPECT_LT(absl::Now() - t0, absl::Milliseconds(500));
  const pid_t pid = (*worker)->pid();
  EXPECT_GT(pid, 0);
  if (pid > 0) {
    EXPECT_EQ(::getpgid(pid), pid);
  }

  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kSucceeded) << Describe(o);
  std::cout << "[ info     ] start + inspect fashion_cnn: "
            << absl::ToDoubleMilliseconds(o.elapsed) << " ms\n";
  RecordProperty("inspect_ms",
                 std::to_string(absl::ToDoubleMilliseconds(o.elapsed)));
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.term_signal, 0);
  EXPECT_FALSE(o.result.has_value());
  ASSERT_TRUE(o.inspection.has_value());
  const v1::ModelSummary& s = *o.inspection;
  EXPECT_EQ(s.bn_layers_size(), 5);
  ASSERT_EQ(s.layers_size(), 6);
  EXPECT_EQ(s.layers(0).name(), "stem.0");
  EXPECT_EQ(s.layers(0).kind(), "conv");
  EXPECT_EQ(s.layers(0).bn(), "stem.1");
  EXPECT_EQ(s.layers(5).kind(), "linear");
  EXPECT_EQ(s.quantizable_params(), 42256);
  EXPECT_GT(s.total_params(), s.quantizable_params());
  EXPECT_THAT(s.output_shape(), ElementsAre(1, 10));
  EXPECT_TRUE(rec.events().empty());

  (*worker)->Wait();
  EXPECT_EQ((*worker)->pid(), 0);  // reaped
  EXPECT_EQ(rec.exits(), 1);
  EXPECT_TRUE(fs::exists(dir.path() + "/request.pb"));
  EXPECT_TRUE(fs::exists(dir.path() + "/worker.log"));
  EXPECT_THAT(o.log_tail, HasSubstr("inspected"));
}

TEST(WorkerSupervisor, InspectingRandomBytesFails) {
  TempDir dir;
  const std::string model = dir.path() + "/random.pt";
  {
    std::mt19937 gen(7);
    std::ofstream out(model, std::ios::binary);
    for (int i = 0; i < 10000; ++i) out.put(static_cast<char>(gen()));
  }
  Recorder rec;
  auto worker =
      WorkerProcess::Start(InspectLaunch(dir.path(), model, {1, 28, 28}),
                           rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kFailed) << Describe(o);
  EXPECT_EQ(o.error.code(), 3);  // INVALID_ARGUMENT
  EXPECT_THAT(o.error.message(), HasSubstr("TorchScript"));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_FALSE(o.inspection.has_value());
}

TEST(WorkerSupervisor, RunsASmallJob) {
  TempDir dir;
  Recorder rec;
  auto worker = WorkerProcess::Start(RunLaunch(dir.path(), 20), rec.OnEvent(),
                                     rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kSucceeded) << Describe(o);
  EXPECT_EQ(o.exit_code, 0);

  // Events: in stage order, steps rising within a stage, distillation
  // reported up to its last step.
  std::vector<v1::JobEvent> events = rec.events();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().stage(), v1::STAGE_INSPECT);
  EXPECT_EQ(events.back().stage(), v1::STAGE_EXPORT);
  int distill = 0;
  int64_t last_distill_step = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const v1::JobEvent& e = events[i];
    EXPECT_EQ(e.seq(), 0);  // the server numbers them
    if (i > 0) {
      ASSERT_GE(e.stage(), events[i - 1].stage()) << "event " << i;
      if (e.stage() == events[i - 1].stage()) {
        EXPECT_GE(e.step(), events[i - 1].step());
      }
    }
    if (IsDistill(e)) {
      ++distill;
      EXPECT_EQ(e.total(), 20);
      EXPECT_GT(e.loss(), 0);
      EXPECT_GT(e.lr(), 0);
      last_distill_step = e.step();
    }
  }
  EXPECT_GE(distill, 2);  // at least the first and the last
  EXPECT_LE(distill, 20);
  EXPECT_EQ(last_distill_step, 20);

  ASSERT_TRUE(o.result.has_value());
  const v1::JobResult& r = *o.result;
  ASSERT_EQ(r.layers_size(), 6);
  for (const v1::LayerResult& l : r.layers()) {
    EXPECT_EQ(l.bits(), 8) << l.name();
    EXPECT_TRUE(l.candidate_bits().empty());  // uniform: no sweep
  }
  EXPECT_EQ(r.layers(0).op(), "aten::conv2d");
  EXPECT_EQ(r.activations_size(), 5);
  EXPECT_EQ(r.bn_layers(), 5);
  EXPECT_EQ(r.samples(), 8);
  EXPECT_EQ(r.threads(), 1);
  EXPECT_EQ(r.device(), "cpu");
  EXPECT_EQ(r.calibration(), "distilled");
  EXPECT_GT(r.distill_initial_loss(), r.distill_final_loss());
  // Unset in an all-8-bit job: the image prior is off.
  EXPECT_EQ(r.distill_tv_weight(), 0);
  std::set<v1::Stage> stages;
  for (const v1::StageTime& t : r.stage_seconds()) stages.insert(t.stage());
  EXPECT_THAT(stages,
              UnorderedElementsAre(v1::STAGE_INSPECT, v1::STAGE_DISTILL,
                                   v1::STAGE_CALIBRATE, v1::STAGE_EXPORT));
  std::vector<std::string> names;
  for (const v1::Artifact& a : r.artifacts()) {
    names.push_back(a.name());
    const std::string path = dir.path() + "/out/" + a.name();
    ASSERT_TRUE(fs::exists(path)) << path;
    EXPECT_EQ(static_cast<int64_t>(fs::file_size(path)), a.size_bytes())
        << a.name();
    EXPECT_GT(a.size_bytes(), 0);
    EXPECT_TRUE(a.sha256().empty());
  }
  EXPECT_THAT(names, ElementsAre("model.zeroq.pt", "recipe.json",
                                 "distilled.pt", "report.json"));
  EXPECT_THAT(o.log_tail, HasSubstr("DISTILL"));
}

TEST(WorkerSupervisor, CancelStopsTheWorkerQuickly) {
  TempDir dir;
  Recorder rec;
  auto worker = WorkerProcess::Start(RunLaunch(dir.path(), 100000),
                                     rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(rec.WaitForEvent(IsDistill)) << Describe(rec.Outcome());

  const absl::Time t0 = absl::Now();
  // Thread-safe and idempotent: several callers at once.
  std::vector<std::thread> cancellers;
  for (int i = 0; i < 4; ++i)
    cancellers.emplace_back([&] { (*worker)->Cancel(); });
  for (std::thread& t : cancellers) t.join();
  WorkerOutcome o = rec.Outcome();
  const absl::Duration took = rec.exit_time() - t0;
  std::cout << "[ info     ] Cancel() to on_exit: "
            << absl::ToDoubleMilliseconds(took) << " ms\n";
  RecordProperty("cancel_ms", std::to_string(absl::ToDoubleMilliseconds(took)));
  ASSERT_EQ(o.kind, Kind::kCancelled) << Describe(o);
  EXPECT_LT(took, absl::Seconds(2));
  EXPECT_EQ(o.error.code(), 1);  // CANCELLED
  EXPECT_EQ(o.term_signal, 0) << "the worker should stop by itself on SIGTERM";
  EXPECT_EQ(o.exit_code, 1);
  (*worker)->Cancel();  // after the exit: nothing happens
  (*worker)->Wait();
  EXPECT_EQ(rec.exits(), 1);
  // Cancelled before anything was written.
  EXPECT_TRUE(fs::is_empty(dir.path() + "/out"));
}

TEST(WorkerSupervisor, TimeLimit) {
  TempDir dir;
  Recorder rec;
  WorkerLaunch launch = RunLaunch(dir.path(), 100000);
  launch.time_limit = absl::Milliseconds(500);
  launch.kill_grace = absl::Milliseconds(500);
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kTimedOut) << Describe(o);
  EXPECT_EQ(o.error.code(), 4);  // DEADLINE_EXCEEDED
  EXPECT_GE(o.elapsed, absl::Milliseconds(500));
  EXPECT_LT(o.elapsed, absl::Seconds(3));
}

TEST(WorkerSupervisor, KilledWorkerIsACrash) {
  TempDir dir;
  Recorder rec;
  auto worker = WorkerProcess::Start(RunLaunch(dir.path(), 100000),
                                     rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(rec.WaitForEvent(IsDistill)) << Describe(rec.Outcome());
  const pid_t pid = (*worker)->pid();
  ASSERT_GT(pid, 0);
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  WorkerOutcome o = rec.Outcome(absl::Seconds(10));
  ASSERT_EQ(o.kind, Kind::kCrashed) << Describe(o);
  EXPECT_EQ(o.term_signal, SIGKILL);
  EXPECT_EQ(o.exit_code, -1);
  EXPECT_EQ(o.error.code(), 13);  // INTERNAL
  EXPECT_THAT(o.error.message(), HasSubstr("signal 9 (SIGKILL)"));
  EXPECT_FALSE(o.result.has_value());
}

// Decision: a worker that cannot be started is Start's error (INTERNAL,
// naming the path and the reason), not an outcome: on_exit never runs.
TEST(WorkerSupervisor, BadWorkerPathFailsToStart) {
  TempDir dir;
  Recorder rec;
  WorkerLaunch launch =
      InspectLaunch(dir.path(), ModelPath("fashion_cnn.pt"), {1, 28, 28});
  launch.worker_path = dir.path() + "/no-such-worker";
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_FALSE(worker.ok());
  EXPECT_EQ(worker.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(worker.status().message()),
              HasSubstr("no-such-worker"));
  EXPECT_THAT(std::string(worker.status().message()),
              HasSubstr("No such file"));
  EXPECT_EQ(rec.exits(), 0);

  // A work_dir that does not exist: the request cannot be written.
  launch = InspectLaunch(dir.path() + "/missing", ModelPath("fashion_cnn.pt"),
                         {1, 28, 28});
  worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_FALSE(worker.ok());
  EXPECT_EQ(worker.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(worker.status().message()), HasSubstr("request.pb"));
}

TEST(WorkerSupervisor, DestructorCancelsAndWaits) {
  TempDir dir;
  Recorder rec;
  auto worker = WorkerProcess::Start(RunLaunch(dir.path(), 100000),
                                     rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE(rec.WaitForEvent(IsDistill)) << Describe(rec.Outcome());
  const pid_t pid = (*worker)->pid();
  const absl::Time t0 = absl::Now();
  worker->reset();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  EXPECT_EQ(rec.exits(), 1);
  EXPECT_EQ(rec.Outcome().kind, Kind::kCancelled);
  EXPECT_NE(::kill(pid, 0), 0);  // reaped: no such process any more
}

// Cancel and pid from the callbacks themselves (the contract allows it).
TEST(WorkerSupervisor, CancelFromTheEventCallback) {
  TempDir dir;
  Recorder rec;
  WorkerProcess* self = nullptr;
  absl::Mutex mu;
  std::vector<pid_t> pids;
  auto worker = WorkerProcess::Start(
      RunLaunch(dir.path(), 100000),
      [&, on_event = rec.OnEvent()](const v1::JobEvent& e) {
        on_event(e);
        absl::MutexLock lock(&mu);
        if (self != nullptr && IsDistill(e)) {
          pids.push_back(self->pid());
          self->Cancel();
        }
      },
      rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  {
    absl::MutexLock lock(&mu);
    self = worker->get();
  }
  WorkerOutcome o = rec.Outcome();
  EXPECT_EQ(o.kind, Kind::kCancelled) << Describe(o);
  absl::MutexLock lock(&mu);
  ASSERT_FALSE(pids.empty());
  EXPECT_GT(pids.front(), 0);
}

TEST(WorkerSupervisor, ExitWithoutResultIsACrash) {
  TempDir dir;
  Recorder rec;
  WorkerLaunch launch =
      InspectLaunch(dir.path(), ModelPath("fashion_cnn.pt"), {1, 28, 28});
  launch.worker_path =
      WriteScript(dir.path(),
                  "echo \"args: $*\"\necho \"env: "
                  "ZEROQ_TEST_ENV=$ZEROQ_TEST_ENV\"\nexit 3\n");
  launch.env = {{"ZEROQ_TEST_ENV", "hello"},
                {"PATH", getenv("PATH") ? getenv("PATH") : ""}};
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kCrashed) << Describe(o);
  EXPECT_EQ(o.exit_code, 3);
  EXPECT_EQ(o.term_signal, 0);
  EXPECT_EQ(o.error.message(), "worker exited with status 3 without a result");
  EXPECT_THAT(o.log_tail, HasSubstr("env: ZEROQ_TEST_ENV=hello"));
  EXPECT_THAT(o.log_tail, HasSubstr("--request=" + dir.path() + "/request.pb"));
  EXPECT_THAT(o.log_tail, HasSubstr("--progress_fd=3"));
  EXPECT_THAT(o.log_tail, HasSubstr(absl::StrCat("--parent_pid=", ::getpid())));

  // The request file is the launch's request.
  std::ifstream in(dir.path() + "/request.pb", std::ios::binary);
  v1::WorkerRequest request;
  ASSERT_TRUE(request.ParseFromIstream(&in));
  EXPECT_EQ(request.inspect().model_path(), ModelPath("fashion_cnn.pt"));
}

TEST(WorkerSupervisor, AbsurdMessageLengthIsACrash) {
  TempDir dir;
  Recorder rec;
  WorkerLaunch launch =
      InspectLaunch(dir.path(), ModelPath("fashion_cnn.pt"), {1, 28, 28});
  // A length of 2^32 - 1, then silence: the supervisor must not wait for it.
  launch.worker_path = WriteScript(
      dir.path(), "printf '\\377\\377\\377\\377\\017' >&3\nexec sleep 30\n");
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome(absl::Seconds(20));
  ASSERT_EQ(o.kind, Kind::kCrashed) << Describe(o);
  EXPECT_THAT(o.error.message(), HasSubstr("64 MiB"));
  EXPECT_EQ(o.term_signal, SIGKILL);
  EXPECT_LT(o.elapsed, absl::Seconds(5));
}

TEST(WorkerSupervisor, LogIsAppended) {
  TempDir dir;
  std::ofstream(dir.path() + "/worker.log") << "earlier attempt\n";
  Recorder rec;
  WorkerLaunch launch =
      InspectLaunch(dir.path(), ModelPath("fashion_cnn.pt"), {1, 28, 28});
  launch.worker_path =
      WriteScript(dir.path(), "echo second attempt >&2\nexit 0\n");
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  EXPECT_EQ(o.kind, Kind::kCrashed) << Describe(o);  // exit 0, but no result
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.log_tail, "earlier attempt\nsecond attempt\n");
}

// True while `pid` exists and is not a zombie.
bool Running(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return false;
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() &&
         stat[paren + 2] != 'Z';
}

// A server process that dies takes its workers with it (PR_SET_PDEATHSIG).
TEST(WorkerSupervisor, WorkerDiesWithTheServer) {
  TempDir dir;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t server = ::fork();
  ASSERT_GE(server, 0);
  if (server == 0) {
    // The "server": starts a long job, reports the worker's pid, dies hard
    // once the worker is distilling.
    ::close(fds[0]);
    Recorder rec;
    auto worker = WorkerProcess::Start(RunLaunch(dir.path(), 100000),
                                       rec.OnEvent(), rec.OnExit());
    pid_t pid = worker.ok() ? (*worker)->pid() : 0;
    if (pid > 0) rec.WaitForEvent(IsDistill);
    (void)!::write(fds[1], &pid, sizeof(pid));
    ::_exit(0);
  }
  ::close(fds[1]);
  pid_t worker = 0;
  ASSERT_EQ(::read(fds[0], &worker, sizeof(worker)),
            static_cast<ssize_t>(sizeof(worker)));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(server, &status, 0), server);
  ASSERT_GT(worker, 0);
  const absl::Time t0 = absl::Now();
  while (Running(worker) && absl::Now() - t0 < absl::Seconds(10)) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_FALSE(Running(worker))
      << "worker " << worker << " outlived its server";
}

TEST(Worker, InvalidConfigNamesTheField) {
  TempDir dir;
  Recorder rec;
  WorkerLaunch launch = RunLaunch(dir.path(), 20);
  launch.request.mutable_run()->mutable_config()->set_weight_bits(9);
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kFailed) << Describe(o);
  EXPECT_EQ(o.error.code(), 3);
  EXPECT_EQ(o.error.message(), "config.weight_bits: 9 is outside 0 (float) or 2..8");

  Recorder rec2;
  launch = RunLaunch(dir.path(), 20);
  launch.request.mutable_run()->mutable_config()->set_budget("lots");
  worker = WorkerProcess::Start(launch, rec2.OnEvent(), rec2.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  o = rec2.Outcome();
  ASSERT_EQ(o.kind, Kind::kFailed) << Describe(o);
  EXPECT_EQ(o.error.code(), 3);
  EXPECT_THAT(o.error.message(), HasSubstr("config.budget: "));
}

// A mixed-precision job, then a re-plan from its report and data.
TEST(Worker, MixedPrecisionThenReplan) {
  TempDir dir;
  const std::string first = dir.path() + "/first";
  fs::create_directories(first);
  Recorder rec;
  WorkerLaunch launch = RunLaunch(first, 20);
  launch.request.mutable_run()->mutable_config()->set_budget("MP4");
  auto worker = WorkerProcess::Start(launch, rec.OnEvent(), rec.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o = rec.Outcome();
  ASSERT_EQ(o.kind, Kind::kSucceeded) << Describe(o);

  int sensitivity = 0, pareto = 0, chosen = 0;
  for (const v1::JobEvent& e : rec.events()) {
    if (e.type() == v1::EVENT_SENSITIVITY) {
      ++sensitivity;
      EXPECT_EQ(e.stage(), v1::STAGE_SENSITIVITY);
      EXPECT_FALSE(e.layer().empty());
      EXPECT_THAT(e.bits(), ::testing::AnyOf(2, 3, 4, 6, 8));
      EXPECT_GE(e.omega(), 0);
    }
    if (e.type() == v1::EVENT_PARETO) {
      ++pareto;
      EXPECT_EQ(e.stage(), v1::STAGE_PARETO);
      EXPECT_GT(e.size_bits(), 0);
      chosen += e.chosen();
    }
  }
  EXPECT_EQ(sensitivity, 6 * 5);  // never thinned out
  ASSERT_TRUE(o.result.has_value());
  const v1::JobResult& r = *o.result;
  EXPECT_EQ(pareto, r.frontier_size());
  // Unset with a budget: the image prior at its default weight.
  EXPECT_EQ(r.distill_tv_weight(), 10);
  // The choice is measured end to end among the points nearest the budget
  // and the uniform width: the frontier events mark PARETO's choice where it
  // is a frontier point. When RECONSTRUCT compared that choice with the
  // uniform runner-up (both have a KL after reconstruction), the job's
  // choice is the one that ended closer to float.
  const v1::ParetoPoint* planned = &r.chosen();
  const v1::MeasuredPoint* learned[2] = {nullptr, nullptr};
  for (const v1::MeasuredPoint& m : r.measured_points()) {
    if (!m.has_reconstructed_kl()) continue;
    learned[m.uniform() ? 1 : 0] = &m;
  }
  if (learned[0] != nullptr && learned[1] != nullptr) {
    planned = &learned[0]->point();
    const v1::MeasuredPoint* kept =
        learned[1]->reconstructed_kl() < learned[0]->reconstructed_kl() ? learned[1]
                                                                           : learned[0];
    EXPECT_TRUE(std::equal(kept->point().bits().begin(), kept->point().bits().end(),
                           r.chosen().bits().begin(), r.chosen().bits().end()));
  }
  int on_frontier = 0;
  for (const v1::ParetoPoint& p : r.frontier()) {
    on_frontier += std::equal(p.bits().begin(), p.bits().end(),
                              planned->bits().begin(), planned->bits().end());
  }
  EXPECT_EQ(chosen, on_frontier);
  EXPECT_LE(on_frontier, 1);
  ASSERT_EQ(r.layers_size(), 6);
  for (const v1::LayerResult& l : r.layers()) {
    EXPECT_THAT(l.candidate_bits(), ElementsAre(2, 3, 4, 6, 8)) << l.name();
    EXPECT_EQ(l.sensitivity_size(), 5) << l.name();
  }
  ASSERT_GT(r.frontier_size(), 0);
  EXPECT_EQ(r.chosen().bits_size(), 6);
  EXPECT_GT(r.budget_bits(), 0);
  EXPECT_LE(r.chosen().size_bits(), r.budget_bits());
  for (const v1::ParetoPoint& p : r.frontier()) EXPECT_EQ(p.bits_size(), 6);

  // Re-plan for a larger budget with the stored table and data.
  const std::string second = dir.path() + "/second";
  fs::create_directories(second);
  Recorder rec2;
  launch = RunLaunch(second, 20);
  launch.request.mutable_run()->mutable_config()->set_budget("MP6");
  launch.request.mutable_run()->set_sensitivity_report_path(first +
                                                            "/out/report.json");
  launch.request.mutable_run()->set_calibration_data_path(first +
                                                          "/out/distilled.pt");
  worker = WorkerProcess::Start(launch, rec2.OnEvent(), rec2.OnExit());
  ASSERT_TRUE(worker.ok()) << worker.status();
  WorkerOutcome o2 = rec2.Outcome();
  ASSERT_EQ(o2.kind, Kind::kSucceeded) << Describe(o2);
  for (const v1::JobEvent& e : rec2.events()) {
    EXPECT_NE(e.type(), v1::EVENT_SENSITIVITY);
    EXPECT_NE(e.stage(), v1::STAGE_DISTILL);
  }
  const v1::JobResult& r2 = *o2.result;
  EXPECT_EQ(r2.calibration(), "distilled.pt");
  EXPECT_EQ(r2.samples(), 8);
  ASSERT_EQ(r2.layers_size(), 6);
  for (int i = 0; i < 6; ++i) {
    EXPECT_THAT(r2.layers(i).sensitivity(),
                ::testing::ElementsAreArray(r.layers(i).sensitivity()));
  }
  EXPECT_GE(r2.chosen().size_bits(), r.chosen().size_bits());
  std::vector<std::string> names;
  for (const v1::Artifact& a : r2.artifacts()) names.push_back(a.name());
  EXPECT_THAT(names, ElementsAre("model.zeroq.pt", "recipe.json",
                                 "calibration.pt", "report.json"));
}

int RunShell(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(Worker, BadUsageExitsWith2) {
  const std::string worker = ZEROQ_WORKER;
  EXPECT_EQ(RunShell(worker + " > /dev/null 2>&1"), 2);  // no --request
  EXPECT_EQ(RunShell(worker + " --request=x stray > /dev/null 2>&1"),
            2);  // an argument
  EXPECT_EQ(
      RunShell(worker + " --request=x --progress_fd=9 > /dev/null 2>&1 9>&-"),
      2);
}

// Started by a process that is not its --parent_pid: it exits at once, 1.
TEST(Worker, ExitsWhenItsParentIsGone) {
  const absl::Time t0 = absl::Now();
  EXPECT_EQ(RunShell(std::string(ZEROQ_WORKER) +
                     " --parent_pid=1 --request=/nonexistent > /dev/null 2>&1"),
            1);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(10));
}

}  // namespace
}  // namespace zeroq::server
