// The dispatcher with a fake launcher and real SQLite stores: claims,
// progress, crashes and retries, time limits, cancel races, lost leases, a
// store that goes away, shutdown. No worker processes.
#include "server/dispatcher.h"

#include <stdlib.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/job_events.h"
#include "server/job_store.h"
#include "server/records.h"

namespace zeroq::server {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

#define ZQ_EXPECT_OK(expr) EXPECT_TRUE((expr).ok()) << (expr)

// Workers the test drives by hand: it sends their events and ends them.
// Cancel is recorded and ends the worker with kCancelled (on a thread of its
// own, as a real worker's exit comes from its reader thread).
class FakeLauncher : public Launcher {
 public:
  struct Worker {
    std::string job_id;
    WorkerLaunch launch;
    EventFn on_event;
    ExitFn on_exit;
    bool cancelled = false;
    bool exited = false;
  };

  class Handle : public WorkerHandle {
   public:
    Handle(FakeLauncher* launcher, std::shared_ptr<Worker> worker)
        : launcher_(launcher), worker_(std::move(worker)) {}
    ~Handle() override {
      if (thread_.joinable()) thread_.join();
    }
    void Cancel() override {
      {
        absl::MutexLock lock(&launcher_->mu_);
        worker_->cancelled = true;
        if (!launcher_->cancel_exits_) return;
      }
      if (thread_.joinable()) return;
      thread_ = std::thread([this] {
        WorkerOutcome o;
        o.kind = WorkerOutcome::Kind::kCancelled;
        launcher_->Exit(worker_, std::move(o));
      });
    }

   private:
    FakeLauncher* const launcher_;
    std::shared_ptr<Worker> worker_;
    std::thread thread_;
  };

  absl::StatusOr<std::unique_ptr<WorkerHandle>> Start(
      WorkerLaunch launch, EventFn on_event, ExitFn on_exit) override {
    auto w = std::make_shared<Worker>();
    w->job_id = fs::path(launch.work_dir).filename().string();
    w->launch = std::move(launch);
    w->on_event = std::move(on_event);
    w->on_exit = std::move(on_exit);
    absl::MutexLock lock(&mu_);
    workers_.push_back(w);
    return std::unique_ptr<WorkerHandle>(new Handle(this, w));
  }

  // The newest worker of the job, once started (waits up to 10 s).
  std::shared_ptr<Worker> WaitFor(const std::string& job_id, int nth = 1) {
    absl::MutexLock lock(&mu_);
    std::shared_ptr<Worker> found;
    auto started = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      int n = 0;
      for (const auto& w : workers_) {
        if (w->job_id == job_id && ++n == nth) {
          found = w;
          return true;
        }
      }
      return false;
    };
    mu_.AwaitWithTimeout(absl::Condition(&started), absl::Seconds(10));
    return found;
  }
  int started() {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(workers_.size());
  }
  bool cancelled(const std::shared_ptr<Worker>& w) {
    absl::MutexLock lock(&mu_);
    return w->cancelled;
  }
  bool WaitCancelled(const std::shared_ptr<Worker>& w, absl::Duration limit) {
    absl::MutexLock lock(&mu_);
    auto c = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return w->cancelled; };
    return mu_.AwaitWithTimeout(absl::Condition(&c), limit);
  }
  // Whether Cancel ends workers at once (the default) or leaves them running.
  void set_cancel_exits(bool v) {
    absl::MutexLock lock(&mu_);
    cancel_exits_ = v;
  }
  static void Event(const std::shared_ptr<Worker>& w, v1::Stage stage,
                    int64_t step, int64_t total) {
    v1::JobEvent e;
    e.set_type(v1::EVENT_PROGRESS);
    e.set_stage(stage);
    e.set_step(step);
    e.set_total(total);
    w->on_event(e);
  }
  void Exit(const std::shared_ptr<Worker>& w, WorkerOutcome o) {
    {
      absl::MutexLock lock(&mu_);
      if (w->exited) return;
      w->exited = true;
    }
    w->on_exit(std::move(o));
  }
  void Succeed(const std::shared_ptr<Worker>& w) {
    WorkerOutcome o;
    o.kind = WorkerOutcome::Kind::kSucceeded;
    o.result = v1::JobResult();
    Exit(w, std::move(o));
  }
  void Crash(const std::shared_ptr<Worker>& w) {
    WorkerOutcome o;
    o.kind = WorkerOutcome::Kind::kCrashed;
    o.error.set_message("the worker died of signal 9");
    Exit(w, std::move(o));
  }

 private:
  absl::Mutex mu_;
  std::vector<std::shared_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
  bool cancel_exits_ ABSL_GUARDED_BY(mu_) = true;
};

