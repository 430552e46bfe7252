#include "server/dispatcher.h"

#include <algorithm>
#include <filesystem>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/log.h"
#include "server/records.h"

namespace zeroq::server {

namespace fs = std::filesystem;

// Why a run's worker was stopped by the server rather than by itself.
enum class StopReason { kNone, kClient, kShutdown, kLeaseLost };

struct Dispatcher::Run {
  std::string job_id;
  std::string tenant;
  std::string model_id;
  Fence fence;
  Slot slot;
  double time_limit_seconds = 0;
  absl::Time claimed;
  // Guarded by the dispatcher's mu_:
  std::unique_ptr<WorkerHandle> worker;
  bool released = false;
  absl::Time renewed;  // the last renewal that included this claim
  StopReason stop = StopReason::kNone;
  std::vector<v1::JobEvent> pending;       // progress not yet stored
  std::optional<WorkerOutcome> outcome;    // the exit, not yet stored
  // Its end is being stored: a renewal that no longer finds it RUNNING is
  // not a lost lease.
  bool ending = false;
  // One write of this run at a time, so its events are stored in order.
  absl::Mutex write_mu;
};

namespace {

// 1 s, 2 s, 4 s... before the n-th retry (n >= 1), at most 30 s.
absl::Duration RetryBackoff(int n) {
  return std::min(absl::Seconds(30),
                  absl::Seconds(1) * (1 << std::min(n - 1, 5)));
}

std::string StageLabel(v1::Stage stage) {
  return absl::AsciiStrToLower(v1::Stage_Name(stage).substr(6));  // "STAGE_"
}

LogIds IdsOf(const v1::Job& job) {
  return {job.tenant(), job.id(), job.model_id()};
}

}  // namespace

Dispatcher::Dispatcher(DispatcherOptions options, JobStore* store,
                       BlobStore* blobs, DevicePool pool, Launcher* launcher,
                       JobEvents* events, TenantQuotas* quotas)
    : options_(std::move(options)),
      store_(store),
      blobs_(blobs),
      launcher_(launcher),
      events_(events),
      quotas_(quotas),
      pool_(std::move(pool)) {}

Dispatcher::~Dispatcher() { Stop(absl::ZeroDuration()); }

std::string Dispatcher::JobDir(const std::string& job_id) const {
  return (fs::path(options_.work_dir) / job_id).string();
}

bool Dispatcher::Has(v1::DeviceKind kind) const {
  absl::MutexLock lock(&mu_);
  return pool_.Has(kind);
}

std::string Dispatcher::DescribeDevices() const {
  absl::MutexLock lock(&mu_);
  return pool_.Describe();
}

bool Dispatcher::store_reachable() const {
  absl::MutexLock lock(&mu_);
  return reachable_;
}

int Dispatcher::running() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(runs_.size());
}

void Dispatcher::SetReachable(bool reachable) {
  {
    absl::MutexLock lock(&mu_);
    if (reachable_ == reachable) return;
    reachable_ = reachable;
  }
  if (reachable) {
    LogInfo({}, "the job store answers again; claiming jobs");
  } else {
    LogWarning({}, "the job store does not answer; not claiming jobs until "
                   "it does");
  }
  if (options_.metrics) options_.metrics->SetStoreUp(reachable);
  if (options_.on_store_reachable) options_.on_store_reachable(reachable);
}

void Dispatcher::UpdateGaugesLocked() {
  if (options_.metrics == nullptr) return;
  for (const DeviceInfo& d : pool_.devices()) {
    int64_t busy = std::count(d.busy.begin(), d.busy.end(), true);
    // A job holds exactly one slot, so running jobs on a device = busy slots.
    options_.metrics->SetDevice(d.name, busy, busy, d.slots);
  }
}

// ---------------------------------------------------------------- start/stop

