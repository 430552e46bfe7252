#include "server/job_manager.h"

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "core/pareto.h"
#include "server/log.h"
#include "server/scheduler.h"
#include "server/sha256.h"
#include "server/validation.h"

namespace zeroq::server {

namespace fs = std::filesystem;

struct JobManager::JobRuntime {
  v1::Job job;
  std::shared_ptr<EventLog> log;
  std::optional<Slot> slot;
  std::unique_ptr<WorkerProcess> worker;
  bool exited = false;            // the worker's on_exit ran
  bool stop_requested = false;    // by Stop(): re-queue, not cancel
  int64_t queue_order = 0;
  absl::Time enqueued_at;
  absl::Time not_before = absl::InfinitePast();  // retry backoff
};

namespace {

void SetNow(google::protobuf::Timestamp* t) {
  absl::Time now = absl::Now();
  int64_t nanos = absl::ToUnixNanos(now);
  t->set_seconds(nanos / 1000000000);
  t->set_nanos(static_cast<int32_t>(nanos % 1000000000));
}

// Closes the job's newest attempt (if it is still open).
void EndAttempt(v1::Job& job, const std::string& outcome,
                const std::string& reason = "") {
  if (job.attempt_history().empty()) return;
  v1::JobAttempt& a = *job.mutable_attempt_history()->rbegin();
  if (a.outcome() != "running") return;
  a.set_outcome(outcome);
  a.set_reason(reason);
  SetNow(a.mutable_end_time());
}

// 1 s, 2 s, 4 s... before the n-th retry (n >= 1), at most 30 s.
absl::Duration RetryBackoff(int n) {
  return std::min(absl::Seconds(30), absl::Seconds(1) * (1 << std::min(n - 1, 5)));
}

std::string RandomHex(int digits) {
  static absl::Mutex mu(absl::kConstInit);
  static std::mt19937_64* rng = nullptr;
  absl::MutexLock lock(&mu);
  if (rng == nullptr) {
    std::random_device rd;
    rng = new std::mt19937_64(
        (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
        static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));
  }
  std::string out;
  while (static_cast<int>(out.size()) < digits)
    absl::StrAppend(&out, absl::Hex((*rng)(), absl::kZeroPad16));
  out.resize(digits);
  return out;
}

// Models are named by what makes them the same model: the tenant, the bytes
// and the input shape, so an identical upload finds the existing record.
std::string ModelId(const std::string& tenant, const std::string& sha256,
                    const google::protobuf::RepeatedField<int64_t>& shape) {
  return "m-" + Sha256Hex(absl::StrCat(tenant, "\n", sha256, "\n",
                                       absl::StrJoin(shape, ",")))
                    .substr(0, 20);
}

const char* StateName(v1::JobState s) {
  return v1::JobState_Name(s).c_str() + 4;
}  // drop "JOB_"

v1::JobEvent StateEvent(const v1::Job& job, const std::string& message) {
  v1::JobEvent e;
  e.set_type(v1::EVENT_STATE);
  e.set_state(job.state());
  e.set_stage(job.stage());
  if (job.has_error()) *e.mutable_error() = job.error();
  e.set_message(message);
  return e;
}

bool IsTerminal(v1::JobState s) {
  return s == v1::JOB_SUCCEEDED || s == v1::JOB_FAILED ||
         s == v1::JOB_CANCELLED;
}

// Another tenant's record answers exactly as a missing one does, so ids
// cannot be probed across tenants.
template <typename Record>
absl::StatusOr<Record> OwnedBy(absl::StatusOr<Record> record,
                               const std::string& tenant,
                               absl::string_view kind, const std::string& id) {
  bool missing =
      !record.ok() && record.status().code() == absl::StatusCode::kNotFound;
  if (missing || (record.ok() && record->tenant() != tenant)) {
    return absl::NotFoundError(absl::StrCat(kind, " \"", id, "\" not found"));
  }
  return record;
}

std::string StageLabel(v1::Stage stage) {
  return absl::AsciiStrToLower(
      v1::Stage_Name(stage).substr(6));  // drop "STAGE_"
}

double SecondsBetween(const google::protobuf::Timestamp& a,
                      const google::protobuf::Timestamp& b) {
  return static_cast<double>(b.seconds() - a.seconds()) +
         (b.nanos() - a.nanos()) * 1e-9;
}

}  // namespace

JobManager::JobManager(ManagerOptions options, JobStore* store,
                       BlobStore* blobs, DevicePool pool)
    : options_(std::move(options)),
      redactor_({options_.data_dir,
                 fs::path(options_.worker_path).parent_path().string()}),
      store_(store),
      blobs_(blobs),
      pool_(std::move(pool)) {}

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(
    ManagerOptions options, JobStore* store, BlobStore* blobs,
    DevicePool pool) {
  if (options.data_dir.empty())
    return absl::InvalidArgumentError("ManagerOptions.data_dir is required");
  if (options.worker_path.empty() ||
      access(options.worker_path.c_str(), X_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the worker executable \"", options.worker_path,
                     "\" is missing or not executable"));
  }
  if (options.cpu_threads_per_job < 1)
    return absl::InvalidArgumentError("cpu_threads_per_job must be >= 1");
  if (options.max_attempts < 1)
    return absl::InvalidArgumentError("max_attempts must be >= 1");
  if (options.max_server_restarts < 0)
    return absl::InvalidArgumentError("max_server_restarts must be >= 0");
  return std::unique_ptr<JobManager>(
      new JobManager(std::move(options), store, blobs, std::move(pool)));
}

JobManager::~JobManager() { Stop(absl::ZeroDuration()); }

std::string JobManager::JobDir(const std::string& job_id) const {
  return (fs::path(options_.data_dir) / "jobs" / job_id).string();
}

// ---------------------------------------------------------------- start/stop

