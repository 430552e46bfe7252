// Tests of ModelRegistry on a real SqliteJobStore and FileBlobStore, with a
// fake Launcher: no worker processes; each test decides how an inspection
// ends (success, crash, time-out, cancellation) and when.
#include "server/model_registry.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/blob_store.h"
#include "server/job_store.h"
#include "server/launcher.h"
#include "server/metrics.h"
#include "server/quotas.h"
#include "server/redact.h"

namespace zeroq::server {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

// Records every launch; the test ends each worker with the outcome it
// chooses. As with WorkerProcess, on_exit runs once, on a thread of its own,
// and Cancel makes it report kCancelled unless it had ended already.
class FakeLauncher : public Launcher {
 public:
  class Worker {
   public:
    Worker(WorkerLaunch launch, ExitFn on_exit)
        : launch_(std::move(launch)), on_exit_(std::move(on_exit)) {}
    ~Worker() { Join(); }

    const WorkerLaunch& launch() const { return launch_; }
    bool cancelled() const {
      absl::MutexLock lock(&mu_);
      return cancelled_;
    }
    // Runs on_exit with `outcome` on a new thread; false when the worker
    // has ended already.
    bool Exit(WorkerOutcome outcome) {
      absl::MutexLock lock(&mu_);
      if (exited_) return false;
      exited_ = true;
      thread_ = std::thread(
          [this, o = std::move(outcome)]() mutable { on_exit_(std::move(o)); });
      return true;
    }
    void Cancel() {
      {
        absl::MutexLock lock(&mu_);
        cancelled_ = true;
      }
      WorkerOutcome o;
      o.kind = WorkerOutcome::Kind::kCancelled;
      o.error.set_code(static_cast<int>(absl::StatusCode::kCancelled));
      o.error.set_message("cancelled");
      Exit(std::move(o));
    }
    // Waits for on_exit to return (when it was called).
    void Join() {
      std::thread t;
      {
        absl::MutexLock lock(&mu_);
        t = std::move(thread_);
      }
      if (t.joinable()) t.join();
    }

   private:
    const WorkerLaunch launch_;
    const ExitFn on_exit_;
    mutable absl::Mutex mu_;
    bool exited_ ABSL_GUARDED_BY(mu_) = false;
    bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
    std::thread thread_ ABSL_GUARDED_BY(mu_);
  };

  ~FakeLauncher() override {
    for (const auto& w : Workers()) w->Join();
  }

  absl::StatusOr<std::unique_ptr<WorkerHandle>> Start(
      WorkerLaunch launch, EventFn /*on_event*/, ExitFn on_exit) override {
    absl::MutexLock lock(&mu_);
    if (fail_starts_) return absl::InternalError("fork: out of memory");
    auto worker = std::make_shared<Worker>(std::move(launch), std::move(on_exit));
    workers_.push_back(worker);
    return std::unique_ptr<WorkerHandle>(new Handle(worker));
  }

  void FailStarts() {
    absl::MutexLock lock(&mu_);
    fail_starts_ = true;
  }
  int launches() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(workers_.size());
  }
  // The n-th launch (from 0); waits up to 10 s for it. nullptr when it
  // never came.
  std::shared_ptr<Worker> WaitForLaunch(int n) {
    absl::MutexLock lock(&mu_);
    auto launched = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return static_cast<int>(workers_.size()) > n;
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&launched), absl::Seconds(10)))
      return nullptr;
    return workers_[n];
  }

 private:
  class Handle : public WorkerHandle {
   public:
    explicit Handle(std::shared_ptr<Worker> worker)
        : worker_(std::move(worker)) {}
    // Like WorkerProcess's: waits for the exit callback to have returned.
    ~Handle() override { worker_->Join(); }
    void Cancel() override { worker_->Cancel(); }

   private:
    std::shared_ptr<Worker> worker_;
  };

  std::vector<std::shared_ptr<Worker>> Workers() {
    absl::MutexLock lock(&mu_);
    return workers_;
  }

  mutable absl::Mutex mu_;
  bool fail_starts_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::shared_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
};