absl::Status Dispatcher::Reclaim(JobChange& change, bool own_restart) const {
  v1::Job& job = change.job;
  if (job.cancel_requested()) {
    // Cancelled while its replica was away: nothing to resume.
    FinishJob(job, v1::JOB_CANCELLED,
              absl::CancelledError("cancelled by the client"), &change.events);
    return absl::OkStatus();
  }
  EndAttempt(job, own_restart ? "interrupted by a server restart"
                              : "its server stopped renewing its lease");
  job.set_server_restarts(job.server_restarts() + 1);
  if (job.server_restarts() > options_.max_server_restarts) {
    FinishJob(job, v1::JOB_FAILED,
              absl::AbortedError(absl::StrCat(
                  "the job was interrupted by ", job.server_restarts(),
                  " server restarts (max_server_restarts ",
                  options_.max_server_restarts, ")")),
              &change.events);
    return absl::OkStatus();
  }
  job.set_state(v1::JOB_QUEUED);
  job.clear_device();
  change.events.push_back(StateEvent(
      job, absl::StrCat(own_restart ? "re-queued after a server restart"
                                    : "re-queued: the server running it "
                                      "stopped renewing its lease",
                        " (attempt ", job.attempts(),
                        " was interrupted; it does not count against "
                        "max_attempts)")));
  return absl::OkStatus();
}

absl::Status Dispatcher::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_)
      return absl::FailedPreconditionError("Dispatcher::Start called twice");
    started_ = true;
  }
  ZQ_ASSIGN_OR_RETURN(
      std::vector<JobWrite> left,
      store_->ReclaimOwned(options_.replica_id, [this](JobChange& c) {
        return Reclaim(c, /*own_restart=*/true);
      }));
  for (const JobWrite& w : left) {
    events_->Stored(w.job.id(), w.events);
    LogInfo(IdsOf(w.job),
            absl::StrCat("left running by the previous run: ",
                         absl::AsciiStrToLower(StateName(w.job.state()))));
    if (options_.metrics) {
      if (w.job.state() == v1::JOB_QUEUED) {
        options_.metrics->WorkerRestarted();
      } else {
        options_.metrics->JobFinished(
            absl::AsciiStrToLower(StateName(w.job.state())), 0);
      }
    }
  }
  {
    absl::MutexLock lock(&mu_);
    UpdateGaugesLocked();
    wake_ = true;
  }
  leaser_ = std::thread([this] { LeaseLoop(); });
  claimer_ = std::thread([this] { ClaimLoop(); });
  return absl::OkStatus();
}

void Dispatcher::Stop(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (!started_ || stopping_) return;
    stopping_ = true;
  }
  if (claimer_.joinable()) claimer_.join();
  {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return runs_.empty();
    };
    mu_.AwaitWithTimeout(absl::Condition(&idle), grace);
    for (auto& [id, run] : runs_) {
      if (run->stop == StopReason::kNone) run->stop = StopReason::kShutdown;
      if (run->worker) run->worker->Cancel();
    }
    // Their ends (re-queued) are stored by the exit callbacks; the leases
    // are kept meanwhile.
    mu_.AwaitWithTimeout(absl::Condition(&idle),
                         options_.kill_grace + absl::Seconds(10));
    leases_stopping_ = true;
  }
  if (leaser_.joinable()) leaser_.join();
  std::vector<std::unique_ptr<WorkerHandle>> reap;
  std::vector<std::shared_ptr<Run>> left;
  {
    absl::MutexLock lock(&mu_);
    reap.swap(finished_);
    for (auto& [id, run] : runs_) left.push_back(run);
  }
  for (const auto& run : left) {
    // The store did not take its end in time: its lease runs out and any
    // replica (or this one's next start) re-queues it.
    LogWarning({run->tenant, run->job_id, run->model_id},
               "stopped without storing its end; it is re-queued when its "
               "lease runs out");
  }
  reap.clear();  // joins the workers' threads
}

void Dispatcher::Wake() {
  absl::MutexLock lock(&mu_);
  wake_ = true;
}

void Dispatcher::Cancel(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(job_id);
  if (it == runs_.end()) return;
  Run& run = *it->second;
  if (run.stop != StopReason::kNone) return;
  run.stop = StopReason::kClient;
  if (run.worker) run.worker->Cancel();
}

// ---------------------------------------------------------------- claims