absl::Status JobManager::Start() {
  ZQ_ASSIGN_OR_RETURN(int temporaries, blobs_->RemoveTemporaries());
  if (temporaries > 0)
    LogInfo({}, absl::StrCat("removed ", temporaries, " partial uploads"));
  // Everything under jobs/ is a previous run's unfinished work: artifacts are
  // only ever read from the blob store.
  std::error_code ec;
  fs::remove_all(fs::path(options_.data_dir) / "jobs", ec);
  fs::create_directories(fs::path(options_.data_dir) / "jobs", ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("creating ", options_.data_dir, "/jobs: ", ec.message()));

  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> jobs,
                      store_->JobsInStates({v1::JOB_QUEUED, v1::JOB_RUNNING}));
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Model> inspecting,
                      store_->ModelsInState(v1::MODEL_INSPECTING));
  absl::MutexLock lock(&mu_);
  if (started_)
    return absl::FailedPreconditionError("JobManager::Start called twice");
  started_ = true;
  for (v1::Job& job : jobs) {
    ZQ_ASSIGN_OR_RETURN(std::vector<v1::JobEvent> events,
                        store_->ListEvents(job.id(), 0));
    auto rt = std::make_shared<JobRuntime>();
    rt->log = std::make_shared<EventLog>(std::move(events), false, &fan_out_);
    rt->job = std::move(job);
    active_[rt->job.id()] = rt;
    if (rt->job.state() == v1::JOB_RUNNING && rt->job.cancel_requested()) {
      // Cancelled while the server went down: nothing to resume.
      FinishLocked(rt, v1::JOB_CANCELLED,
                   absl::CancelledError("cancelled by the client"));
      continue;
    }
    if (rt->job.state() == v1::JOB_RUNNING) {
      EndAttempt(rt->job, "interrupted by a server restart");
      rt->job.set_server_restarts(rt->job.server_restarts() + 1);
      if (rt->job.server_restarts() > options_.max_server_restarts) {
        FinishLocked(
            rt, v1::JOB_FAILED,
            absl::AbortedError(absl::StrCat(
                "the job was interrupted by ", rt->job.server_restarts(),
                " server restarts (max_server_restarts ",
                options_.max_server_restarts, ")")));
        continue;
      }
      rt->job.set_state(v1::JOB_QUEUED);
      rt->job.clear_device();
      AppendLocked(
          *rt,
          {StateEvent(
              rt->job,
              absl::StrCat("re-queued after a server restart (attempt ",
                           rt->job.attempts(),
                           " was interrupted; it does not count against "
                           "max_attempts)"))},
          false);
      LogInfo({rt->job.tenant(), rt->job.id(), rt->job.model_id()},
              "re-queued after a server restart");
      if (options_.metrics) options_.metrics->WorkerRestarted();
    } else if (rt->job.last_seq() == 0) {
      AppendLocked(*rt, {StateEvent(rt->job, "queued")}, false);
    }
    EnqueueLocked(rt);
  }
  for (const v1::Model& m : inspecting) pending_inspections_.push_back(m.id());
  // What each tenant holds, for the gauge.
  ZQ_ASSIGN_OR_RETURN(auto held, store_->StoredBytesByTenant());
  if (options_.metrics) {
    for (const auto& [tenant, bytes] : held)
      options_.metrics->SetStoredBytes(tenant, bytes);
  }
  UpdateGaugesLocked();
  scheduler_ = std::thread([this] { SchedulerLoop(); });
  if (options_.job_retention > absl::ZeroDuration())
    retention_ = std::thread([this] { RetentionLoop(); });
  return absl::OkStatus();
}

void JobManager::Stop(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (!started_ || stopping_) return;
    stopping_ = true;
    wake_scheduler_.SignalAll();
    retention_wake_.SignalAll();
  }
  if (scheduler_.joinable()) scheduler_.join();
  if (retention_.joinable()) retention_.join();
  std::vector<std::unique_ptr<WorkerProcess>> reap;
  {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const auto& [id, rt] : active_) {
        if (rt->job.state() == v1::JOB_RUNNING) return false;
      }
      return true;
    };
    mu_.AwaitWithTimeout(absl::Condition(&idle), grace);
    for (auto& [id, rt] : active_) {
      if (rt->job.state() != v1::JOB_RUNNING) continue;
      rt->stop_requested = true;
      if (rt->worker) rt->worker->Cancel();
    }
    for (auto& [id, w] : inspections_) {
      if (w) w->Cancel();
    }
    auto all_exited = [this, &idle]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return idle() && inspections_.empty();
    };
    mu_.AwaitWithTimeout(absl::Condition(&all_exited),
                         options_.kill_grace + absl::Seconds(10));
    reap.swap(finished_workers_);
  }
  reap.clear();
}

// ---------------------------------------------------------------- scheduler

struct PendingStart {
  bool inspection = false;
  std::string id;
  WorkerLaunch launch;
};

void JobManager::EnqueueLocked(std::shared_ptr<JobRuntime> rt) {
  rt->queue_order = next_queue_order_++;
  rt->enqueued_at = absl::Now();
  queued_per_tenant_[rt->job.tenant()]++;
  queue_.push_back(std::move(rt));
  UpdateGaugesLocked();
  wake_scheduler_.Signal();
}

void JobManager::RemoveFromQueueLocked(const std::shared_ptr<JobRuntime>& rt) {
  auto q = std::find(queue_.begin(), queue_.end(), rt);
  if (q == queue_.end()) return;
  queue_.erase(q);
  queued_per_tenant_[rt->job.tenant()]--;
  UpdateGaugesLocked();
}

const Quotas* JobManager::QuotasOf(const std::string& tenant) const {
  if (options_.tenants == nullptr) return nullptr;
  const Tenant* t = options_.tenants->Find(tenant);
  return t == nullptr ? nullptr : &t->quotas;
}

int64_t JobManager::RefreshStoredBytesLocked(const std::string& tenant) {
  absl::StatusOr<int64_t> bytes = store_->StoredBytes(tenant);
  if (!bytes.ok()) {
    LogWarning({tenant, "", ""},
               absl::StrCat("reading stored bytes: ", bytes.status().message()));
    return 0;
  }
  if (options_.metrics) options_.metrics->SetStoredBytes(tenant, *bytes);
  return *bytes;
}

std::string JobManager::LargestHoldingsLocked(const std::string& tenant) {
  absl::StatusOr<std::vector<Holding>> largest =
      store_->LargestHoldings(tenant, 3);
  if (!largest.ok() || largest->empty()) return "";
  std::vector<std::string> parts;
  for (const Holding& h : *largest) {
    parts.push_back(absl::StrCat(h.is_model ? "model " : "job ", h.owner, " (",
                                 h.bytes, " bytes)"));
  }
  return absl::StrCat("; the largest: ", absl::StrJoin(parts, ", "));
}

void JobManager::UpdateGaugesLocked() {
  if (options_.metrics == nullptr) return;
  options_.metrics->SetQueueDepth(static_cast<int64_t>(queue_.size()));
  for (const DeviceInfo& d : pool_.devices()) {
    int64_t busy = std::count(d.busy.begin(), d.busy.end(), true);
    // A job holds exactly one slot, so running jobs on a device = busy slots.
    options_.metrics->SetDevice(d.name, busy, busy, d.slots);
  }
}