WorkerOutcome Succeeded() {
  WorkerOutcome o;
  o.kind = WorkerOutcome::Kind::kSucceeded;
  v1::ModelSummary summary;
  summary.set_total_params(1234);
  summary.add_output_shape(1);
  summary.add_output_shape(10);
  summary.add_bn_layers()->set_name("bn1");
  o.inspection = summary;
  o.exit_code = 0;
  return o;
}

WorkerOutcome Ended(WorkerOutcome::Kind kind, const std::string& message) {
  WorkerOutcome o;
  o.kind = kind;
  o.error.set_code(static_cast<int>(absl::StatusCode::kInternal));
  o.error.set_message(message);
  return o;
}

// Polls `done` until it holds or 10 s have passed.
bool Eventually(const std::function<bool()>& done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

double Value(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " "))
      continue;
    double value;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return std::nan("");
}

constexpr char kWorkerDir[] = "/opt/zeroq/libexec";

class ModelRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern =
        (fs::path(testing::TempDir()) / "zeroq-registry-test-XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    auto store = SqliteJobStore::Open((dir_ / "zeroq.db").string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    auto blobs = FileBlobStore::Create((dir_ / "blobs").string());
    ASSERT_TRUE(blobs.ok()) << blobs.status();
    blobs_ = *std::move(blobs);
    auto metrics = Metrics::Create("");
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    redactor_ = std::make_unique<Redactor>(
        std::vector<std::string>{dir_.string(), kWorkerDir});
    quotas_ = std::make_unique<TenantQuotas>(nullptr, store_.get(),
                                             blobs_.get(), metrics_.get());
  }

  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  RegistryOptions Options(int max_concurrent = 2) {
    RegistryOptions options;
    options.work_dir = (dir_ / "jobs").string();
    options.worker_path = absl::StrCat(kWorkerDir, "/zeroq-worker");
    options.max_concurrent_inspections = max_concurrent;
    options.metrics = metrics_.get();
    options.redactor = redactor_.get();
    return options;
  }

  std::unique_ptr<ModelRegistry> Started(FakeLauncher* launcher,
                                         int max_concurrent = 2) {
    auto registry = std::make_unique<ModelRegistry>(
        Options(max_concurrent), store_.get(), blobs_.get(), quotas_.get(),
        launcher);
    absl::Status s = registry->Start();
    EXPECT_TRUE(s.ok()) << s;
    return registry;
  }

  // An upload's committed bytes and their metadata.
  std::pair<v1::ModelMetadata, BlobInfo> Upload(const std::string& bytes) {
    auto writer = blobs_->NewWriter();
    EXPECT_TRUE(writer.ok()) << writer.status();
    EXPECT_TRUE((*writer)->Append(bytes).ok());
    absl::StatusOr<BlobInfo> blob = (*writer)->Commit();
    EXPECT_TRUE(blob.ok()) << blob.status();
    v1::ModelMetadata metadata;
    metadata.set_name("resnet");
    metadata.add_input_shape(3);
    metadata.add_input_shape(32);
    metadata.add_input_shape(32);
    metadata.set_size_bytes(blob->size_bytes);
    metadata.set_sha256(blob->sha256);
    return {metadata, *blob};
  }

  v1::Model Register(ModelRegistry& registry, const std::string& tenant,
                     const std::string& bytes) {
    auto [metadata, blob] = Upload(bytes);
    absl::StatusOr<v1::Model> model = registry.Register(tenant, metadata, blob);
    EXPECT_TRUE(model.ok()) << model.status();
    return model.ok() ? *model : v1::Model();
  }

  // The stored model once it has left INSPECTING.
  v1::Model Inspected(const std::string& id) {
    v1::Model model;
    EXPECT_TRUE(Eventually([&] {
      absl::StatusOr<v1::Model> m = store_->GetModel(id);
      if (!m.ok()) return false;
      model = *m;
      return model.state() != v1::MODEL_INSPECTING;
    })) << "model " << id << " is still INSPECTING";
    return model;
  }

  fs::path dir_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<BlobStore> blobs_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Redactor> redactor_;
  std::unique_ptr<TenantQuotas> quotas_;
};