void Dispatcher::ClaimLoop() {
  while (true) {
    std::vector<std::unique_ptr<WorkerHandle>> reap;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return wake_ || stopping_ || !finished_.empty();
      };
      mu_.AwaitWithTimeout(absl::Condition(&ready), options_.claim_poll);
      if (stopping_) return;
      wake_ = false;
      reap.swap(finished_);
    }
    reap.clear();  // joins exited workers' threads, outside the lock
    ClaimWhileFree();
  }
}

void Dispatcher::ClaimWhileFree() {
  while (true) {
    ClaimOptions claim;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      claim.devices = pool_.Placeable();
    }
    if (claim.devices.empty()) return;
    claim.owner = options_.replica_id;
    claim.lease = options_.lease;
    {
      // Until the run is in runs_, a lease round must not take this
      // replica's new claim for one it abandoned.
      absl::MutexLock lock(&mu_);
      ++claiming_;
    }
    struct Claimed {
      Dispatcher* d;
      ~Claimed() {
        absl::MutexLock lock(&d->mu_);
        --d->claiming_;
      }
    } claimed_guard{this};
    claim.running_limit = options_.running_limit;
    std::optional<Slot> slot;
    absl::StatusOr<std::optional<JobWrite>> claimed = store_->ClaimJob(
        claim, [&](JobChange& c) -> absl::Status {
          v1::Job& job = c.job;
          if (!slot) {
            absl::MutexLock lock(&mu_);
            slot = pool_.Acquire(job.device_preference());
          }
          if (!slot) {
            return absl::FailedPreconditionError(
                absl::StrCat("no free slot for ",
                             v1::DeviceKind_Name(job.device_preference())));
          }
          job.set_state(v1::JOB_RUNNING);
          job.set_attempts(job.attempts() + 1);
          job.set_device(slot->name);
          v1::JobAttempt* attempt = job.add_attempt_history();
          attempt->set_number(job.attempts());
          attempt->set_device(slot->name);
          attempt->set_outcome("running");
          SetNow(attempt->mutable_start_time());
          job.set_stage(v1::STAGE_INSPECT);
          job.set_step(0);
          job.set_total(0);
          job.clear_error();
          SetNow(job.mutable_start_time());
          c.events.push_back(StateEvent(
              job, absl::StrCat("running on ", slot->name, " (attempt ",
                                job.attempts(), ")")));
          return absl::OkStatus();
        });
    if (claimed.ok() && claimed->has_value()) RefreshQueueDepth();
    if (!claimed.ok() || !claimed->has_value()) {
      if (slot) {
        absl::MutexLock lock(&mu_);
        pool_.Release(*slot);
      }
      if (!claimed.ok()) {
        if (claimed.status().code() == absl::StatusCode::kUnavailable) {
          SetReachable(false);
        } else {
          LogWarning({}, absl::StrCat("claiming a job: ",
                                      claimed.status().ToString()));
        }
      }
      return;
    }
    SetReachable(true);
    const v1::Job& job = (*claimed)->job;
    auto run = std::make_shared<Run>();
    run->job_id = job.id();
    run->tenant = job.tenant();
    run->model_id = job.model_id();
    run->fence = {options_.replica_id, job.attempts()};
    run->slot = *slot;
    run->time_limit_seconds = job.time_limit_seconds();
    run->claimed = absl::Now();
    run->renewed = run->claimed;
    {
      absl::MutexLock lock(&mu_);
      runs_[job.id()] = run;
      UpdateGaugesLocked();
    }
    events_->Stored(job.id(), (*claimed)->events);
    if (options_.metrics && job.attempts() == 1 && job.has_create_time()) {
      google::protobuf::Timestamp now;
      SetNow(&now);
      options_.metrics->JobStarted(SecondsBetween(job.create_time(), now));
    }
    StartRun(run, job);
  }
}