// A store that can be made to answer UNAVAILABLE, as a lost database does.
class FlakyStore : public JobStore {
 public:
  explicit FlakyStore(JobStore* real) : real_(real) {}
  void set_down(bool down) {
    absl::MutexLock lock(&mu_);
    down_ = down;
  }

#define ZQ_FLAKY(call)                                              \
  {                                                                 \
    absl::MutexLock lock(&mu_);                                     \
    if (down_) return absl::UnavailableError("the database is gone"); \
  }                                                                 \
  return real_->call
  absl::Status PutModel(const v1::Model& m) override { ZQ_FLAKY(PutModel(m)); }
  absl::StatusOr<v1::Model> GetModel(const std::string& id) override {
    ZQ_FLAKY(GetModel(id));
  }
  absl::StatusOr<Page<v1::Model>> ListModels(const std::string& t, int n,
                                             const std::string& p) override {
    ZQ_FLAKY(ListModels(t, n, p));
  }
  absl::StatusOr<std::vector<v1::Model>> ModelsInState(
      v1::ModelState s) override {
    ZQ_FLAKY(ModelsInState(s));
  }
  absl::Status DeleteModel(const std::string& id) override {
    ZQ_FLAKY(DeleteModel(id));
  }
  absl::StatusOr<int64_t> CountBlobRefs(const std::string& s) override {
    ZQ_FLAKY(CountBlobRefs(s));
  }
  absl::StatusOr<int64_t> StoredBytes(const std::string& t) override {
    ZQ_FLAKY(StoredBytes(t));
  }
  absl::StatusOr<std::vector<std::pair<std::string, int64_t>>>
  StoredBytesByTenant() override {
    ZQ_FLAKY(StoredBytesByTenant());
  }
  absl::StatusOr<bool> TenantHoldsBlob(const std::string& t,
                                       const std::string& s) override {
    ZQ_FLAKY(TenantHoldsBlob(t, s));
  }
  absl::StatusOr<std::vector<Holding>> LargestHoldings(const std::string& t,
                                                       int n) override {
    ZQ_FLAKY(LargestHoldings(t, n));
  }
  absl::StatusOr<CreateJobResult> CreateJob(
      const v1::Job& j, const std::vector<v1::JobEvent>& e,
      int max_queued) override {
    ZQ_FLAKY(CreateJob(j, e, max_queued));
  }
  absl::Status UpdateJob(const v1::Job& j,
                         const std::vector<v1::JobEvent>& e) override {
    ZQ_FLAKY(UpdateJob(j, e));
  }
  absl::StatusOr<v1::Job> GetJob(const std::string& id) override {
    ZQ_FLAKY(GetJob(id));
  }
  absl::StatusOr<Page<v1::Job>> ListJobs(const JobFilter& f, int n,
                                         const std::string& p) override {
    ZQ_FLAKY(ListJobs(f, n, p));
  }
  absl::StatusOr<std::vector<v1::Job>> JobsInStates(
      const std::vector<v1::JobState>& s) override {
    ZQ_FLAKY(JobsInStates(s));
  }
  absl::Status DeleteJob(const std::string& id) override {
    ZQ_FLAKY(DeleteJob(id));
  }
  absl::StatusOr<std::vector<v1::Job>> JobsEndedBefore(int64_t t,
                                                       int n) override {
    ZQ_FLAKY(JobsEndedBefore(t, n));
  }
  absl::StatusOr<int64_t> CountActiveJobsForModel(
      const std::string& id) override {
    ZQ_FLAKY(CountActiveJobsForModel(id));
  }
  absl::StatusOr<int64_t> CountJobs(v1::JobState s) override {
    ZQ_FLAKY(CountJobs(s));
  }
  absl::StatusOr<std::optional<JobWrite>> ClaimJob(
      const ClaimOptions& o, const JobEdit& e) override {
    ZQ_FLAKY(ClaimJob(o, e));
  }
  absl::StatusOr<JobWrite> EditJob(const std::string& id, const Fence* f,
                                   const JobEdit& e) override {
    ZQ_FLAKY(EditJob(id, f, e));
  }
  absl::StatusOr<std::vector<LeaseInfo>> RenewLeases(
      const std::string& o, absl::Duration l) override {
    ZQ_FLAKY(RenewLeases(o, l));
  }
  absl::StatusOr<std::vector<JobWrite>> ReclaimExpired(
      int n, const JobEdit& e) override {
    ZQ_FLAKY(ReclaimExpired(n, e));
  }
  absl::StatusOr<std::vector<JobWrite>> ReclaimOwned(
      const std::string& o, const JobEdit& e) override {
    ZQ_FLAKY(ReclaimOwned(o, e));
  }
  absl::Status Listen(StoreListener* l) override { return real_->Listen(l); }
  absl::StatusOr<std::vector<v1::JobEvent>> ListEvents(const std::string& id,
                                                       int64_t after,
                                                       int limit) override {
    ZQ_FLAKY(ListEvents(id, after, limit));
  }
#undef ZQ_FLAKY