TEST_F(ModelRegistryTest, SuccessfulInspectionMakesTheModelReady) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model model = Register(*registry, "acme", "model bytes");
  EXPECT_EQ(model.state(), v1::MODEL_INSPECTING);
  EXPECT_FALSE(model.deduplicated());
  EXPECT_EQ(model.tenant(), "acme");
  EXPECT_EQ(model.name(), "resnet");
  EXPECT_EQ(model.size_bytes(), 11);
  EXPECT_TRUE(model.has_create_time());

  auto worker = launcher.WaitForLaunch(0);
  ASSERT_NE(worker, nullptr);
  // One CPU-only worker, with the model's bytes and shape, in its folder.
  const WorkerLaunch& launch = worker->launch();
  ASSERT_TRUE(launch.request.has_inspect());
  EXPECT_EQ(launch.request.inspect().model_path(), blobs_->Path(model.sha256()));
  EXPECT_THAT(launch.request.inspect().input_shape(),
              ::testing::ElementsAre(3, 32, 32));
  EXPECT_EQ(launch.work_dir, (dir_ / "jobs" / ("inspect-" + model.id())).string());
  EXPECT_TRUE(fs::is_directory(launch.work_dir));
  EXPECT_EQ(launch.worker_path, absl::StrCat(kWorkerDir, "/zeroq-worker"));
  EXPECT_EQ(launch.time_limit, absl::Minutes(5));
  EXPECT_THAT(launch.env, ::testing::Contains(::testing::Pair(
                              "CUDA_VISIBLE_DEVICES", "")));
  EXPECT_EQ(registry->inspections_in_flight(), 1);

  ASSERT_TRUE(worker->Exit(Succeeded()));
  v1::Model ready = Inspected(model.id());
  EXPECT_EQ(ready.state(), v1::MODEL_READY);
  EXPECT_EQ(ready.summary().total_params(), 1234);
  EXPECT_EQ(ready.summary().bn_layers(0).name(), "bn1");
  EXPECT_TRUE(ready.state_reason().empty());
  EXPECT_TRUE(Eventually([&] { return registry->inspections_in_flight() == 0; }));
  EXPECT_FALSE(fs::exists(launch.work_dir));
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_inspections_total{result=\"ready\"}"),
            1);

  absl::StatusOr<v1::Model> got = registry->Get("acme", model.id());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->state(), v1::MODEL_READY);
}

TEST_F(ModelRegistryTest, CrashMakesTheModelInvalidWithoutServerPaths) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model crashed = Register(*registry, "acme", "crashes");
  v1::Model failed = Register(*registry, "acme", "fails");
  auto w0 = launcher.WaitForLaunch(0);
  auto w1 = launcher.WaitForLaunch(1);
  ASSERT_NE(w0, nullptr);
  ASSERT_NE(w1, nullptr);
  const std::string blob_path = blobs_->Path(crashed.sha256());
  // Launches may come in either order: match them by folder.
  if (w0->launch().work_dir != (dir_ / "jobs" / ("inspect-" + crashed.id())).string())
    std::swap(w0, w1);
  ASSERT_TRUE(w0->Exit(Ended(WorkerOutcome::Kind::kCrashed,
                             absl::StrCat("killed by signal 11 loading ",
                                          blob_path, "; see ", kWorkerDir,
                                          "/zeroq-worker.log"))));
  ASSERT_TRUE(w1->Exit(Ended(
      WorkerOutcome::Kind::kFailed,
      absl::StrCat("torch.jit.load: cannot read ", blob_path,
                   ": not a TorchScript archive"))));

  v1::Model invalid = Inspected(crashed.id());
  EXPECT_EQ(invalid.state(), v1::MODEL_INVALID);
  EXPECT_THAT(invalid.state_reason(),
              HasSubstr("the model crashed the worker: killed by signal 11"));
  EXPECT_THAT(invalid.state_reason(), HasSubstr("<server file>"));
  EXPECT_THAT(invalid.state_reason(), Not(HasSubstr(dir_.string())));
  EXPECT_THAT(invalid.state_reason(), Not(HasSubstr(kWorkerDir)));

  v1::Model bad = Inspected(failed.id());
  EXPECT_EQ(bad.state(), v1::MODEL_INVALID);
  EXPECT_THAT(bad.state_reason(), HasSubstr("not a TorchScript archive"));
  EXPECT_THAT(bad.state_reason(), Not(HasSubstr(dir_.string())));
  EXPECT_TRUE(Eventually([&] {
    return Value(metrics_->Scrape(),
                 "zeroq_inspections_total{result=\"invalid\"}") == 2;
  }));
}