void Dispatcher::StartRun(const std::shared_ptr<Run>& run, const v1::Job& job) {
  const std::string dir = JobDir(job.id());
  std::error_code ec;
  fs::remove_all(dir, ec);  // a previous attempt's partial artifacts
  fs::create_directories(fs::path(dir) / "out", ec);
  if (ec) {
    Fail(run, absl::InternalError(
                  absl::StrCat("creating ", dir, ": ", ec.message())));
    return;
  }
  absl::StatusOr<v1::Model> model = store_->GetModel(job.model_id());
  if (!model.ok()) {
    Fail(run, model.status());
    return;
  }
  WorkerLaunch launch;
  v1::RunRequest* r = launch.request.mutable_run();
  r->set_model_path(blobs_->Path(model->sha256()));
  *r->mutable_input_shape() = model->input_shape();
  *r->mutable_config() = job.config();
  r->set_output_dir((fs::path(dir) / "out").string());
  // 0 (or unset): the server's per-job share.
  r->set_threads(job.config().threads() > 0 ? job.config().threads()
                                            : options_.cpu_threads_per_job);
  r->set_device(run->slot.core_device);
  const std::string& from = job.config().sensitivity_from_job();
  if (!from.empty()) {
    absl::StatusOr<v1::Job> source = store_->GetJob(from);
    if (!source.ok()) {
      Fail(run, source.status());
      return;
    }
    for (const v1::Artifact& a : source->result().artifacts()) {
      if (a.name() == "report.json") {
        r->set_sensitivity_report_path(blobs_->Path(a.sha256()));
      } else if (absl::EndsWith(a.name(), ".pt") &&
                 a.name() != "model.zeroq.pt") {
        r->set_calibration_data_path(blobs_->Path(a.sha256()));
      }
    }
    if (r->sensitivity_report_path().empty()) {
      Fail(run, absl::FailedPreconditionError(
                    absl::StrCat("job ", from, " has no report.json")));
      return;
    }
  }
  launch.worker_path = options_.worker_path;
  launch.work_dir = dir;
  launch.env = run->slot.env;
  launch.time_limit = job.time_limit_seconds() > 0
                          ? absl::Seconds(job.time_limit_seconds())
                          : options_.default_time_limit;
  launch.kill_grace = options_.kill_grace;
  absl::StatusOr<std::unique_ptr<WorkerHandle>> worker = launcher_->Start(
      std::move(launch),
      [this, run](const v1::JobEvent& e) { OnWorkerEvent(run, e); },
      [this, run](WorkerOutcome o) { OnWorkerExit(run, std::move(o)); });
  if (!worker.ok()) {
    Fail(run, absl::InternalError(absl::StrCat("could not start the worker: ",
                                               worker.status().message())));
    return;
  }
  absl::MutexLock lock(&mu_);
  if (run->released) {  // it has already exited and been let go
    finished_.push_back(*std::move(worker));
    return;
  }
  run->worker = *std::move(worker);
  if (run->stop != StopReason::kNone) run->worker->Cancel();
}

// ---------------------------------------------------------------- workers

void Dispatcher::OnWorkerEvent(const std::shared_ptr<Run>& run,
                               const v1::JobEvent& event) {
  v1::JobEvent e = event;
  e.set_message(options_.redactor->ForTenant(event.message()));
  if (!e.has_time()) SetNow(e.mutable_time());
  {
    absl::MutexLock lock(&mu_);
    if (run->stop == StopReason::kLeaseLost) return;
    run->pending.push_back(std::move(e));
  }
  absl::MutexLock write(&run->write_mu);
  Flush(*run);
}

bool Dispatcher::Flush(Run& run) {
  std::vector<v1::JobEvent> batch;
  {
    absl::MutexLock lock(&mu_);
    if (run.stop == StopReason::kLeaseLost) return true;
    batch.swap(run.pending);
  }
  if (batch.empty()) return true;
  absl::StatusOr<JobWrite> written = store_->EditJob(
      run.job_id, &run.fence, [&batch](JobChange& c) {
        v1::Job& job = c.job;
        for (const v1::JobEvent& e : batch) {
          if (e.stage() != v1::STAGE_UNSPECIFIED) {
            if (e.stage() != job.stage()) {
              job.set_step(0);
              job.set_total(0);
            }
            job.set_stage(e.stage());
          }
          if (e.type() == v1::EVENT_PROGRESS) {
            job.set_step(e.step());
            job.set_total(e.total());
          }
          c.events.push_back(e);
        }
        return absl::OkStatus();
      });
  if (written.ok()) {
    events_->Stored(run.job_id, written->events);
    return true;
  }
  absl::MutexLock lock(&mu_);
  if (written.status().code() == absl::StatusCode::kAborted) {
    LoseLease(run, std::string(written.status().message()));
    return true;
  }
  // Kept, in order, for the next round.
  batch.insert(batch.end(), std::make_move_iterator(run.pending.begin()),
               std::make_move_iterator(run.pending.end()));
  run.pending = std::move(batch);
  return false;
}