 private:
  JobStore* const real_;
  absl::Mutex mu_;
  bool down_ ABSL_GUARDED_BY(mu_) = false;
};

class DispatcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "/dispatcher_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    absl::StatusOr<std::unique_ptr<SqliteJobStore>> store =
        SqliteJobStore::Open(dir_ + "/zeroq.db");
    ASSERT_TRUE(store.ok()) << store.status();
    sqlite_ = *std::move(store);
    flaky_ = std::make_unique<FlakyStore>(sqlite_.get());
    absl::StatusOr<std::unique_ptr<FileBlobStore>> blobs =
        FileBlobStore::Create(dir_ + "/blobs");
    ASSERT_TRUE(blobs.ok()) << blobs.status();
    blobs_ = *std::move(blobs);
    v1::Model model;
    model.set_id("m1");
    model.set_tenant("acme");
    model.set_sha256(std::string(64, 'a'));
    model.set_state(v1::MODEL_READY);
    ASSERT_TRUE(sqlite_->PutModel(model).ok());
  }
  void TearDown() override {
    dispatchers_.clear();
    events_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  DispatcherOptions Options(const std::string& replica) {
    DispatcherOptions o;
    o.replica_id = replica;
    o.work_dir = dir_ + "/replicas/" + replica + "/jobs";
    o.worker_path = "/bin/true";
    o.kill_grace = absl::Milliseconds(100);
    o.max_attempts = 2;
    o.lease = absl::Seconds(2);
    o.claim_poll = absl::Milliseconds(50);
    o.on_store_reachable = [this](bool reachable) {
      absl::MutexLock lock(&mu_);
      reachability_.push_back(reachable);
    };
    o.redactor = &redactor_;
    return o;
  }

  Dispatcher* NewDispatcher(DispatcherOptions o, JobStore* store = nullptr,
                            const std::string& devices = "cpu:1") {
    if (events_ == nullptr)
      events_ = std::make_unique<JobEvents>(sqlite_.get());
    absl::StatusOr<DevicePool> pool = DevicePool::Parse(devices, 1, 1, std::vector<int>{});
    EXPECT_TRUE(pool.ok()) << pool.status();
    dispatchers_.push_back(std::make_unique<Dispatcher>(
        std::move(o), store != nullptr ? store : sqlite_.get(), blobs_.get(),
        *std::move(pool), &launcher_, events_.get(), nullptr));
    return dispatchers_.back().get();
  }

  std::string Submit(int priority = 0, const std::string& tenant = "acme") {
    v1::Job job;
    job.set_id("j-" + RandomHex(12));
    job.set_tenant(tenant);
    job.set_model_id("m1");
    job.set_priority(priority);
    job.set_state(v1::JOB_QUEUED);
    SetNow(job.mutable_create_time());
    absl::StatusOr<CreateJobResult> r =
        sqlite_->CreateJob(job, {StateEvent(job, "queued")}, 0);
    EXPECT_TRUE(r.ok()) << r.status();
    return job.id();
  }

  v1::Job Get(const std::string& id) {
    absl::StatusOr<v1::Job> job = sqlite_->GetJob(id);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : v1::Job();
  }

  // Waits (up to 10 s) until the stored job satisfies `done`.
  v1::Job WaitJob(const std::string& id,
                  const std::function<bool(const v1::Job&)>& done) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    v1::Job job = Get(id);
    while (!done(job) && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
      job = Get(id);
    }
    return job;
  }
  static bool Ended(const v1::Job& j) { return IsTerminal(j.state()); }

  std::vector<v1::JobEvent> Events(const std::string& id) {
    absl::StatusOr<std::vector<v1::JobEvent>> e = sqlite_->ListEvents(id, 0, 0);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *e : std::vector<v1::JobEvent>();
  }
  static void ExpectDense(const std::vector<v1::JobEvent>& events) {
    for (size_t i = 0; i < events.size(); ++i)
      EXPECT_EQ(events[i].seq(), static_cast<int64_t>(i + 1));
  }

  std::string dir_;
  Redactor redactor_{std::vector<std::string>{"/srv/secret"}};
  std::unique_ptr<SqliteJobStore> sqlite_;
  std::unique_ptr<FlakyStore> flaky_;
  std::unique_ptr<FileBlobStore> blobs_;
  FakeLauncher launcher_;
  std::unique_ptr<JobEvents> events_;
  std::vector<std::unique_ptr<Dispatcher>> dispatchers_;
  absl::Mutex mu_;
  std::vector<bool> reachability_ ABSL_GUARDED_BY(mu_);
};