void JobManager::SchedulerLoop() {
  while (true) {
    std::vector<PendingStart> starts;
    std::vector<std::unique_ptr<WorkerProcess>> reap;
    {
      absl::MutexLock lock(&mu_);
      if (!stopping_) {
        // Jobs in DispatchOrder (scheduler.h), each offered a slot of its kind.
        while (!queue_.empty()) {
          std::vector<QueuedJob> queued;
          queued.reserve(queue_.size());
          for (const auto& rt : queue_) {
            queued.push_back(
                {rt->job.priority(), rt->job.tenant(), rt->queue_order});
          }
          std::vector<std::shared_ptr<JobRuntime>> order;
          for (size_t i : DispatchOrder(queued, running_per_tenant_))
            order.push_back(queue_[i]);
          std::shared_ptr<JobRuntime> picked;
          std::optional<Slot> slot;
          const absl::Time now = absl::Now();
          for (const auto& rt : order) {
            if (rt->not_before > now) continue;  // waiting to be retried
            const Quotas* quotas = QuotasOf(rt->job.tenant());
            if (quotas != nullptr && quotas->running_jobs > 0 &&
                running_per_tenant_[rt->job.tenant()] >= quotas->running_jobs) {
              continue;  // the tenant's running_jobs quota; others may go
            }
            slot = pool_.Acquire(rt->job.device_preference());
            if (slot) {
              picked = rt;
              break;
            }
          }
          if (!picked) break;
          RemoveFromQueueLocked(picked);
          StartJobLocked(picked, *slot);
          if (picked->job.state() != v1::JOB_RUNNING)
            continue;  // failed to prepare
          PendingStart s;
          s.id = picked->job.id();
          absl::StatusOr<v1::RunRequest> run =
              BuildRunRequest(picked->job, *slot);
          if (!run.ok()) {
            pool_.Release(*slot);
            running_per_tenant_[picked->job.tenant()]--;
            FinishLocked(picked, v1::JOB_FAILED, run.status());
            continue;
          }
          *s.launch.request.mutable_run() = *std::move(run);
          s.launch.worker_path = options_.worker_path;
          s.launch.work_dir = JobDir(s.id);
          s.launch.env = slot->env;
          s.launch.time_limit =
              picked->job.time_limit_seconds() > 0
                  ? absl::Seconds(picked->job.time_limit_seconds())
                  : options_.default_time_limit;
          s.launch.kill_grace = options_.kill_grace;
          starts.push_back(std::move(s));
        }
        // Inspections run beside jobs, on the CPU with one thread: loading a
        // model and one forward is small next to a job.
        while (static_cast<int>(inspections_.size()) <
                   options_.max_concurrent_inspections &&
               !pending_inspections_.empty()) {
          std::string id = pending_inspections_.front();
          pending_inspections_.pop_front();
          absl::StatusOr<v1::Model> model = store_->GetModel(id);
          if (!model.ok() || model->state() != v1::MODEL_INSPECTING) continue;
          PendingStart s;
          s.inspection = true;
          s.id = id;
          v1::InspectRequest* inspect = s.launch.request.mutable_inspect();
          inspect->set_model_path(blobs_->Path(model->sha256()));
          *inspect->mutable_input_shape() = model->input_shape();
          s.launch.worker_path = options_.worker_path;
          s.launch.work_dir = JobDir("inspect-" + id);
          s.launch.env = {{"CUDA_VISIBLE_DEVICES", ""}};
          s.launch.time_limit = options_.inspect_time_limit;
          s.launch.kill_grace = options_.kill_grace;
          std::error_code ec;
          fs::remove_all(s.launch.work_dir, ec);
          fs::create_directories(s.launch.work_dir, ec);
          inspections_[id] = nullptr;  // counts against the limit from now
          starts.push_back(std::move(s));
        }
      }
      reap.swap(finished_workers_);
      if (starts.empty() && reap.empty()) {
        if (stopping_) break;
        wake_scheduler_.WaitWithTimeout(&mu_, absl::Seconds(1));
        continue;
      }
    }
    reap.clear();  // joins finished workers' threads, outside the lock
    // Starting a worker is done without the lock: its callbacks take it.
    for (PendingStart& s : starts) {
      std::string id = s.id;
      absl::StatusOr<std::unique_ptr<WorkerProcess>> worker;
      if (s.inspection) {
        worker = WorkerProcess::Start(
            std::move(s.launch), [](const v1::JobEvent&) {},
            [this, id](WorkerOutcome o) {
              OnInspectionExit(id, std::move(o));
            });
      } else {
        worker = WorkerProcess::Start(
            std::move(s.launch),
            [this, id](const v1::JobEvent& e) { OnWorkerEvent(id, e); },
            [this, id](WorkerOutcome o) { OnWorkerExit(id, std::move(o)); });
      }
      absl::MutexLock lock(&mu_);
      if (s.inspection) {
        auto it = inspections_.find(id);
        if (!worker.ok()) {
          if (it != inspections_.end()) inspections_.erase(it);
          absl::StatusOr<v1::Model> model = store_->GetModel(id);
          if (model.ok()) {
            model->set_state(v1::MODEL_INVALID);
            model->set_state_reason(redactor_.ForTenant(absl::StrCat(
                "could not start the worker: ", worker.status().message())));
            (void)store_->PutModel(*model);
          }
        } else if (it != inspections_.end()) {
          it->second = *std::move(worker);
        } else {
          finished_workers_.push_back(*std::move(worker));
        }
        continue;
      }
      auto it = active_.find(id);
      std::shared_ptr<JobRuntime> rt =
          it == active_.end() ? nullptr : it->second;
      if (!worker.ok()) {
        if (rt && rt->job.state() == v1::JOB_RUNNING && !rt->exited) {
          pool_.Release(*rt->slot);
          running_per_tenant_[rt->job.tenant()]--;
          FinishLocked(
              rt, v1::JOB_FAILED,
              absl::InternalError(absl::StrCat("could not start the worker: ",
                                               worker.status().message())));
        }
        continue;
      }
      if (!rt || rt->exited) {
        finished_workers_.push_back(*std::move(worker));
        continue;
      }
      rt->worker = *std::move(worker);
      if (rt->job.cancel_requested() || rt->stop_requested) rt->worker->Cancel();
    }
  }
}