void Dispatcher::LoseLease(Run& run, const std::string& why) {
  if (run.stop == StopReason::kLeaseLost) return;
  run.stop = StopReason::kLeaseLost;
  run.pending.clear();
  if (options_.metrics) options_.metrics->LeaseLost();
  LogWarning({run.tenant, run.job_id, run.model_id},
             absl::StrCat("stopping its worker: ", why));
  if (run.worker) run.worker->Cancel();
}

void Dispatcher::OnWorkerExit(const std::shared_ptr<Run>& run,
                              WorkerOutcome outcome) {
  if (outcome.kind == WorkerOutcome::Kind::kSucceeded && outcome.result) {
    // Copied into the blob store before the result names them. Done here,
    // off every lock: hashing and copying a model takes a moment.
    const fs::path out = fs::path(JobDir(run->job_id)) / "out";
    for (v1::Artifact& a : *outcome.result->mutable_artifacts()) {
      absl::StatusOr<BlobInfo> info = blobs_->PutFile((out / a.name()).string());
      if (!info.ok()) {
        outcome.kind = WorkerOutcome::Kind::kFailed;
        outcome.error.set_code(static_cast<int>(absl::StatusCode::kInternal));
        outcome.error.set_message(absl::StrCat(
            "storing artifact ", a.name(), ": ", info.status().message()));
        outcome.result.reset();
        break;
      }
      a.set_sha256(info->sha256);
      a.set_size_bytes(info->size_bytes);
    }
  }
  {
    absl::MutexLock lock(&mu_);
    run->outcome = std::move(outcome);
  }
  Finish(run);
}

void Dispatcher::Fail(const std::shared_ptr<Run>& run,
                      const absl::Status& status) {
  WorkerOutcome outcome;
  outcome.kind = WorkerOutcome::Kind::kFailed;
  outcome.error.set_code(static_cast<int>(status.code()));
  outcome.error.set_message(std::string(status.message()));
  {
    absl::MutexLock lock(&mu_);
    run->outcome = std::move(outcome);
  }
  Finish(run);
}