TEST_F(DispatcherTest, ClaimsRunsAndStoresProgressInOrder) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->launch.work_dir, dir_ + "/replicas/a/jobs/" + id);
  EXPECT_EQ(w->launch.request.run().model_path(),
            blobs_->Path(std::string(64, 'a')));
  v1::Job running = Get(id);
  EXPECT_EQ(running.state(), v1::JOB_RUNNING);
  EXPECT_EQ(running.attempts(), 1);
  EXPECT_EQ(running.device(), "cpu/0");
  for (int i = 1; i <= 5; ++i)
    FakeLauncher::Event(w, v1::STAGE_DISTILL, i, 5);
  v1::Job progressed = Get(id);
  EXPECT_EQ(progressed.stage(), v1::STAGE_DISTILL);
  EXPECT_EQ(progressed.step(), 5);
  launcher_.Succeed(w);
  v1::Job done = WaitJob(id, Ended);
  EXPECT_EQ(done.state(), v1::JOB_SUCCEEDED);
  EXPECT_EQ(done.attempt_history(0).outcome(), "succeeded");
  std::vector<v1::JobEvent> events = Events(id);
  ExpectDense(events);
  // queued, running, 5 progress, succeeded.
  ASSERT_EQ(events.size(), 8u);
  EXPECT_TRUE(IsTerminalEvent(events.back()));
  EXPECT_EQ(d->running(), 0);
  EXPECT_FALSE(fs::exists(w->launch.work_dir));
}