void JobManager::StartJobLocked(const std::shared_ptr<JobRuntime>& rt,
                                Slot slot) {
  v1::Job& job = rt->job;
  job.set_state(v1::JOB_RUNNING);
  job.set_attempts(job.attempts() + 1);
  job.set_device(slot.name);
  v1::JobAttempt* attempt = job.add_attempt_history();
  attempt->set_number(job.attempts());
  attempt->set_device(slot.name);
  attempt->set_outcome("running");
  SetNow(attempt->mutable_start_time());
  job.set_stage(v1::STAGE_INSPECT);
  job.set_step(0);
  job.set_total(0);
  job.clear_error();
  SetNow(job.mutable_start_time());
  rt->slot = slot;
  rt->exited = false;
  if (options_.metrics) {
    options_.metrics->JobStarted(
        absl::ToDoubleSeconds(absl::Now() - rt->enqueued_at));
  }
  running_per_tenant_[job.tenant()]++;
  std::string dir = JobDir(job.id());
  std::error_code ec;
  fs::remove_all(dir, ec);  // a previous attempt's partial artifacts
  fs::create_directories(fs::path(dir) / "out", ec);
  AppendLocked(
      *rt,
      {StateEvent(job, absl::StrCat("running on ", slot.name, " (attempt ",
                                    job.attempts(), ")"))},
      false);
  if (ec) {
    pool_.Release(slot);
    running_per_tenant_[job.tenant()]--;
    FinishLocked(rt, v1::JOB_FAILED,
                 absl::InternalError(
                     absl::StrCat("creating ", dir, ": ", ec.message())));
  }
}

absl::StatusOr<v1::RunRequest> JobManager::BuildRunRequest(const v1::Job& job,
                                                           const Slot& slot) {
  ZQ_ASSIGN_OR_RETURN(v1::Model model, store_->GetModel(job.model_id()));
  v1::RunRequest run;
  run.set_model_path(blobs_->Path(model.sha256()));
  *run.mutable_input_shape() = model.input_shape();
  *run.mutable_config() = job.config();
  run.set_output_dir((fs::path(JobDir(job.id())) / "out").string());
  // 0 (or unset): the server's per-job share.
  run.set_threads(job.config().threads() > 0 ? job.config().threads()
                                             : options_.cpu_threads_per_job);
  run.set_device(slot.core_device);
  const std::string& from = job.config().sensitivity_from_job();
  if (!from.empty()) {
    ZQ_ASSIGN_OR_RETURN(v1::Job source, store_->GetJob(from));
    for (const v1::Artifact& a : source.result().artifacts()) {
      if (a.name() == "report.json") {
        run.set_sensitivity_report_path(blobs_->Path(a.sha256()));
      } else if (absl::EndsWith(a.name(), ".pt") &&
                 a.name() != "model.zeroq.pt") {
        run.set_calibration_data_path(blobs_->Path(a.sha256()));
      }
    }
    if (run.sensitivity_report_path().empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", from, " has no report.json"));
    }
  }
  return run;
}

// ---------------------------------------------------------------- workers

void JobManager::OnWorkerEvent(const std::string& job_id,
                               const v1::JobEvent& event) {
  absl::MutexLock lock(&mu_);
  auto it = active_.find(job_id);
  if (it == active_.end() || it->second->job.state() != v1::JOB_RUNNING) return;
  JobRuntime& rt = *it->second;
  if (event.stage() != v1::STAGE_UNSPECIFIED) {
    if (event.stage() != rt.job.stage()) {
      rt.job.set_step(0);
      rt.job.set_total(0);
    }
    rt.job.set_stage(event.stage());
  }
  if (event.type() == v1::EVENT_PROGRESS) {
    rt.job.set_step(event.step());
    rt.job.set_total(event.total());
  }
  v1::JobEvent e = event;
  e.set_message(redactor_.ForTenant(event.message()));
  AppendLocked(rt, {std::move(e)}, false);
}