absl::Status Dispatcher::ApplyOutcome(const Run& run,
                                      const WorkerOutcome& outcome,
                                      JobChange& change) {
  using Kind = WorkerOutcome::Kind;
  v1::Job& job = change.job;
  const Redactor& redactor = *options_.redactor;
  auto finish = [&](v1::JobState state, const absl::Status& error) {
    FinishJob(job, state,
              absl::Status(error.code(), redactor.ForTenant(error.message())),
              &change.events);
  };
  if (run.stop == StopReason::kShutdown && outcome.kind != Kind::kSucceeded) {
    // Stopped by shutdown: the job runs again (here after a restart, or on
    // another replica now), and this attempt does not count against it.
    EndAttempt(job, "stopped by server shutdown");
    job.set_state(v1::JOB_QUEUED);
    job.set_attempts(std::max(0, job.attempts() - 1));
    job.clear_device();
    change.events.push_back(
        StateEvent(job, "stopped by server shutdown; re-queued"));
    return absl::OkStatus();
  }
  const bool cancelled =
      job.cancel_requested() || run.stop == StopReason::kClient;
  switch (outcome.kind) {
    case Kind::kSucceeded:
      if (!outcome.result) {
        finish(v1::JOB_FAILED,
               absl::InternalError("the worker reported no result"));
        return absl::OkStatus();
      }
      *job.mutable_result() = *outcome.result;
      finish(v1::JOB_SUCCEEDED, absl::OkStatus());
      return absl::OkStatus();
    case Kind::kFailed:
      if (cancelled && outcome.error.code() ==
                           static_cast<int>(absl::StatusCode::kCancelled)) {
        finish(v1::JOB_CANCELLED,
               absl::CancelledError("cancelled by the client"));
        return absl::OkStatus();
      }
      // The job itself failed (the model, its config): final, no retry.
      finish(v1::JOB_FAILED,
             absl::Status(static_cast<absl::StatusCode>(outcome.error.code()),
                          outcome.error.message()));
      return absl::OkStatus();
    case Kind::kCancelled:
      finish(v1::JOB_CANCELLED,
             absl::CancelledError("cancelled by the client"));
      return absl::OkStatus();
    case Kind::kTimedOut:
      EndAttempt(job, "timed out");
      finish(v1::JOB_FAILED,
             absl::DeadlineExceededError(absl::StrCat(
                 "the job ran past its time limit of ",
                 absl::FormatDuration(
                     run.time_limit_seconds > 0
                         ? absl::Seconds(run.time_limit_seconds)
                         : options_.default_time_limit),
                 " and was stopped; submit it with a larger "
                 "time_limit_seconds")));
      return absl::OkStatus();
    case Kind::kCrashed: {
      const std::string message =
          redactor.ForTenant(outcome.error.message().empty()
                                 ? "the worker crashed"
                                 : outcome.error.message());
      EndAttempt(job, "crashed", message);
      job.set_worker_crashes(job.worker_crashes() + 1);
      if (cancelled) {
        finish(v1::JOB_CANCELLED,
               absl::CancelledError("cancelled by the client"));
        return absl::OkStatus();
      }
      const int crashes = job.worker_crashes();
      if (crashes >= options_.max_attempts) {
        finish(v1::JOB_FAILED,
               absl::InternalError(absl::StrCat(
                   "the worker crashed ", crashes, " time",
                   crashes == 1 ? "" : "s", " (max_attempts ",
                   options_.max_attempts, "); last: ", message)));
        return absl::OkStatus();
      }
      // A crash is often the machine's doing (out of memory, a lost
      // device): try again after a pause, on whatever slot is free then
      // (on any replica); the job keeps its place in the queue.
      const absl::Duration wait = RetryBackoff(crashes);
      change.not_before = absl::Now() + wait;
      job.set_state(v1::JOB_QUEUED);
      job.clear_device();
      change.events.push_back(StateEvent(
          job, absl::StrCat(message, "; retrying in ",
                            absl::FormatDuration(wait), " (attempt ",
                            job.attempts() + 1, " of at most ",
                            options_.max_attempts, ")")));
      return absl::OkStatus();
    }
  }
  return absl::InternalError("unknown worker outcome");
}

