#include "server/job_manager.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "core/pareto.h"
#include "server/log.h"
#include "server/records.h"
#include "server/validation.h"

namespace zeroq::server {

namespace fs = std::filesystem;

// Hands the store's notifications to the parts that act on them; detached
// (and then inert) before the manager goes.
class JobManager::Listener : public StoreListener {
 public:
  explicit Listener(JobManager* manager) : manager_(manager) {}
  void OnJobEvents(const std::string& job_id) override {
    manager_->events_.Changed(job_id);
  }
  void OnJobQueued() override { manager_->dispatcher_.Wake(); }
  void OnCancelRequested(const std::string& job_id) override {
    manager_->dispatcher_.Cancel(job_id);
  }
  void OnListening(bool listening) override {
    if (listening) {
      LogInfo({}, "listening to the job store's notifications");
    } else {
      LogWarning({}, "the job store's notifications stopped; polling until "
                     "they are back");
    }
  }

 private:
  JobManager* const manager_;
};

namespace {

DispatcherOptions DispatcherOptionsOf(const ManagerOptions& o,
                                      const Redactor* redactor,
                                      TenantQuotas* quotas) {
  DispatcherOptions d;
  d.replica_id = o.replica_id;
  d.work_dir =
      (fs::path(o.data_dir) / "replicas" / o.replica_id / "jobs").string();
  d.worker_path = o.worker_path;
  d.cpu_threads_per_job = o.cpu_threads_per_job;
  d.default_time_limit = o.default_time_limit;
  d.kill_grace = o.kill_grace;
  d.max_attempts = o.max_attempts;
  d.max_server_restarts = o.max_server_restarts;
  d.lease = o.lease;
  d.claim_poll = o.claim_poll;
  d.running_limit = [quotas](const std::string& tenant) {
    return quotas->RunningLimit(tenant);
  };
  d.on_store_reachable = o.on_store_reachable;
  d.metrics = o.metrics;
  d.redactor = redactor;
  return d;
}

RegistryOptions RegistryOptionsOf(const ManagerOptions& o,
                                  const Redactor* redactor) {
  RegistryOptions r;
  r.work_dir =
      (fs::path(o.data_dir) / "replicas" / o.replica_id / "inspect").string();
  r.worker_path = o.worker_path;
  r.inspect_time_limit = o.inspect_time_limit;
  r.kill_grace = o.kill_grace;
  r.max_concurrent_inspections = o.max_concurrent_inspections;
  r.metrics = o.metrics;
  r.redactor = redactor;
  return r;
}

// A replica id names a folder: keep it to a safe alphabet.
bool ValidReplicaId(const std::string& id) {
  if (id.empty() || id.size() > 128 || id[0] == '.') return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.';
  });
}

}  // namespace

JobManager::JobManager(ManagerOptions options, JobStore* store,
                       BlobStore* blobs, DevicePool pool,
                       std::unique_ptr<Launcher> launcher)
    : options_(std::move(options)),
      redactor_({options_.data_dir,
                 fs::path(options_.worker_path).parent_path().string()}),
      store_(store),
      blobs_(blobs),
      launcher_(launcher ? std::move(launcher) : NewProcessLauncher()),
      events_(store, options_.event_poll),
      quotas_(options_.tenants, store, blobs, options_.metrics),
      registry_(RegistryOptionsOf(options_, &redactor_), store, blobs,
                &quotas_, launcher_.get()),
      dispatcher_(DispatcherOptionsOf(options_, &redactor_, &quotas_), store,
                  blobs, std::move(pool), launcher_.get(), &events_,
                  &quotas_),
      listener_(std::make_unique<Listener>(this)) {}

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(
    ManagerOptions options, JobStore* store, BlobStore* blobs, DevicePool pool,
    std::unique_ptr<Launcher> launcher) {
  if (options.data_dir.empty())
    return absl::InvalidArgumentError("ManagerOptions.data_dir is required");
  if (!ValidReplicaId(options.replica_id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "replica id \"", options.replica_id,
        "\": use 1 to 128 letters, digits, '-', '_' or '.', not starting with "
        "'.'"));
  }
  if (launcher == nullptr && (options.worker_path.empty() ||
                              access(options.worker_path.c_str(), X_OK) != 0)) {
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
  if (options.lease < absl::Seconds(1))
    return absl::InvalidArgumentError("the lease must be at least 1s");
  return std::unique_ptr<JobManager>(new JobManager(
      std::move(options), store, blobs, std::move(pool), std::move(launcher)));
}

JobManager::~JobManager() {
  Stop(absl::ZeroDuration());
  if (replica_lock_fd_ >= 0) close(replica_lock_fd_);
}

std::string JobManager::ReplicaDir() const {
  return (fs::path(options_.data_dir) / "replicas" / options_.replica_id)
      .string();
}