void JobManager::OnWorkerExit(const std::string& job_id,
                              WorkerOutcome outcome) {
  // Copies the job's artifacts into the blob store (only those missing
  // there, with `only_missing`) and records their hashes and sizes.
  const bool succeeded =
      outcome.kind == WorkerOutcome::Kind::kSucceeded && outcome.result;
  auto store_artifacts = [&](bool only_missing) -> absl::Status {
    const fs::path out = fs::path(JobDir(job_id)) / "out";
    for (v1::Artifact& a : *outcome.result->mutable_artifacts()) {
      if (only_missing && blobs_->Exists(a.sha256())) continue;
      absl::StatusOr<BlobInfo> info = blobs_->PutFile((out / a.name()).string());
      if (!info.ok()) {
        return absl::InternalError(absl::StrCat(
            "storing artifact ", a.name(), ": ", info.status().message()));
      }
      a.set_sha256(info->sha256);
      a.set_size_bytes(info->size_bytes);
    }
    return absl::OkStatus();
  };
  // Before the lock is taken: hashing and copying a model takes a moment.
  absl::Status store_status = succeeded ? store_artifacts(false) : absl::OkStatus();
  absl::MutexLock lock(&mu_);
  // A DeleteJob of another job with the same bytes may have removed a blob
  // between the copy above and the lock (deletes run under it): store it
  // again, now that nothing can.
  if (succeeded && store_status.ok()) store_status = store_artifacts(true);
  auto it = active_.find(job_id);
  if (it == active_.end()) return;
  std::shared_ptr<JobRuntime> rt = it->second;
  rt->exited = true;
  if (rt->worker) finished_workers_.push_back(std::move(rt->worker));
  if (rt->slot) pool_.Release(*rt->slot);
  rt->slot.reset();
  UpdateGaugesLocked();
  running_per_tenant_[rt->job.tenant()]--;
  wake_scheduler_.Signal();
  std::error_code ec;
  fs::remove_all(JobDir(job_id), ec);

  using Kind = WorkerOutcome::Kind;
  if (rt->stop_requested && outcome.kind != Kind::kSucceeded) {
    // Stopped by shutdown: the job runs again after the restart, and this
    // interrupted attempt does not count against it.
    EndAttempt(rt->job, "stopped by server shutdown");
    rt->job.set_state(v1::JOB_QUEUED);
    rt->job.set_attempts(std::max(0, rt->job.attempts() - 1));
    rt->job.clear_device();
    AppendLocked(*rt,
                 {StateEvent(rt->job, "stopped by server shutdown; re-queued")},
                 false);
    return;
  }
  switch (outcome.kind) {
    case Kind::kSucceeded:
      if (!store_status.ok() || !outcome.result) {
        FinishLocked(rt, v1::JOB_FAILED,
                     store_status.ok()
                         ? absl::InternalError("the worker reported no result")
                         : store_status);
        return;
      }
      *rt->job.mutable_result() = *std::move(outcome.result);
      FinishLocked(rt, v1::JOB_SUCCEEDED, absl::OkStatus());
      RefreshStoredBytesLocked(rt->job.tenant());
      return;
    case Kind::kFailed:
      if (rt->job.cancel_requested() &&
          outcome.error.code() ==
              static_cast<int>(absl::StatusCode::kCancelled)) {
        FinishLocked(rt, v1::JOB_CANCELLED,
                     absl::CancelledError("cancelled by the client"));
        return;
      }
      // The job itself failed (the model, its config): final, no retry.
      FinishLocked(
          rt, v1::JOB_FAILED,
          absl::Status(static_cast<absl::StatusCode>(outcome.error.code()),
                       outcome.error.message()));
      return;
    case Kind::kCancelled:
      FinishLocked(rt, v1::JOB_CANCELLED,
                   absl::CancelledError("cancelled by the client"));
      return;
    case Kind::kTimedOut:
      EndAttempt(rt->job, "timed out");
      FinishLocked(
          rt, v1::JOB_FAILED,
          absl::DeadlineExceededError(absl::StrCat(
              "the job ran past its time limit of ",
              absl::FormatDuration(absl::Seconds(
                  rt->job.time_limit_seconds() > 0
                      ? rt->job.time_limit_seconds()
                      : absl::ToDoubleSeconds(options_.default_time_limit))),
              " and was stopped; submit it with a larger time_limit_seconds")));
      return;
    case Kind::kCrashed: {
      if (options_.metrics) options_.metrics->WorkerCrashed();
      const std::string message = outcome.error.message().empty()
                                      ? "the worker crashed"
                                      : outcome.error.message();
      // The worker's log is internal detail (paths, process ids): the
      // server log has it, under the job's id.
      LogIds ids{rt->job.tenant(), rt->job.id(), rt->job.model_id()};
      if (!outcome.log_tail.empty()) {
        LogWarning(ids, absl::StrCat("worker log ends with: ", outcome.log_tail));
      }
      EndAttempt(rt->job, "crashed", redactor_.ForTenant(message));
      rt->job.set_worker_crashes(rt->job.worker_crashes() + 1);
      if (rt->job.cancel_requested()) {
        FinishLocked(rt, v1::JOB_CANCELLED,
                     absl::CancelledError("cancelled by the client"));
        return;
      }
      const int crashes = rt->job.worker_crashes();
      if (crashes >= options_.max_attempts) {
        FinishLocked(rt, v1::JOB_FAILED,
                     absl::InternalError(absl::StrCat(
                         "the worker crashed ", crashes, " time",
                         crashes == 1 ? "" : "s", " (max_attempts ",
                         options_.max_attempts, "); last: ", message)));
        return;
      }
      // A crash is often the machine's doing (out of memory, a lost
      // device): try again after a pause, on whatever slot is free then.
      const absl::Duration wait = RetryBackoff(crashes);
      rt->not_before = absl::Now() + wait;
      rt->job.set_state(v1::JOB_QUEUED);
      rt->job.clear_device();
      AppendLocked(*rt,
                   {StateEvent(rt->job,
                               absl::StrCat(redactor_.ForTenant(message),
                                            "; retrying in ",
                                            absl::FormatDuration(wait),
                                            " (attempt ", rt->job.attempts() + 1,
                                            " of at most ", options_.max_attempts,
                                            ")"))},
                   false);
      LogWarning(ids, absl::StrCat("worker crashed: ", message, "; retrying in ",
                                   absl::FormatDuration(wait)));
      const int64_t order = rt->queue_order;  // keeps its place in the queue
      EnqueueLocked(rt);
      rt->queue_order = order;
      return;
    }
  }
}

void JobManager::OnInspectionExit(const std::string& model_id,
                                  WorkerOutcome outcome) {
  absl::MutexLock lock(&mu_);
  auto it = inspections_.find(model_id);
  if (it != inspections_.end()) {
    if (it->second) finished_workers_.push_back(std::move(it->second));
    inspections_.erase(it);
  }
  wake_scheduler_.Signal();
  std::error_code ec;
  fs::remove_all(JobDir("inspect-" + model_id), ec);
  using Kind = WorkerOutcome::Kind;
  if (stopping_ && outcome.kind == Kind::kCancelled)
    return;  // inspected again at the next start
  absl::StatusOr<v1::Model> model = store_->GetModel(model_id);
  if (!model.ok()) return;
  if (outcome.kind == Kind::kSucceeded && outcome.inspection) {
    model->set_state(v1::MODEL_READY);
    *model->mutable_summary() = *std::move(outcome.inspection);
    model->clear_state_reason();
  } else {
    model->set_state(v1::MODEL_INVALID);
    switch (outcome.kind) {
      case Kind::kTimedOut:
        model->set_state_reason(
            absl::StrCat("inspecting the model took longer than ",
                         absl::FormatDuration(options_.inspect_time_limit)));
        break;
      case Kind::kCrashed:
        model->set_state_reason(redactor_.ForTenant(absl::StrCat(
            "the model crashed the worker: ", outcome.error.message())));
        break;
      default:
        model->set_state_reason(outcome.error.message().empty()
                                    ? "inspection failed"
                                    : redactor_.ForTenant(outcome.error.message()));
    }
  }
  absl::Status s = store_->PutModel(*model);
  LogIds ids{model->tenant(), "", model_id};
  if (!s.ok())
    LogError(ids, absl::StrCat("storing the inspection: ", s.ToString()));
  LogInfo(ids, absl::StrCat("inspected: ", v1::ModelState_Name(model->state()),
                            " ", outcome.error.message().empty()
                                     ? model->state_reason()
                                     : outcome.error.message()));
  if (options_.metrics)
    options_.metrics->InspectionFinished(model->state() == v1::MODEL_READY);
}

// ---------------------------------------------------------------- events

void JobManager::AppendLocked(JobRuntime& rt, std::vector<v1::JobEvent> events,
                              bool terminal) {
  int64_t seq = rt.job.last_seq();
  for (v1::JobEvent& e : events) {
    e.set_seq(++seq);
    SetNow(e.mutable_time());
  }
  rt.job.set_last_seq(seq);
  absl::Status s = store_->UpdateJob(rt.job, events);
  if (!s.ok()) {
    LogError({rt.job.tenant(), rt.job.id(), rt.job.model_id()},
             absl::StrCat("storing events: ", s.ToString()));
  }
  rt.log->Append(events, terminal);
}