TEST_F(ModelRegistryTest, TimeOutMakesTheModelInvalid) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model model = Register(*registry, "acme", "slow");
  auto worker = launcher.WaitForLaunch(0);
  ASSERT_NE(worker, nullptr);
  ASSERT_TRUE(worker->Exit(Ended(WorkerOutcome::Kind::kTimedOut, "")));
  v1::Model invalid = Inspected(model.id());
  EXPECT_EQ(invalid.state(), v1::MODEL_INVALID);
  EXPECT_EQ(invalid.state_reason(),
            "inspecting the model took longer than 5m");
}

TEST_F(ModelRegistryTest, WorkerThatCannotStartMakesTheModelInvalid) {
  FakeLauncher launcher;
  launcher.FailStarts();
  auto registry = Started(&launcher);
  v1::Model model = Register(*registry, "acme", "never inspected");
  v1::Model invalid = Inspected(model.id());
  EXPECT_EQ(invalid.state(), v1::MODEL_INVALID);
  EXPECT_EQ(invalid.state_reason(),
            "could not start the worker: fork: out of memory");
  EXPECT_TRUE(Eventually([&] { return registry->inspections_in_flight() == 0; }));
}

TEST_F(ModelRegistryTest, IdenticalUploadIsDeduplicated) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model first = Register(*registry, "acme", "same bytes");
  v1::Model again = Register(*registry, "acme", "same bytes");
  EXPECT_EQ(again.id(), first.id());
  EXPECT_TRUE(again.deduplicated());
  // Another shape of the same bytes is another model; so is another
  // tenant's upload.
  auto [metadata, blob] = Upload("same bytes");
  metadata.set_input_shape(0, 1);
  absl::StatusOr<v1::Model> reshaped = registry->Register("acme", metadata, blob);
  ASSERT_TRUE(reshaped.ok()) << reshaped.status();
  EXPECT_NE(reshaped->id(), first.id());
  EXPECT_FALSE(reshaped->deduplicated());
  v1::Model zeta = Register(*registry, "zeta", "same bytes");
  EXPECT_NE(zeta.id(), first.id());
  EXPECT_FALSE(zeta.deduplicated());

  ASSERT_NE(launcher.WaitForLaunch(1), nullptr);
  // 3 models, one inspection each.
  absl::SleepFor(absl::Milliseconds(100));
  auto worker = launcher.WaitForLaunch(0);
  ASSERT_TRUE(worker->Exit(Succeeded()));
  ASSERT_NE(launcher.WaitForLaunch(2), nullptr);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(launcher.launches(), 3);

  // Once READY, a re-upload returns it READY.
  for (int i = 1; i < 3; ++i) launcher.WaitForLaunch(i)->Exit(Succeeded());
  Inspected(first.id());
  auto [same, same_blob] = Upload("same bytes");
  absl::StatusOr<v1::Model> ready = registry->Register("acme", same, same_blob);
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_EQ(ready->id(), first.id());
  EXPECT_EQ(ready->state(), v1::MODEL_READY);
  EXPECT_TRUE(ready->deduplicated());
}