TEST_F(DispatcherTest, OneSlotRunsOneJobAtATimeByPriority) {
  Dispatcher* d = NewDispatcher(Options("a"));
  const std::string low = Submit(0);
  const std::string high = Submit(5);
  ASSERT_TRUE(d->Start().ok());
  auto w = launcher_.WaitFor(high);
  ASSERT_NE(w, nullptr);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(launcher_.started(), 1);  // one slot
  EXPECT_EQ(Get(low).state(), v1::JOB_QUEUED);
  launcher_.Succeed(w);
  auto w2 = launcher_.WaitFor(low);
  ASSERT_NE(w2, nullptr);
  launcher_.Succeed(w2);
  EXPECT_EQ(WaitJob(low, Ended).state(), v1::JOB_SUCCEEDED);
}

TEST_F(DispatcherTest, CrashIsRetriedWithBackoffThenFails) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  auto first = launcher_.WaitFor(id, 1);
  ASSERT_NE(first, nullptr);
  const absl::Time crashed = absl::Now();
  launcher_.Crash(first);
  v1::Job queued = Get(id);
  EXPECT_EQ(queued.state(), v1::JOB_QUEUED);
  EXPECT_EQ(queued.worker_crashes(), 1);
  auto second = launcher_.WaitFor(id, 2);
  ASSERT_NE(second, nullptr);
  EXPECT_GE(absl::Now() - crashed, absl::Milliseconds(900));  // 1 s backoff
  launcher_.Crash(second);
  v1::Job failed = WaitJob(id, Ended);
  EXPECT_EQ(failed.state(), v1::JOB_FAILED);
  EXPECT_EQ(failed.error().code(), static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_THAT(failed.error().message(), HasSubstr("crashed 2 times"));
  EXPECT_EQ(failed.attempts(), 2);
  ExpectDense(Events(id));
}

TEST_F(DispatcherTest, TimeLimitFailsWithDeadlineExceeded) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  WorkerOutcome o;
  o.kind = WorkerOutcome::Kind::kTimedOut;
  launcher_.Exit(w, std::move(o));
  v1::Job failed = WaitJob(id, Ended);
  EXPECT_EQ(failed.error().code(),
            static_cast<int>(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(failed.attempt_history(0).outcome(), "timed out");
}

TEST_F(DispatcherTest, CancelMarkedInTheStoreStopsTheWorkerAtTheNextRound) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  // Marked by another replica: nobody calls Cancel here; the lease round
  // (every lease/10 = 200 ms) reads the mark.
  const absl::Time marked = absl::Now();
  ASSERT_TRUE(sqlite_
                  ->EditJob(id, nullptr,
                            [](JobChange& c) {
                              c.job.set_cancel_requested(true);
                              return absl::OkStatus();
                            })
                  .ok());
  ASSERT_TRUE(launcher_.WaitCancelled(w, absl::Seconds(2)));
  EXPECT_LT(absl::Now() - marked, absl::Seconds(1));
  v1::Job done = WaitJob(id, Ended);
  EXPECT_EQ(done.state(), v1::JOB_CANCELLED);
}

TEST_F(DispatcherTest, CancelBeforeTheWorkerHandleArrivesIsNotLost) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  // Cancel as soon as the job is RUNNING in the store, racing the launch.
  WaitJob(id, [](const v1::Job& j) { return j.state() == v1::JOB_RUNNING; });
  d->Cancel(id);
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(launcher_.WaitCancelled(w, absl::Seconds(2)));
  EXPECT_EQ(WaitJob(id, Ended).state(), v1::JOB_CANCELLED);
}