void JobManager::FinishLocked(const std::shared_ptr<JobRuntime>& rt,
                              v1::JobState state, absl::Status error) {
  v1::Job& job = rt->job;
  job.set_state(state);
  SetNow(job.mutable_end_time());
  const std::string tenant_error = redactor_.ForTenant(error.message());
  // Closes the attempt unless its outcome was already recorded (crashed,
  // timed out, ...).
  EndAttempt(job,
             state == v1::JOB_SUCCEEDED   ? "succeeded"
             : state == v1::JOB_CANCELLED ? "cancelled"
                                          : "failed",
             tenant_error);
  if (!error.ok()) {
    job.mutable_error()->set_code(static_cast<int>(error.code()));
    job.mutable_error()->set_message(tenant_error);
  }
  std::string message = absl::AsciiStrToLower(StateName(state));
  if (!error.ok()) absl::StrAppend(&message, ": ", tenant_error);
  AppendLocked(*rt, {StateEvent(job, message)}, true);
  LogIds ids{job.tenant(), job.id(), job.model_id()};
  // The log keeps the full text.
  std::string logged = absl::AsciiStrToLower(StateName(state));
  if (!error.ok()) absl::StrAppend(&logged, ": ", error.message());
  if (state == v1::JOB_FAILED) {
    LogWarning(ids, logged);
  } else {
    LogInfo(ids, logged);
  }
  if (options_.metrics != nullptr) {
    double seconds = job.has_start_time() && state != v1::JOB_QUEUED
                         ? SecondsBetween(job.start_time(), job.end_time())
                         : 0;
    options_.metrics->JobFinished(absl::AsciiStrToLower(StateName(state)),
                                  seconds);
    if (state == v1::JOB_SUCCEEDED) {
      for (const v1::StageTime& t : job.result().stage_seconds()) {
        options_.metrics->StageFinished(StageLabel(t.stage()), t.seconds());
      }
    }
  }
  RemoveFromQueueLocked(rt);
  active_.erase(job.id());
  UpdateGaugesLocked();
}

// ---------------------------------------------------------------- quotas

absl::Status JobManager::CheckUploadQuota(const std::string& tenant,
                                          const v1::ModelMetadata& metadata) {
  const int64_t size_bytes = metadata.size_bytes();
  const Quotas* quotas = QuotasOf(tenant);
  if (quotas == nullptr) return absl::OkStatus();
  if (quotas->model_bytes > 0 && size_bytes > quotas->model_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota model_bytes: the model is ", size_bytes, " bytes, tenant ",
        tenant, "'s limit is ", quotas->model_bytes, " bytes per model"));
  }
  if (quotas->stored_bytes <= 0) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  ZQ_ASSIGN_OR_RETURN(bool held_already,
                      store_->TenantHoldsBlob(tenant, metadata.sha256()));
  if (held_already) return absl::OkStatus();  // deduplicated: nothing new
  const int64_t held = RefreshStoredBytesLocked(tenant);
  if (held + size_bytes > quotas->stored_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota stored_bytes: tenant ", tenant, " holds ", held, " bytes; ",
        size_bytes, " more would pass its limit of ", quotas->stored_bytes,
        " bytes. Delete jobs or models you no longer need",
        LargestHoldingsLocked(tenant)));
  }
  return absl::OkStatus();
}

bool JobManager::IsRetryLocked(const std::string& tenant,
                               const std::string& request_id) {
  for (const auto& [id, rt] : active_) {
    if (rt->job.tenant() == tenant && rt->job.request_id() == request_id)
      return true;
  }
  return false;
}

// ---------------------------------------------------------------- models

absl::StatusOr<v1::Model> JobManager::RegisterModel(
    const std::string& tenant, const v1::ModelMetadata& metadata,
    const BlobInfo& blob) {
  std::string id = ModelId(tenant, blob.sha256, metadata.input_shape());
  absl::MutexLock lock(&mu_);
  if (stopping_)
    return absl::UnavailableError(
        "the server is shutting down; upload again later");
  if (!blobs_->Exists(blob.sha256)) {
    return absl::AbortedError(
        "the uploaded bytes were removed by a concurrent DeleteModel; upload "
        "again");
  }
  absl::StatusOr<v1::Model> existing = store_->GetModel(id);
  if (existing.ok()) {
    existing->set_deduplicated(true);
    return existing;
  }
  if (existing.status().code() != absl::StatusCode::kNotFound)
    return existing.status();
  v1::Model model;
  model.set_id(id);
  model.set_tenant(tenant);
  model.set_name(metadata.name());
  model.set_sha256(blob.sha256);
  model.set_size_bytes(blob.size_bytes);
  *model.mutable_input_shape() = metadata.input_shape();
  model.set_state(v1::MODEL_INSPECTING);
  SetNow(model.mutable_create_time());
  ZQ_RETURN_IF_ERROR(store_->PutModel(model));
  RefreshStoredBytesLocked(tenant);
  LogInfo({tenant, "", id},
          absl::StrCat("uploaded \"", model.name(), "\", ", model.size_bytes(),
                       " bytes; inspecting"));
  pending_inspections_.push_back(id);
  wake_scheduler_.Signal();
  return model;
}

absl::StatusOr<v1::Model> JobManager::GetModel(const std::string& tenant,
                                               const std::string& id) {
  return OwnedBy(store_->GetModel(id), tenant, "model", id);
}

absl::StatusOr<Page<v1::Model>> JobManager::ListModels(
    const std::string& tenant, int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int size, NormalizePageSize(page_size));
  return store_->ListModels(tenant, size, page_token);
}

absl::Status JobManager::DeleteModel(const std::string& tenant,
                                     const std::string& id) {
  absl::MutexLock lock(&mu_);
  ZQ_ASSIGN_OR_RETURN(v1::Model model, GetModel(tenant, id));
  if (model.state() == v1::MODEL_INSPECTING) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model ", id,
        " is being inspected; delete it once it is READY or INVALID"));
  }
  ZQ_ASSIGN_OR_RETURN(int64_t active, store_->CountActiveJobsForModel(id));
  if (active > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(active, " queued or running job(s) use model ", id,
                     "; cancel them or wait for them to finish"));
  }
  ZQ_RETURN_IF_ERROR(store_->DeleteModel(id));
  LogInfo({tenant, "", id}, "deleted");
  absl::Status removed = RemoveBlobIfUnusedLocked(model.sha256());
  RefreshStoredBytesLocked(tenant);
  return removed;
}

absl::Status JobManager::RemoveBlobIfUnusedLocked(const std::string& sha256) {
  if (sha256.empty()) return absl::OkStatus();
  ZQ_ASSIGN_OR_RETURN(int64_t users, store_->CountBlobRefs(sha256));
  if (users > 0 || !blobs_->Exists(sha256)) return absl::OkStatus();
  ZQ_RETURN_IF_ERROR(blobs_->Delete(sha256));
  if (options_.metrics) options_.metrics->BlobRemoved();
  return absl::OkStatus();
}