void Dispatcher::Finish(const std::shared_ptr<Run>& run) {
  absl::MutexLock write(&run->write_mu);
  std::optional<WorkerOutcome> outcome;
  {
    absl::MutexLock lock(&mu_);
    if (run->released || !run->outcome) return;
    if (run->stop == StopReason::kLeaseLost) {
      run->outcome.reset();
    } else {
      outcome = run->outcome;
    }
  }
  if (!outcome) {  // another replica has the job now: nothing to write
    Release(run);
    return;
  }
  if (!Flush(*run)) return;  // the store is away: the next round retries
  if (outcome->kind == WorkerOutcome::Kind::kCrashed) {
    LogIds ids{run->tenant, run->job_id, run->model_id};
    if (!outcome->log_tail.empty()) {
      // The worker's log is internal detail (paths, process ids): the
      // server log has it, under the job's id.
      LogWarning(ids, absl::StrCat("worker log ends with: ", outcome->log_tail));
    }
    LogWarning(ids, absl::StrCat("worker crashed: ", outcome->error.message()));
  }
  absl::StatusOr<JobWrite> written;
  {
    absl::MutexLock lock(&mu_);
    run->ending = true;
  }
  {
    // Recording references to blobs and deleting unreferenced blobs do not
    // interleave on this replica.
    std::optional<absl::MutexLock> blobs;
    if (quotas_ != nullptr) blobs.emplace(&quotas_->blob_mutex());
    written = store_->EditJob(run->job_id, &run->fence, [&](JobChange& c) {
      return ApplyOutcome(*run, *outcome, c);
    });
    if (written.ok() && written->job.state() == v1::JOB_SUCCEEDED) {
      // A delete on another replica may have removed a blob with the same
      // bytes between the copy and the record: store it again.
      const fs::path out = fs::path(JobDir(run->job_id)) / "out";
      for (const v1::Artifact& a : written->job.result().artifacts()) {
        if (!blobs_->Exists(a.sha256())) {
          (void)blobs_->PutFile((out / a.name()).string());
        }
      }
    }
  }
  if (!written.ok()) {
    {
      absl::MutexLock lock(&mu_);
      run->ending = false;
    }
    if (written.status().code() == absl::StatusCode::kAborted) {
      {
        absl::MutexLock lock(&mu_);
        LoseLease(*run, std::string(written.status().message()));
      }
      Release(run);
      return;
    }
    // Kept: the next lease round tries again (while the lease lasts).
    LogWarning({run->tenant, run->job_id, run->model_id},
               absl::StrCat("storing the job's end: ",
                            written.status().message(), "; retrying"));
    return;
  }
  events_->Stored(run->job_id, written->events);
  const v1::Job& job = written->job;
  const std::string state = absl::AsciiStrToLower(StateName(job.state()));
  std::string logged = state;
  if (job.has_error()) absl::StrAppend(&logged, ": ", job.error().message());
  if (outcome->kind == WorkerOutcome::Kind::kFailed &&
      job.state() == v1::JOB_FAILED) {
    logged = absl::StrCat(state, ": ", outcome->error.message());
  }
  if (job.state() == v1::JOB_FAILED) {
    LogWarning(IdsOf(job), logged);
  } else {
    LogInfo(IdsOf(job), logged);
  }
  if (options_.metrics != nullptr) {
    if (outcome->kind == WorkerOutcome::Kind::kCrashed)
      options_.metrics->WorkerCrashed();
    if (job.state() != v1::JOB_QUEUED) {
      options_.metrics->JobFinished(
          state, job.has_start_time()
                     ? SecondsBetween(job.start_time(), job.end_time())
                     : 0);
      if (job.state() == v1::JOB_SUCCEEDED) {
        for (const v1::StageTime& t : job.result().stage_seconds())
          options_.metrics->StageFinished(StageLabel(t.stage()), t.seconds());
      }
    }
  }
  if (job.state() == v1::JOB_SUCCEEDED && quotas_ != nullptr)
    quotas_->RefreshStoredBytes(job.tenant());
  Release(run);
}

void Dispatcher::Release(const std::shared_ptr<Run>& run) {
  {
    absl::MutexLock lock(&mu_);
    if (run->released) return;
    run->released = true;
    pool_.Release(run->slot);
    if (run->worker) finished_.push_back(std::move(run->worker));
    auto it = runs_.find(run->job_id);
    if (it != runs_.end() && it->second == run) runs_.erase(it);
    UpdateGaugesLocked();
    wake_ = true;  // a slot is free
  }
  std::error_code ec;
  fs::remove_all(JobDir(run->job_id), ec);
}

// ---------------------------------------------------------------- leases

void Dispatcher::LeaseLoop() {
  const absl::Duration every = options_.lease / 10;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      const absl::Time until = absl::Now() + every;
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return leases_stopping_;
      };
      mu_.AwaitWithDeadline(absl::Condition(&stop), until);
      if (leases_stopping_) return;
    }
    LeaseRound();
  }
}

