// job_manager.h: the service's operations over the control plane's parts:
// the store's queue (job_store.h), this replica's dispatcher (dispatcher.h),
// job events (job_events.h), quotas (quotas.h) and the model registry with
// its inspections (model_registry.h).
//
//   ZQ_ASSIGN_OR_RETURN(auto manager,
//                       JobManager::Create(options, store, blobs, pool));
//   ZQ_RETURN_IF_ERROR(manager->Start());  // recovery, then claiming
//   ZQ_ASSIGN_OR_RETURN(v1::Job job, manager->SubmitJob("default", request));
//   ZQ_ASSIGN_OR_RETURN(auto log, manager->Watch("default", job.id()));
//   manager->Stop(absl::Seconds(10));  // running jobs re-queued
//
// Lifecycle of a job: SubmitJob validates it and stores it QUEUED with its
// first event (durable before SubmitJob returns) -> a replica with a free
// slot of the wanted device kind claims it (priority, then the tenant with
// the fewest running jobs, then age) -> RUNNING on a zeroq-worker process of
// that replica -> SUCCEEDED (artifacts in the blob store), FAILED or
// CANCELLED. Every change is an event, numbered by the store and stored with
// the job before any watcher, on any replica, sees it.
//
// Several replicas may share one store and one data_dir: each works in
// data_dir/replicas/<replica_id>, and a second server with the same replica
// id on the same data_dir is refused at Start. Start re-queues the jobs this
// replica's previous run left RUNNING; jobs of a replica that died are
// re-queued by the others once its leases run out.
//
// Every call takes the caller's tenant: another tenant's ids are NOT_FOUND.
// Thread-safe.
#ifndef ZEROQ_SERVER_JOB_MANAGER_H_
#define ZEROQ_SERVER_JOB_MANAGER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/blob_store.h"
#include "server/device_pool.h"
#include "server/dispatcher.h"
#include "server/event_log.h"
#include "server/job_events.h"
#include "server/job_store.h"
#include "server/launcher.h"
#include "server/metrics.h"
#include "server/model_registry.h"
#include "server/quotas.h"
#include "server/redact.h"
#include "server/tenants.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

struct ManagerOptions {
  std::string data_dir;  // required; this replica works in
                         // data_dir/replicas/<replica_id>
  // This replica's name in the store: the owner of the jobs it runs.
  // Required; unique among the replicas sharing the store.
  std::string replica_id;
  // Whether this replica is the store's only one (SQLite): then whatever
  // partial uploads are in the blob folder at Start are its previous run's
  // and are removed; otherwise only those an hour old are.
  bool single_replica = true;
  // Leases on running jobs (see dispatcher.h) and how often an idle replica
  // looks at the queue.
  absl::Duration lease = absl::Seconds(10);
  absl::Duration claim_poll = absl::Milliseconds(500);
  // How often watched jobs' events are read from the store when no
  // notification came (other replicas' jobs).
  absl::Duration event_poll = absl::Milliseconds(250);
  // Told when the store stops or starts answering (health).
  std::function<void(bool reachable)> on_store_reachable;
  std::string worker_path;      // required; the zeroq-worker executable
  int cpu_threads_per_job = 1;  // intra-op threads when a job sets none
  absl::Duration default_time_limit = absl::Hours(4);
  absl::Duration inspect_time_limit = absl::Minutes(5);
  absl::Duration kill_grace = absl::Seconds(1);  // SIGTERM -> SIGKILL
  // Worker starts per job when its worker crashes (a signal, an exit without
  // a result): retried after 1 s, 2 s, 4 s... (at most 30 s). A failure the
  // job causes deterministically (the worker reports an error) is final.
  int max_attempts = 3;
  // Server crashes or restarts a job may live through (they do not count
  // against max_attempts); past that it fails, so a job that takes the
  // machine down each time still ends.
  int max_server_restarts = 10;
  int max_concurrent_inspections = 2;
  // Finished jobs older than this (since they ended) are deleted in the
  // background, with their artifacts; blobs that no model or job uses are
  // removed too. Zero: keep everything.
  absl::Duration job_retention = absl::ZeroDuration();
  // How often that sweep runs (zero: a quarter of job_retention, between 1 s
  // and 10 min).
  absl::Duration retention_sweep_interval = absl::ZeroDuration();
  // The sweep leaves an unused blob alone until it is this old: an upload's
  // or a job's bytes are stored a moment before the model or job that uses
  // them is recorded.
  absl::Duration orphan_blob_min_age = absl::Hours(1);
  int64_t max_model_bytes = int64_t{2} << 30;
  // Quotas per tenant; nullptr: none. Must outlive the manager.
  const TenantRegistry* tenants = nullptr;
  // nullptr: no metrics. Must outlive the manager.
  Metrics* metrics = nullptr;
};

// Where a finished job's artifact can be read.
struct ArtifactRef {
  std::string path;
  int64_t size_bytes = 0;
  std::string sha256;
};