// ---------------------------------------------------------------- jobs

absl::StatusOr<v1::Job> JobManager::SubmitJob(const std::string& tenant,
                                              const v1::SubmitJobRequest& r) {
  ZQ_RETURN_IF_ERROR(ValidateSubmitJob(r));
  ZQ_ASSIGN_OR_RETURN(v1::Model model, GetModel(tenant, r.model_id()));
  switch (model.state()) {
    case v1::MODEL_READY:
      break;
    case v1::MODEL_INVALID:
      return absl::FailedPreconditionError(
          absl::StrCat("model ", model.id(), " is INVALID (",
                       model.state_reason(), "); upload a working model"));
    default:
      return absl::FailedPreconditionError(absl::StrCat(
          "model ", model.id(),
          " is still being inspected; submit once GetModel shows READY"));
  }
  ZQ_RETURN_IF_ERROR(ValidateConfigForModel(r.config(), model));
  if (model.summary().bn_layers().empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model ", model.id(),
        " has no BatchNorm layers: ZeroQ distills its calibration data from "
        "BatchNorm "
        "statistics, so it cannot quantize this model without data"));
  }
  const std::string& from = r.config().sensitivity_from_job();
  if (!from.empty()) {
    absl::StatusOr<v1::Job> source = GetJob(tenant, from);
    if (!source.ok()) {
      return absl::Status(source.status().code(),
                          absl::StrCat("config.sensitivity_from_job: ",
                                       source.status().message()));
    }
    if (source->model_id() != r.model_id()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config.sensitivity_from_job: job ", from, " ran on model ",
          source->model_id(), ", not ", r.model_id()));
    }
    if (source->state() != v1::JOB_SUCCEEDED) {
      return absl::FailedPreconditionError(absl::StrCat(
          "config.sensitivity_from_job: job ", from, " is ",
          StateName(source->state()), "; re-planning needs a SUCCEEDED job"));
    }
    bool has_table = !source->result().layers().empty() &&
                     !source->result().layers(0).sensitivity().empty();
    if (!has_table) {
      return absl::FailedPreconditionError(absl::StrCat(
          "config.sensitivity_from_job: job ", from,
          " was not a mixed-precision job and has no sensitivity table"));
    }
    // Widths asked for must be among those the table was measured at (the
    // worker plans with just those).
    const auto& stored = source->result().layers(0).candidate_bits();
    absl::Status widths = zeroq::core::CheckReplanWidths(
        std::vector<int>(r.config().candidate_bits().begin(),
                         r.config().candidate_bits().end()),
        std::vector<int>(stored.begin(), stored.end()));
    if (!widths.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.", widths.message()));
    }
  }
  v1::Job job;
  job.set_id("j-" + RandomHex(20));
  job.set_tenant(tenant);
  job.set_model_id(r.model_id());
  *job.mutable_config() = r.config();
  job.set_priority(r.priority());
  job.set_device_preference(r.device());
  job.set_request_id(r.request_id());
  job.set_time_limit_seconds(r.time_limit_seconds());
  job.set_state(v1::JOB_QUEUED);
  SetNow(job.mutable_create_time());

  absl::MutexLock lock(&mu_);
  if (stopping_)
    return absl::UnavailableError(
        "the server is shutting down; submit again later");
  if (!pool_.Has(r.device())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device: this server has no ", v1::DeviceKind_Name(r.device()),
        " devices (it has ", pool_.Describe(), ")"));
  }
  const Quotas* quotas = QuotasOf(tenant);
  if (quotas != nullptr && quotas->queued_jobs > 0 &&
      queued_per_tenant_[tenant] >= quotas->queued_jobs) {
    // A retry of an accepted request is not a new job: let it through.
    if (r.request_id().empty() || !IsRetryLocked(tenant, r.request_id())) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "quota queued_jobs: tenant ", tenant, " already has ",
          queued_per_tenant_[tenant], " queued jobs, the limit is ",
          quotas->queued_jobs, "; wait for some to start or cancel them"));
    }
  }
  if (quotas != nullptr && quotas->stored_bytes > 0 &&
      (r.request_id().empty() || !IsRetryLocked(tenant, r.request_id()))) {
    // A job's results are stored bytes too: at the limit, free some first.
    const int64_t held = RefreshStoredBytesLocked(tenant);
    if (held >= quotas->stored_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "quota stored_bytes: tenant ", tenant, " holds ", held,
          " bytes, its limit is ", quotas->stored_bytes,
          ", and a job's results would add more. Delete jobs or models you "
          "no longer need",
          LargestHoldingsLocked(tenant)));
    }
  }
  ZQ_ASSIGN_OR_RETURN(CreateJobResult created, store_->CreateJob(job));
  if (!created.created) {
    auto it = active_.find(created.job.id());
    return it != active_.end() ? it->second->job : created.job;
  }
  auto rt = std::make_shared<JobRuntime>();
  rt->job = created.job;
  rt->log = std::make_shared<EventLog>(&fan_out_);
  active_[job.id()] = rt;
  AppendLocked(*rt, {StateEvent(rt->job, "queued")}, false);
  EnqueueLocked(rt);
  LogInfo({tenant, job.id(), job.model_id()},
          absl::StrCat("submitted (priority ", job.priority(), ")"));
  if (options_.metrics) options_.metrics->JobSubmitted(tenant);
  return rt->job;
}

absl::StatusOr<v1::Job> JobManager::GetJob(const std::string& tenant,
                                           const std::string& id) {
  {
    absl::MutexLock lock(&mu_);
    auto it = active_.find(id);
    if (it != active_.end()) {
      return OwnedBy<v1::Job>(it->second->job, tenant, "job", id);
    }
  }
  return OwnedBy(store_->GetJob(id), tenant, "job", id);
}

absl::StatusOr<Page<v1::Job>> JobManager::ListJobs(
    const std::string& tenant, v1::JobState state, const std::string& model_id,
    int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int size, NormalizePageSize(page_size));
  if (!v1::JobState_IsValid(state)) {
    return absl::InvalidArgumentError(
        absl::StrCat("state: ", state, " is not a JobState"));
  }
  JobFilter filter;
  filter.tenant = tenant;
  filter.state = state;
  filter.model_id = model_id;
  return store_->ListJobs(filter, size, page_token);
}