TEST_F(DispatcherTest, LostLeaseStopsTheWorkerAndItWritesNothingMore) {
  // Two replicas on one database (two connections to one SQLite file).
  absl::StatusOr<std::unique_ptr<SqliteJobStore>> other =
      SqliteJobStore::Open(dir_ + "/zeroq.db");
  ASSERT_TRUE(other.ok());
  Dispatcher* a = NewDispatcher(Options("a"));
  ASSERT_TRUE(a->Start().ok());
  const std::string id = Submit();
  a->Wake();
  auto wa = launcher_.WaitFor(id, 1);
  ASSERT_NE(wa, nullptr);
  launcher_.set_cancel_exits(false);  // a's worker lingers after Cancel
  // b takes the job over, as when a's lease ran out unseen.
  ASSERT_TRUE((*other)
                  ->ReclaimOwned("a",
                                 [](JobChange& c) {
                                   EndAttempt(c.job, "taken over");
                                   c.job.set_state(v1::JOB_QUEUED);
                                   return absl::OkStatus();
                                 })
                  .ok());
  Dispatcher* b = NewDispatcher(Options("b"), other->get());
  ASSERT_TRUE(b->Start().ok());
  auto wb = launcher_.WaitFor(id, 2);
  ASSERT_NE(wb, nullptr);
  EXPECT_EQ(Get(id).attempts(), 2);
  // a's worker reports progress: refused by the fence, and a stops it.
  FakeLauncher::Event(wa, v1::STAGE_SENSITIVITY, 3, 10);
  EXPECT_TRUE(launcher_.cancelled(wa));
  EXPECT_EQ(Get(id).stage(), v1::STAGE_INSPECT);
  // a's worker then "succeeds": nothing of it is stored.
  launcher_.Succeed(wa);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(Get(id).state(), v1::JOB_RUNNING);
  EXPECT_EQ(a->running(), 0);
  FakeLauncher::Event(wb, v1::STAGE_DISTILL, 1, 2);
  launcher_.Succeed(wb);
  v1::Job done = WaitJob(id, Ended);
  EXPECT_EQ(done.state(), v1::JOB_SUCCEEDED);
  EXPECT_EQ(done.attempt_history_size(), 2);
  EXPECT_EQ(done.attempt_history(1).device(), "cpu/0");
  ExpectDense(Events(id));
}

TEST_F(DispatcherTest, ExpiredLeasesAreReclaimedByAnotherReplica) {
  absl::StatusOr<std::unique_ptr<SqliteJobStore>> other =
      SqliteJobStore::Open(dir_ + "/zeroq.db");
  ASSERT_TRUE(other.ok());
  // Replica "gone" claimed the job and died: nobody renews its lease.
  const std::string id = Submit();
  ClaimOptions claim;
  claim.owner = "gone";
  claim.lease = absl::Milliseconds(300);
  claim.devices = {v1::DEVICE_ANY, v1::DEVICE_CPU};
  absl::StatusOr<std::optional<JobWrite>> claimed =
      sqlite_->ClaimJob(claim, [](JobChange& c) {
        c.job.set_state(v1::JOB_RUNNING);
        c.job.set_attempts(c.job.attempts() + 1);
        v1::JobAttempt* a = c.job.add_attempt_history();
        a->set_number(c.job.attempts());
        a->set_outcome("running");
        return absl::OkStatus();
      });
  ASSERT_TRUE(claimed.ok() && claimed->has_value()) << claimed.status();
  Dispatcher* b = NewDispatcher(Options("b"), other->get());
  ASSERT_TRUE(b->Start().ok());
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  v1::Job running = Get(id);
  EXPECT_EQ(running.attempts(), 2);
  EXPECT_EQ(running.server_restarts(), 1);
  EXPECT_EQ(running.attempt_history(0).outcome(),
            "its server stopped renewing its lease");
  launcher_.Succeed(w);
  EXPECT_EQ(WaitJob(id, Ended).state(), v1::JOB_SUCCEEDED);
}