TEST_F(ModelRegistryTest, AnotherTenantsModelIsNotFound) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model model = Register(*registry, "acme", "private");
  ASSERT_NE(launcher.WaitForLaunch(0), nullptr);
  launcher.WaitForLaunch(0)->Exit(Succeeded());
  Inspected(model.id());

  absl::StatusOr<v1::Model> got = registry->Get("zeta", model.id());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(got.status().message(),
            absl::StrCat("model \"", model.id(), "\" not found"));
  // Exactly as for an id nobody has.
  EXPECT_EQ(registry->Get("zeta", "m-nope").status().message(),
            "model \"m-nope\" not found");
  absl::Status deleted = registry->Delete("zeta", model.id());
  EXPECT_EQ(deleted.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(blobs_->Exists(model.sha256()));

  absl::StatusOr<Page<v1::Model>> theirs = registry->List("zeta", 0, "");
  ASSERT_TRUE(theirs.ok()) << theirs.status();
  EXPECT_TRUE(theirs->items.empty());
  absl::StatusOr<Page<v1::Model>> mine = registry->List("acme", 0, "");
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_EQ(mine->items.size(), 1u);
  EXPECT_EQ(mine->items[0].id(), model.id());
  EXPECT_EQ(registry->List("acme", -1, "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelRegistryTest, DeleteWaitsForInspectionAndJobs) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model model = Register(*registry, "acme", "to delete");
  absl::Status s = registry->Delete("acme", model.id());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            absl::StrCat("model ", model.id(),
                         " is being inspected; delete it once it is READY or "
                         "INVALID"));

  ASSERT_NE(launcher.WaitForLaunch(0), nullptr);
  launcher.WaitForLaunch(0)->Exit(Succeeded());
  Inspected(model.id());

  v1::Job job;
  job.set_id("j-1");
  job.set_tenant("acme");
  job.set_model_id(model.id());
  job.set_state(v1::JOB_QUEUED);
  ASSERT_TRUE(store_->CreateJob(job).ok());
  s = registry->Delete("acme", model.id());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            absl::StrCat("1 queued or running job(s) use model ", model.id(),
                         "; cancel them or wait for them to finish"));
  EXPECT_TRUE(blobs_->Exists(model.sha256()));

  job.set_state(v1::JOB_CANCELLED);
  ASSERT_TRUE(store_->UpdateJob(job, {}).ok());
  s = registry->Delete("acme", model.id());
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(registry->Get("acme", model.id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(blobs_->Exists(model.sha256()));
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_blobs_removed_total"), 1);
  EXPECT_EQ(Value(metrics_->Scrape(), "zeroq_stored_bytes{tenant=\"acme\"}"),
            0);
  // A second delete finds nothing.
  EXPECT_EQ(registry->Delete("acme", model.id()).code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ModelRegistryTest, DeleteKeepsBytesAnotherTenantUses) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  v1::Model mine = Register(*registry, "acme", "shared bytes");
  v1::Model theirs = Register(*registry, "zeta", "shared bytes");
  ASSERT_NE(launcher.WaitForLaunch(1), nullptr);
  launcher.WaitForLaunch(0)->Exit(Succeeded());
  launcher.WaitForLaunch(1)->Exit(Succeeded());
  Inspected(mine.id());
  Inspected(theirs.id());
  ASSERT_TRUE(registry->Delete("acme", mine.id()).ok());
  EXPECT_TRUE(blobs_->Exists(mine.sha256()));
  ASSERT_TRUE(registry->Delete("zeta", theirs.id()).ok());
  EXPECT_FALSE(blobs_->Exists(mine.sha256()));
}

TEST_F(ModelRegistryTest, RegisterRefusesBytesThatAreGone) {
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  auto [metadata, blob] = Upload("removed meanwhile");
  ASSERT_TRUE(blobs_->Delete(blob.sha256).ok());
  absl::StatusOr<v1::Model> model = registry->Register("acme", metadata, blob);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(model.status().message(), HasSubstr("upload again"));
}

TEST_F(ModelRegistryTest, AtMostMaxConcurrentInspectionsRun) {
  FakeLauncher launcher;
  auto registry = Started(&launcher, /*max_concurrent=*/2);
  v1::Model a = Register(*registry, "acme", "model a");
  v1::Model b = Register(*registry, "acme", "model b");
  v1::Model c = Register(*registry, "acme", "model c");
  ASSERT_NE(launcher.WaitForLaunch(1), nullptr);
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(launcher.launches(), 2);
  EXPECT_EQ(registry->inspections_in_flight(), 3);

  ASSERT_TRUE(launcher.WaitForLaunch(0)->Exit(Succeeded()));
  auto third = launcher.WaitForLaunch(2);
  ASSERT_NE(third, nullptr);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(launcher.launches(), 3);
  // In registration order.
  EXPECT_EQ(third->launch().work_dir,
            (dir_ / "jobs" / ("inspect-" + c.id())).string());
  launcher.WaitForLaunch(1)->Exit(Succeeded());
  third->Exit(Succeeded());
  for (const v1::Model& m : {a, b, c})
    EXPECT_EQ(Inspected(m.id()).state(), v1::MODEL_READY);
  EXPECT_TRUE(Eventually([&] { return registry->inspections_in_flight() == 0; }));
}

TEST_F(ModelRegistryTest, StopLeavesModelsInspectingForTheNextStart) {
  v1::Model running, waiting;
  {
    FakeLauncher launcher;
    auto registry = Started(&launcher, /*max_concurrent=*/1);
    running = Register(*registry, "acme", "interrupted");
    waiting = Register(*registry, "acme", "never started");
    auto worker = launcher.WaitForLaunch(0);
    ASSERT_NE(worker, nullptr);
    EXPECT_EQ(registry->inspections_in_flight(), 2);
    registry->Stop();
    EXPECT_TRUE(worker->cancelled());
    EXPECT_EQ(launcher.launches(), 1);
    EXPECT_EQ(registry->inspections_in_flight(), 0);
    for (const v1::Model& m : {running, waiting}) {
      absl::StatusOr<v1::Model> stored = store_->GetModel(m.id());
      ASSERT_TRUE(stored.ok()) << stored.status();
      EXPECT_EQ(stored->state(), v1::MODEL_INSPECTING);
      EXPECT_TRUE(stored->state_reason().empty());
    }

    auto [metadata, blob] = Upload("after stop");
    absl::StatusOr<v1::Model> refused = registry->Register("acme", metadata, blob);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(registry->Start().code(), absl::StatusCode::kFailedPrecondition);
    registry->Stop();  // again: nothing to do
  }
  // The next run inspects both again.
  FakeLauncher launcher;
  auto registry = Started(&launcher);
  auto w0 = launcher.WaitForLaunch(0);
  auto w1 = launcher.WaitForLaunch(1);
  ASSERT_NE(w0, nullptr);
  ASSERT_NE(w1, nullptr);
  EXPECT_THAT((std::vector<std::string>{w0->launch().request.inspect().model_path(),
                                        w1->launch().request.inspect().model_path()}),
              ::testing::UnorderedElementsAre(blobs_->Path(running.sha256()),
                                              blobs_->Path(waiting.sha256())));
  ASSERT_TRUE(w0->Exit(Succeeded()));
  ASSERT_TRUE(w1->Exit(Succeeded()));
  EXPECT_EQ(Inspected(running.id()).state(), v1::MODEL_READY);
  EXPECT_EQ(Inspected(waiting.id()).state(), v1::MODEL_READY);
}

TEST_F(ModelRegistryTest, ModelRegisteredBeforeStartIsInspectedOnce) {
  FakeLauncher launcher;
  ModelRegistry registry(Options(), store_.get(), blobs_.get(), quotas_.get(),
                         &launcher);
  v1::Model model = Register(registry, "acme", "early");
  EXPECT_EQ(registry.inspections_in_flight(), 1);
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(launcher.launches(), 0);
  ASSERT_TRUE(registry.Start().ok());
  ASSERT_NE(launcher.WaitForLaunch(0), nullptr);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(launcher.launches(), 1);
  launcher.WaitForLaunch(0)->Exit(Succeeded());
  EXPECT_EQ(Inspected(model.id()).state(), v1::MODEL_READY);
}

TEST_F(ModelRegistryTest, StartRefusesIncompleteOptions) {
  FakeLauncher launcher;
  RegistryOptions no_dir = Options();
  no_dir.work_dir.clear();
  EXPECT_EQ(ModelRegistry(no_dir, store_.get(), blobs_.get(), quotas_.get(),
                          &launcher)
                .Start()
                .code(),
            absl::StatusCode::kInvalidArgument);
  RegistryOptions no_redactor = Options();
  no_redactor.redactor = nullptr;
  EXPECT_EQ(ModelRegistry(no_redactor, store_.get(), blobs_.get(),
                          quotas_.get(), &launcher)
                .Start()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace zeroq::server