bool JobManager::store_reachable() const {
  return dispatcher_.store_reachable();
}

// ---------------------------------------------------------------- start/stop

absl::Status JobManager::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_)
      return absl::FailedPreconditionError("JobManager::Start called twice");
    started_ = true;
  }
  const std::string dir = ReplicaDir();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("creating ", dir, ": ", ec.message()));
  }
  // One server per replica folder: a second one would remove the first's
  // running jobs' folders below.
  const std::string lock_path = dir + "/lock";
  replica_lock_fd_ = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (replica_lock_fd_ < 0 || flock(replica_lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "another zeroq-server runs as replica \"", options_.replica_id,
        "\" on ", options_.data_dir,
        "; give each server on a shared data_dir its own --replica_id"));
  }
  // What is in the replica's folders is its previous run's unfinished work:
  // artifacts are only ever read from the blob store.
  for (const char* sub : {"jobs", "inspect"}) {
    fs::remove_all(fs::path(dir) / sub, ec);
    fs::create_directories(fs::path(dir) / sub, ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("creating ", dir, "/", sub, ": ", ec.message()));
    }
  }
  // Partial uploads: with other replicas on the folder, only those too old
  // to be anyone's upload in progress.
  ZQ_ASSIGN_OR_RETURN(int temporaries,
                      blobs_->RemoveTemporaries(options_.single_replica
                                                    ? absl::ZeroDuration()
                                                    : absl::Hours(1)));
  if (temporaries > 0)
    LogInfo({}, absl::StrCat("removed ", temporaries, " partial uploads"));
  ZQ_RETURN_IF_ERROR(quotas_.RefreshAll());
  ZQ_RETURN_IF_ERROR(registry_.Start());
  ZQ_RETURN_IF_ERROR(store_->Listen(listener_.get()));
  ZQ_RETURN_IF_ERROR(dispatcher_.Start());
  if (options_.job_retention > absl::ZeroDuration())
    retention_ = std::thread([this] { RetentionLoop(); });
  return absl::OkStatus();
}

void JobManager::Stop(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (!started_ || stopping_) return;
    stopping_ = true;
    retention_wake_.SignalAll();
  }
  if (retention_.joinable()) retention_.join();
  dispatcher_.Stop(grace);
  registry_.Stop();
  (void)store_->Listen(nullptr);
}

// ---------------------------------------------------------------- models

absl::Status JobManager::CheckUploadQuota(const std::string& tenant,
                                          const v1::ModelMetadata& metadata) {
  return quotas_.CheckUpload(tenant, metadata);
}

absl::StatusOr<v1::Model> JobManager::RegisterModel(
    const std::string& tenant, const v1::ModelMetadata& metadata,
    const BlobInfo& blob) {
  return registry_.Register(tenant, metadata, blob);
}

absl::StatusOr<v1::Model> JobManager::GetModel(const std::string& tenant,
                                               const std::string& id) {
  return registry_.Get(tenant, id);
}

absl::StatusOr<Page<v1::Model>> JobManager::ListModels(
    const std::string& tenant, int page_size, const std::string& page_token) {
  return registry_.List(tenant, page_size, page_token);
}

absl::Status JobManager::DeleteModel(const std::string& tenant,
                                     const std::string& id) {
  return registry_.Delete(tenant, id);
}

// ---------------------------------------------------------------- jobs

absl::StatusOr<bool> JobManager::IsRetry(const std::string& tenant,
                                         const std::string& request_id) {
  if (request_id.empty()) return false;
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> active,
                      store_->JobsInStates({v1::JOB_QUEUED, v1::JOB_RUNNING}));
  return std::any_of(active.begin(), active.end(), [&](const v1::Job& j) {
    return j.tenant() == tenant && j.request_id() == request_id;
  });
}

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

  {
    absl::MutexLock lock(&mu_);
    if (stopping_)
      return absl::UnavailableError(
          "the server is shutting down; submit again later");
  }
  // With other replicas on the store, one of them may have the device:
  // the job waits for it. Alone, this server never could run it.
  if (options_.single_replica && !dispatcher_.Has(r.device())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device: this server has no ", v1::DeviceKind_Name(r.device()),
        " devices (it has ", dispatcher_.DescribeDevices(), ")"));
  }
  absl::Status stored_bytes = quotas_.CheckSubmit(tenant);
  if (!stored_bytes.ok()) {
    // A retry of an accepted request is not a new job: let it through.
    ZQ_ASSIGN_OR_RETURN(bool retry, IsRetry(tenant, r.request_id()));
    if (!retry) return stored_bytes;
  }
  ZQ_ASSIGN_OR_RETURN(
      CreateJobResult created,
      store_->CreateJob(job, {StateEvent(job, "queued")},
                        quotas_.QueuedLimit(tenant)));
  if (created.over_queued_limit)
    return quotas_.QueuedLimitError(tenant, created.queued);
  if (!created.created) return created.job;
  LogInfo({tenant, job.id(), job.model_id()},
          absl::StrCat("submitted (priority ", job.priority(), ")"));
  if (options_.metrics) options_.metrics->JobSubmitted(tenant);
  dispatcher_.RefreshQueueDepth();
  dispatcher_.Wake();
  return created.job;
}