void Dispatcher::LeaseRound() {
  const absl::Time round = absl::Now();
  struct Abandoned {
    std::string owner;
    int32_t attempt;
    std::string job_id;
  };
  std::vector<Abandoned> abandoned;
  absl::StatusOr<std::vector<LeaseInfo>> held =
      store_->RenewLeases(options_.replica_id, options_.lease);
  std::vector<std::shared_ptr<Run>> retry;
  {
    absl::MutexLock lock(&mu_);
    if (!held.ok()) {
      // Without renewals the lease runs out at the store, and another
      // replica may start the job: stop the worker well before that.
      for (auto& [id, run] : runs_) {
        if (round - run->renewed > options_.lease * 7 / 10) {
          LoseLease(*run, absl::StrCat("its lease could not be renewed for ",
                                       absl::FormatDuration(round - run->renewed)));
        }
      }
    } else {
      absl::flat_hash_map<std::string, const LeaseInfo*> by_id;
      for (const LeaseInfo& l : *held) {
        by_id[l.job_id] = &l;
        // Held in the store but not run here: a run this replica let go
        // while it could not reach the store. Released now rather than
        // renewed forever.
        if (!runs_.contains(l.job_id) && claiming_ == 0)
          abandoned.push_back({options_.replica_id, l.attempt, l.job_id});
      }
      for (auto& [id, run] : runs_) {
        auto it = by_id.find(id);
        if (it != by_id.end() && it->second->attempt == run->fence.attempt) {
          run->renewed = round;
          if (it->second->cancel_requested && run->stop == StopReason::kNone) {
            run->stop = StopReason::kClient;
            if (run->worker) run->worker->Cancel();
          }
        } else if (run->claimed < round && !run->ending) {
          LoseLease(*run, "another server has taken the job over");
        }
      }
    }
    for (auto& [id, run] : runs_) {
      if (!run->pending.empty() || run->outcome ||
          run->stop == StopReason::kLeaseLost) {
        retry.push_back(run);
      }
    }
  }
  if (!held.ok()) {
    if (held.status().code() == absl::StatusCode::kUnavailable) {
      SetReachable(false);
    } else {
      LogWarning({}, absl::StrCat("renewing leases: ", held.status().ToString()));
    }
  } else {
    SetReachable(true);
  }
  for (const auto& run : retry) {
    bool ended;
    {
      absl::MutexLock lock(&mu_);
      ended = run->outcome.has_value();
    }
    if (ended) {
      Finish(run);
    } else {
      absl::MutexLock write(&run->write_mu);
      Flush(*run);
    }
  }
  if (!held.ok()) return;
  for (const Abandoned& a : abandoned) {
    const Fence fence{a.owner, a.attempt};
    absl::StatusOr<JobWrite> w =
        store_->EditJob(a.job_id, &fence, [this](JobChange& c) {
          return Reclaim(c, /*own_restart=*/false);
        });
    if (w.ok()) {
      events_->Stored(a.job_id, w->events);
      LogWarning(IdsOf(w->job),
                 absl::StrCat("released after its worker was stopped: ",
                              absl::AsciiStrToLower(StateName(w->job.state()))));
      Wake();
    }
  }
  // Other replicas' jobs whose leases ran out.
  absl::StatusOr<std::vector<JobWrite>> reclaimed = store_->ReclaimExpired(
      20, [this](JobChange& c) { return Reclaim(c, /*own_restart=*/false); });
  if (!reclaimed.ok()) {
    LogWarning({}, absl::StrCat("re-queuing jobs with expired leases: ",
                                reclaimed.status().ToString()));
  } else {
    for (const JobWrite& w : *reclaimed) {
      events_->Stored(w.job.id(), w.events);
      LogWarning(IdsOf(w.job),
                 absl::StrCat("its server stopped renewing its lease: ",
                              absl::AsciiStrToLower(StateName(w.job.state()))));
      if (options_.metrics) options_.metrics->WorkerRestarted();
    }
    if (!reclaimed->empty()) Wake();
  }
  RefreshQueueDepth();
}

void Dispatcher::RefreshQueueDepth() {
  if (options_.metrics == nullptr) return;
  absl::StatusOr<int64_t> queued = store_->CountJobs(v1::JOB_QUEUED);
  if (queued.ok()) options_.metrics->SetQueueDepth(*queued);
}

}  // namespace zeroq::server