TEST_F(DispatcherTest, ProgressIsKeptWhileTheStoreIsAwayAndStoredAfter) {
  Dispatcher* d = NewDispatcher(Options("a"), flaky_.get());
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  flaky_->set_down(true);
  for (int i = 1; i <= 3; ++i) FakeLauncher::Event(w, v1::STAGE_DISTILL, i, 3);
  absl::SleepFor(absl::Milliseconds(500));  // two failed renewals
  EXPECT_FALSE(d->store_reachable());
  EXPECT_FALSE(launcher_.cancelled(w));  // well within the lease
  flaky_->set_down(false);
  v1::Job progressed =
      WaitJob(id, [](const v1::Job& j) { return j.step() == 3; });
  EXPECT_EQ(progressed.step(), 3);
  EXPECT_TRUE(d->store_reachable());
  launcher_.Succeed(w);
  EXPECT_EQ(WaitJob(id, Ended).state(), v1::JOB_SUCCEEDED);
  std::vector<v1::JobEvent> events = Events(id);
  ExpectDense(events);
  EXPECT_EQ(events.size(), 6u);  // queued, running, 3 progress, succeeded
  absl::MutexLock lock(&mu_);
  EXPECT_THAT(reachability_, ::testing::ElementsAre(false, true));
}

TEST_F(DispatcherTest, WorkerIsStoppedBeforeALeaseItCannotRenewRunsOut) {
  Dispatcher* d = NewDispatcher(Options("a"), flaky_.get());
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  auto w = launcher_.WaitFor(id);
  ASSERT_NE(w, nullptr);
  const absl::Time down = absl::Now();
  flaky_->set_down(true);
  // Lease 2 s: stopped after 7/10 of it without a renewal, before it ends.
  ASSERT_TRUE(launcher_.WaitCancelled(w, absl::Seconds(3)));
  const absl::Duration after = absl::Now() - down;
  EXPECT_GE(after, absl::Milliseconds(1200));
  EXPECT_LT(after, absl::Seconds(2));
  flaky_->set_down(false);
  // Nothing of the stopped attempt is written: the job is still RUNNING
  // under a's old claim until its lease runs out and a reclaims it.
  v1::Job requeued = WaitJob(id, [](const v1::Job& j) {
    return j.attempts() == 2 || Ended(j);
  });
  EXPECT_EQ(requeued.attempts(), 2);
  EXPECT_EQ(requeued.server_restarts(), 1);
}

TEST_F(DispatcherTest, StopReQueuesRunningJobsWithoutCountingTheAttempt) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  ASSERT_NE(launcher_.WaitFor(id), nullptr);
  d->Stop(absl::ZeroDuration());
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_QUEUED);
  EXPECT_EQ(job.attempts(), 0);
  EXPECT_EQ(job.attempt_history(0).outcome(), "stopped by server shutdown");
}

TEST_F(DispatcherTest, AReplicasRestartReQueuesWhatItLeftRunning) {
  Dispatcher* d = NewDispatcher(Options("a"));
  ASSERT_TRUE(d->Start().ok());
  const std::string id = Submit();
  d->Wake();
  ASSERT_NE(launcher_.WaitFor(id), nullptr);
  launcher_.set_cancel_exits(false);  // as if the process had died
  // The same replica starts again (its previous run's claim is in the store).
  Dispatcher* again = NewDispatcher(Options("a"));
  ASSERT_TRUE(again->Start().ok());
  auto w = launcher_.WaitFor(id, 2);
  ASSERT_NE(w, nullptr);
  v1::Job job = Get(id);
  EXPECT_EQ(job.server_restarts(), 1);
  EXPECT_EQ(job.attempt_history(0).outcome(), "interrupted by a server restart");
}

}  // namespace
}  // namespace zeroq::server