absl::StatusOr<v1::Job> JobManager::GetJob(const std::string& tenant,
                                           const std::string& id) {
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
  ZQ_ASSIGN_OR_RETURN(v1::Job job, GetJob(tenant, id));
  if (IsTerminal(job.state())) return job;
  bool stop_worker = false;
  ZQ_ASSIGN_OR_RETURN(
      JobWrite written,
      store_->EditJob(id, nullptr, [&](JobChange& c) {
        v1::Job& j = c.job;
        if (j.state() == v1::JOB_QUEUED) {
          FinishJob(j, v1::JOB_CANCELLED,
                    absl::CancelledError(
                        "cancelled by the client before it started"),
                    &c.events);
        } else if (j.state() == v1::JOB_RUNNING && !j.cancel_requested()) {
          // The replica running it stops its worker: told by the store at
          // once, or at its next lease renewal at the latest.
          j.set_cancel_requested(true);
          v1::JobEvent e;
          e.set_type(v1::EVENT_MESSAGE);
          e.set_stage(j.stage());
          e.set_message("cancellation requested; stopping the worker");
          SetNow(e.mutable_time());
          c.events.push_back(std::move(e));
          stop_worker = true;
        }
        return absl::OkStatus();
      }));
  events_.Stored(id, written.events);
  if (written.job.state() == v1::JOB_CANCELLED && job.state() == v1::JOB_QUEUED) {
    LogInfo({tenant, id, job.model_id()}, "cancelled before it started");
    if (options_.metrics) options_.metrics->JobFinished("cancelled", 0);
    dispatcher_.RefreshQueueDepth();
  }
  if (stop_worker) dispatcher_.Cancel(id);
  return written.job;
}

absl::StatusOr<std::shared_ptr<EventLog>> JobManager::Watch(
    const std::string& tenant, const std::string& id) {
  ZQ_RETURN_IF_ERROR(GetJob(tenant, id).status());
  return events_.Watch(id);
}

absl::StatusOr<int64_t> JobManager::DeleteJob(const std::string& tenant,
                                              const std::string& id) {
  ZQ_ASSIGN_OR_RETURN(v1::Job job, GetJob(tenant, id));
  if (!IsTerminal(job.state())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", id, " is ", StateName(job.state()),
        "; cancel it first (CancelJob), then delete it"));
  }
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> active,
                      store_->JobsInStates({v1::JOB_QUEUED, v1::JOB_RUNNING}));
  for (const v1::Job& other : active) {
    if (other.config().sensitivity_from_job() == id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", other.id(), " (", StateName(other.state()),
          ") re-plans from job ", id,
          "; delete it once that job has finished"));
    }
  }
  const int64_t before = quotas_.RefreshStoredBytes(tenant);
  ZQ_RETURN_IF_ERROR(DeleteFinishedJob(job, "request"));
  return std::max<int64_t>(0, before - quotas_.RefreshStoredBytes(tenant));
}

absl::Status JobManager::DeleteFinishedJob(const v1::Job& job,
                                           const std::string& reason) {
  ZQ_RETURN_IF_ERROR(store_->DeleteJob(job.id()));
  LogInfo({job.tenant(), job.id(), job.model_id()},
          absl::StrCat("deleted (", reason, ")"));
  if (options_.metrics) options_.metrics->JobDeleted(reason);
  absl::Status status;
  for (const v1::Artifact& a : job.result().artifacts()) {
    status.Update(quotas_.RemoveBlobIfUnused(a.sha256()));
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
    // In batches, so that no one call is long.
    ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> old,
                        store_->JobsEndedBefore(cutoff, 100));
    if (old.empty()) break;
    for (const v1::Job& job : old) {
      absl::Status s = DeleteFinishedJob(job, "retention");
      // Another replica's sweep may have taken it first.
      if (!s.ok() && s.code() != absl::StatusCode::kNotFound) return s;
      tenants.insert(job.tenant());
      if (s.ok()) ++deleted;
    }
  }
  // Blobs nothing refers to: left by a crash between storing bytes and
  // recording their model or job. Recent ones may be about to be recorded.
  const absl::Time old_enough = absl::Now() - options_.orphan_blob_min_age;
  for (const BlobEntry& blob : blobs_->List()) {
    if (blob.modified > old_enough) continue;
    ZQ_RETURN_IF_ERROR(quotas_.RemoveBlobIfUnused(blob.sha256));
  }
  for (const std::string& tenant : tenants) quotas_.RefreshStoredBytes(tenant);
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