class JobManager {
 public:
  // The stores must outlive the manager. `launcher`: how workers start
  // (nullptr: zeroq-worker processes).
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(
      ManagerOptions options, JobStore* store, BlobStore* blobs,
      DevicePool pool, std::unique_ptr<Launcher> launcher = nullptr);
  ~JobManager();  // Stop(0) if still running.

  // Recovery, then claiming jobs. REQUIRES: called once.
  absl::Status Start();
  // Stops claiming; running jobs get `grace` to finish, then are stopped
  // and re-queued (another replica, or this one's next start, runs them).
  // Watch logs stay valid.
  void Stop(absl::Duration grace);
  // Whether the store answers (health): while it does not, this replica
  // claims nothing.
  bool store_reachable() const;

  // ---- quotas
  // Before an upload's bytes are received: RESOURCE_EXHAUSTED naming the
  // quota and the limit when the model is over the tenant's model_bytes or
  // would take it over stored_bytes (the message names the tenant's largest
  // models and jobs, which it can delete). Bytes the tenant already holds (as
  // a model or an artifact) store nothing new and pass stored_bytes.
  absl::Status CheckUploadQuota(const std::string& tenant,
                                const v1::ModelMetadata& metadata);

  // ---- models
  // After an upload's bytes are committed to the blob store: the existing
  // model for (tenant, bytes, input shape) with deduplicated set, or a new
  // one, INSPECTING, with its inspection scheduled.
  absl::StatusOr<v1::Model> RegisterModel(const std::string& tenant,
                                          const v1::ModelMetadata& metadata,
                                          const BlobInfo& blob);
  absl::StatusOr<v1::Model> GetModel(const std::string& tenant,
                                     const std::string& id);
  absl::StatusOr<Page<v1::Model>> ListModels(const std::string& tenant,
                                             int page_size,
                                             const std::string& page_token);
  // FAILED_PRECONDITION while it is inspected or a queued/running job uses it.
  absl::Status DeleteModel(const std::string& tenant, const std::string& id);

  // ---- jobs
  absl::StatusOr<v1::Job> SubmitJob(const std::string& tenant,
                                    const v1::SubmitJobRequest& r);
  absl::StatusOr<v1::Job> GetJob(const std::string& tenant,
                                 const std::string& id);
  absl::StatusOr<Page<v1::Job>> ListJobs(const std::string& tenant,
                                         v1::JobState state,
                                         const std::string& model_id,
                                         int page_size,
                                         const std::string& page_token);
  // Removes a finished job with its events and the artifacts nothing else
  // uses; returns by how much the tenant's stored bytes went down.
  // FAILED_PRECONDITION while it is queued or running or a queued or running
  // re-plan reads it.
  absl::StatusOr<int64_t> DeleteJob(const std::string& tenant,
                                    const std::string& id);
  // One pass of the retention sweep (what the background thread runs every
  // retention_sweep_interval when job_retention is set); returns the jobs
  // deleted.
  absl::StatusOr<int> SweepRetention();
  // A queued job is CANCELLED at once; a running one is stopped and becomes
  // CANCELLED when its worker has exited (within kill_grace and a moment);
  // a finished job is returned unchanged.
  absl::StatusOr<v1::Job> CancelJob(const std::string& tenant,
                                    const std::string& id);
  // The job's event history, live while it runs.
  absl::StatusOr<std::shared_ptr<EventLog>> Watch(const std::string& tenant,
                                                  const std::string& id);
  // FAILED_PRECONDITION unless the job SUCCEEDED; NOT_FOUND for an unknown
  // artifact name (the message lists the job's artifacts).
  absl::StatusOr<ArtifactRef> GetArtifact(const std::string& tenant,
                                          const std::string& job_id,
                                          const std::string& name);

  const ManagerOptions& options() const { return options_; }
  BlobStore* blobs() { return blobs_; }

 private:
  class Listener;

  JobManager(ManagerOptions options, JobStore* store, BlobStore* blobs,
             DevicePool pool, std::unique_ptr<Launcher> launcher);

  std::string ReplicaDir() const;
  // Whether the tenant has a queued or running job with this request id.
  absl::StatusOr<bool> IsRetry(const std::string& tenant,
                               const std::string& request_id);
  // Deletes the stored job and the blobs only it used; the caller checked
  // that it is finished.
  absl::Status DeleteFinishedJob(const v1::Job& job, const std::string& reason);
  void RetentionLoop();

  const ManagerOptions options_;
  // What tenants read of errors, events and model reasons: no server paths.
  const Redactor redactor_;
  JobStore* const store_;
  BlobStore* const blobs_;
  std::unique_ptr<Launcher> launcher_;
  // Declared in the order they are built; destroyed in reverse, so the
  // dispatcher and the registry (which append events and use quotas) go
  // first.
  JobEvents events_;
  TenantQuotas quotas_;
  ModelRegistry registry_;
  Dispatcher dispatcher_;
  std::unique_ptr<Listener> listener_;

  mutable absl::Mutex mu_;
  absl::CondVar retention_wake_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int replica_lock_fd_ = -1;  // flock on the replica's folder
  std::thread retention_;     // only with job_retention
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_JOB_MANAGER_H_