absl::StatusOr<v1::Job> JobManager::CancelJob(const std::string& tenant,
                                              const std::string& id) {
  {
    absl::MutexLock lock(&mu_);
    auto it = active_.find(id);
    if (it != active_.end() && it->second->job.tenant() == tenant) {
      std::shared_ptr<JobRuntime> rt = it->second;
      if (rt->job.state() == v1::JOB_QUEUED) {
        FinishLocked(
            rt, v1::JOB_CANCELLED,
            absl::CancelledError("cancelled by the client before it started"));
        return rt->job;
      }
      if (!rt->job.cancel_requested()) {
        rt->job.set_cancel_requested(true);  // stored with the event below
        v1::JobEvent e;
        e.set_type(v1::EVENT_MESSAGE);
        e.set_stage(rt->job.stage());
        e.set_message("cancellation requested; stopping the worker");
        AppendLocked(*rt, {e}, false);
        if (rt->worker) rt->worker->Cancel();
      }
      return rt->job;
    }
  }
  return GetJob(tenant, id);
}

absl::StatusOr<std::shared_ptr<EventLog>> JobManager::Watch(
    const std::string& tenant, const std::string& id) {
  {
    absl::MutexLock lock(&mu_);
    auto it = active_.find(id);
    if (it != active_.end() && it->second->job.tenant() == tenant)
      return it->second->log;
  }
  ZQ_ASSIGN_OR_RETURN(v1::Job job, GetJob(tenant, id));
  if (!IsTerminal(job.state())) {
    // Finished between the two looks: the log is the active one's, gone now,
    // and the store has everything.
    ZQ_ASSIGN_OR_RETURN(job, store_->GetJob(id));
  }
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::JobEvent> events,
                      store_->ListEvents(id, 0));
  return std::make_shared<EventLog>(std::move(events), IsTerminal(job.state()));
}

absl::StatusOr<int64_t> JobManager::DeleteJob(const std::string& tenant,
                                              const std::string& id) {
  absl::MutexLock lock(&mu_);
  auto it = active_.find(id);
  if (it != active_.end() && it->second->job.tenant() == tenant) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", id, " is ", StateName(it->second->job.state()),
        "; cancel it first (CancelJob), then delete it"));
  }
  ZQ_ASSIGN_OR_RETURN(v1::Job job, OwnedBy(store_->GetJob(id), tenant, "job", id));
  if (!IsTerminal(job.state())) {
    // Stored as running but not active: a restart is re-queuing it.
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", id, " is ", StateName(job.state()), "; cancel it first"));
  }
  for (const auto& [other_id, rt] : active_) {
    if (rt->job.config().sensitivity_from_job() == id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", other_id, " (", StateName(rt->job.state()),
          ") re-plans from job ", id,
          "; delete it once that job has finished"));
    }
  }
  const int64_t before = RefreshStoredBytesLocked(tenant);
  ZQ_RETURN_IF_ERROR(DeleteJobLocked(job, "request"));
  return std::max<int64_t>(0, before - RefreshStoredBytesLocked(tenant));
}

absl::Status JobManager::DeleteJobLocked(const v1::Job& job,
                                         const std::string& reason) {
  ZQ_RETURN_IF_ERROR(store_->DeleteJob(job.id()));
  LogInfo({job.tenant(), job.id(), job.model_id()},
          absl::StrCat("deleted (", reason, ")"));
  if (options_.metrics) options_.metrics->JobDeleted(reason);
  absl::Status status;
  for (const v1::Artifact& a : job.result().artifacts()) {
    status.Update(RemoveBlobIfUnusedLocked(a.sha256()));
  }
  return status;
}

absl::StatusOr<int> JobManager::SweepRetention() {
  if (options_.job_retention <= absl::ZeroDuration()) return 0;
  const int64_t cutoff =
      absl::ToUnixSeconds(absl::Now() - options_.job_retention);
  int deleted = 0;
  absl::flat_hash_set<std::string> tenants;
  while (true) {
    // In batches, so that the lock is never held for long.
    ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> old,
                        store_->JobsEndedBefore(cutoff, 100));
    if (old.empty()) break;
    absl::MutexLock lock(&mu_);
    for (const v1::Job& job : old) {
      ZQ_RETURN_IF_ERROR(DeleteJobLocked(job, "retention"));
      tenants.insert(job.tenant());
      ++deleted;
    }
  }
  // Blobs nothing refers to: left by a crash between storing bytes and
  // recording their model or job. Recent ones may be about to be recorded.
  const absl::Time old_enough = absl::Now() - options_.orphan_blob_min_age;
  for (const BlobEntry& blob : blobs_->List()) {
    if (blob.modified > old_enough) continue;
    absl::MutexLock lock(&mu_);
    ZQ_RETURN_IF_ERROR(RemoveBlobIfUnusedLocked(blob.sha256));
  }
  absl::MutexLock lock(&mu_);
  for (const std::string& tenant : tenants) RefreshStoredBytesLocked(tenant);
  return deleted;
}

void JobManager::RetentionLoop() {
  absl::Duration every = options_.retention_sweep_interval;
  if (every <= absl::ZeroDuration()) {
    every = std::clamp(options_.job_retention / 4, absl::Seconds(1),
                       absl::Minutes(10));
  }
  while (true) {
    absl::StatusOr<int> deleted = SweepRetention();
    if (!deleted.ok()) {
      LogWarning({}, absl::StrCat("retention sweep: ",
                                  deleted.status().message()));
    }
    absl::MutexLock lock(&mu_);
    const absl::Time until = absl::Now() + every;
    while (!stopping_ && absl::Now() < until) {
      retention_wake_.WaitWithDeadline(&mu_, until);
    }
    if (stopping_) return;
  }
}

absl::StatusOr<ArtifactRef> JobManager::GetArtifact(const std::string& tenant,
                                                    const std::string& job_id,
                                                    const std::string& name) {
  ZQ_ASSIGN_OR_RETURN(v1::Job job, GetJob(tenant, job_id));
  if (job.state() != v1::JOB_SUCCEEDED) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job_id, " is ", StateName(job.state()),
                     "; artifacts exist once it has SUCCEEDED"));
  }
  std::vector<std::string> names;
  for (const v1::Artifact& a : job.result().artifacts()) {
    if (a.name() == name) {
      ArtifactRef ref;
      ref.path = blobs_->Path(a.sha256());
      ref.size_bytes = a.size_bytes();
      ref.sha256 = a.sha256();
      return ref;
    }
    names.push_back(a.name());
  }
  return absl::NotFoundError(
      absl::StrCat("job ", job_id, " has no artifact \"", name,
                   "\"; it has: ", absl::StrJoin(names, ", ")));
}

}  // namespace zeroq::server
