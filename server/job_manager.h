// job_manager.h: the service's state: models and their inspection, the job
// queue and scheduler, the device pool, running workers and job events.
//
//   ZQ_ASSIGN_OR_RETURN(auto manager, JobManager::Create(options, store, blobs,
//   pool)); ZQ_RETURN_IF_ERROR(manager->Start());        // recovery, then
//   scheduling ZQ_ASSIGN_OR_RETURN(v1::Job job, manager->SubmitJob("default",
//   request)); ZQ_ASSIGN_OR_RETURN(auto log, manager->Watch("default",
//   job.id())); manager->Stop(absl::Seconds(10));            // running jobs
//   re-queued
//
// Lifecycle of a job: SubmitJob validates and stores it QUEUED (it is durable
// before SubmitJob returns) -> the scheduler picks it (priority, then the
// tenant with the fewest running jobs, then age) when a slot of the wanted
// device kind is free -> RUNNING on a zeroq-worker process -> SUCCEEDED
// (artifacts moved into the blob store), FAILED or CANCELLED. Every change is
// an event with the next sequence number, stored with the job before
// watchers see it.
//
// Restart: Start() re-queues jobs that were RUNNING when the previous server
// died (the attempt count grows with every worker start; FAILED after
// max_attempts), restarts inspections that never finished, and removes
// partial uploads and job folders.
//
// Every call takes the caller's tenant: another tenant's ids are NOT_FOUND.
// Thread-safe.
#ifndef ZEROQ_SERVER_JOB_MANAGER_H_
#define ZEROQ_SERVER_JOB_MANAGER_H_

#include <cstdint>
#include <deque>
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
#include "server/event_log.h"
#include "server/job_store.h"
#include "server/metrics.h"
#include "server/redact.h"
#include "server/tenants.h"
#include "server/worker_supervisor.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

struct ManagerOptions {
  std::string data_dir;         // required; job folders go in data_dir/jobs
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
  // The stores must outlive the manager.
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(
      ManagerOptions options, JobStore* store, BlobStore* blobs,
      DevicePool pool);
  ~JobManager();  // Stop(0) if still running.

  // Recovery, then the scheduler thread. REQUIRES: called once.
  absl::Status Start();
  // Stops scheduling; running jobs get `grace` to finish, then are stopped
  // and re-queued (they run again at the next Start). Watch logs stay valid.
  void Stop(absl::Duration grace);

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
  struct JobRuntime;
  struct Inspection;

  JobManager(ManagerOptions options, JobStore* store, BlobStore* blobs,
             DevicePool pool);

  void SchedulerLoop();
  // Picks and starts at most one queued job; false when nothing could start.
  bool DispatchOneLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartJobLocked(const std::shared_ptr<JobRuntime>& rt, Slot slot)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnWorkerEvent(const std::string& job_id, const v1::JobEvent& event);
  void OnWorkerExit(const std::string& job_id, WorkerOutcome outcome);
  // Stores the job with `events` (numbered here) and shows them to watchers.
  void AppendLocked(JobRuntime& rt, std::vector<v1::JobEvent> events,
                    bool terminal) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishLocked(const std::shared_ptr<JobRuntime>& rt, v1::JobState state,
                    absl::Status error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveFromQueueLocked(const std::shared_ptr<JobRuntime>& rt)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EnqueueLocked(std::shared_ptr<JobRuntime> rt)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void MaybeStartInspectionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnInspectionExit(const std::string& model_id, WorkerOutcome outcome);

  absl::StatusOr<v1::RunRequest> BuildRunRequest(const v1::Job& job,
                                                 const Slot& slot);
  std::string JobDir(const std::string& job_id) const;
  const Quotas* QuotasOf(const std::string& tenant) const;
  // Whether the tenant has a queued or running job with this request id.
  bool IsRetryLocked(const std::string& tenant, const std::string& request_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Re-reads the tenant's stored bytes into the gauge; returns them.
  int64_t RefreshStoredBytesLocked(const std::string& tenant)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The largest models and jobs of the tenant, for a quota message.
  std::string LargestHoldingsLocked(const std::string& tenant)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Deletes the stored job and the blobs only it used; the caller checked
  // that it is finished.
  absl::Status DeleteJobLocked(const v1::Job& job, const std::string& reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes the blob if no model or artifact refers to it any more.
  absl::Status RemoveBlobIfUnusedLocked(const std::string& sha256)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RetentionLoop();
  // Queue depth and per-device gauges.
  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ManagerOptions options_;
  // Wakes the watchers of every job's log, outside mu_. Declared early: it
  // is destroyed after everything that appends.
  EventFanOut fan_out_;
  // What tenants read of errors, events and model reasons: no server paths.
  const Redactor redactor_;
  JobStore* const store_;
  BlobStore* const blobs_;

  absl::Mutex mu_;
  absl::CondVar wake_scheduler_;
  absl::CondVar retention_wake_;
  DevicePool pool_ ABSL_GUARDED_BY(mu_);
  // QUEUED and RUNNING jobs.
  absl::flat_hash_map<std::string, std::shared_ptr<JobRuntime>> active_
      ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<JobRuntime>> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int> running_per_tenant_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int> queued_per_tenant_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> pending_inspections_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<WorkerProcess>> inspections_
      ABSL_GUARDED_BY(mu_);
  // Workers whose on_exit ran; joined by the scheduler thread.
  std::vector<std::unique_ptr<WorkerProcess>> finished_workers_
      ABSL_GUARDED_BY(mu_);
  int64_t next_queue_order_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread scheduler_;
  std::thread retention_;  // only with job_retention
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_JOB_MANAGER_H_
