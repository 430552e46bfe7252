// dispatcher.h: runs this replica's share of the queue: claims jobs from the
// store when a device slot is free, starts their workers through a Launcher,
// stores their progress and results under the claim's fence, and keeps the
// claims' leases.
//
//   Dispatcher dispatcher(options, store, blobs, std::move(pool), launcher,
//                         events, quotas);
//   ZQ_RETURN_IF_ERROR(dispatcher.Start());  // re-queues what a previous run
//                                            // of this replica left running
//   dispatcher.Wake();                       // a job was queued
//   dispatcher.Cancel(job_id);               // CancelJob marked it
//   dispatcher.Stop(absl::Seconds(10));      // running jobs: grace, then
//                                            // stopped and re-queued
//
// The queue is the store's (JobStore::ClaimJob): every replica on one store
// claims from it, so this class keeps no queue. A claim makes a new attempt
// and every write of that attempt's progress or result carries it as its
// fence: when another replica has taken the job over, the write is refused,
// and the worker here is stopped.
//
// Leases: every lease/10 the replica renews the leases of the jobs it runs
// (one statement). A job missing from the renewal was taken over: its
// worker is stopped and nothing more of it is written. When renewals fail
// (the database is gone), workers that have gone 7/10 of the lease without
// one are stopped, so that no job ever has two live workers: another replica
// may re-queue it once the lease has run out. Each round also re-queues
// other replicas' jobs whose leases have run out.
//
// Progress that cannot be stored (the database is briefly away) is kept in
// order and stored by a later round, so nothing is lost while the lease
// lasts. Thread-safe.
#ifndef ZEROQ_SERVER_DISPATCHER_H_
#define ZEROQ_SERVER_DISPATCHER_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/blob_store.h"
#include "server/device_pool.h"
#include "server/job_events.h"
#include "server/job_store.h"
#include "server/launcher.h"
#include "server/metrics.h"
#include "server/quotas.h"
#include "server/redact.h"

namespace zeroq::server {

struct DispatcherOptions {
  std::string replica_id;   // required: the owner named in the store
  std::string work_dir;     // required: job folders go in work_dir/<job id>
  std::string worker_path;  // the zeroq-worker executable
  int cpu_threads_per_job = 1;  // intra-op threads when a job sets none
  absl::Duration default_time_limit = absl::Hours(4);
  absl::Duration kill_grace = absl::Seconds(1);  // SIGTERM -> SIGKILL
  // Worker starts per job when its worker crashes; retried after 1 s, 2 s,
  // 4 s... (at most 30 s). A failure the job causes itself is final.
  int max_attempts = 3;
  // Server restarts or lost replicas a job may live through.
  int max_server_restarts = 10;
  absl::Duration lease = absl::Seconds(10);
  // How often an idle replica looks at the queue when no notification says
  // that a job was queued.
  absl::Duration claim_poll = absl::Milliseconds(500);
  // A tenant's running-jobs limit (0: none); empty: no limits.
  std::function<int(const std::string& tenant)> running_limit;
  // Told when the store stops or starts answering (health).
  std::function<void(bool reachable)> on_store_reachable;
  Metrics* metrics = nullptr;           // may be nullptr
  const Redactor* redactor = nullptr;   // required
};

class Dispatcher {
 public:
  // Everything passed must outlive the dispatcher; quotas may be nullptr.
  Dispatcher(DispatcherOptions options, JobStore* store, BlobStore* blobs,
             DevicePool pool, Launcher* launcher, JobEvents* events,
             TenantQuotas* quotas);
  ~Dispatcher();  // Stop(0)

  // Re-queues (or ends) the jobs this replica's previous run left RUNNING,
  // then starts claiming and keeping leases. REQUIRES: called once.
  absl::Status Start();
  // Stops claiming; running jobs get `grace` to finish, then are stopped and
  // re-queued (attempts not counted). Returns when their workers have exited.
  void Stop(absl::Duration grace);

  // Look at the queue now (a job was queued).
  void Wake();
  // The job was marked cancelled in the store: stop its worker if it runs
  // here (it ends CANCELLED when the worker has exited).
  void Cancel(const std::string& job_id);
  // One lease round at once: renew, act on lost leases and cancels, store
  // what is pending, re-queue jobs whose leases ran out.
  void LeaseRound();
  // Sets the queue depth gauge (jobs QUEUED in the store: every replica's).
  void RefreshQueueDepth();

  bool Has(v1::DeviceKind kind) const;
  std::string DescribeDevices() const;
  bool store_reachable() const;
  // Jobs with a claim held here (running, or their end not yet stored).
  int running() const;

 private:
  struct Run;

  void ClaimLoop();
  void LeaseLoop();
  // Claims and starts jobs while slots are free.
  void ClaimWhileFree();
  void StartRun(const std::shared_ptr<Run>& run, const v1::Job& job);
  void OnWorkerEvent(const std::shared_ptr<Run>& run, const v1::JobEvent& e);
  void OnWorkerExit(const std::shared_ptr<Run>& run, WorkerOutcome outcome);
  // Stores the run's pending progress; false while it cannot.
  bool Flush(Run& run) ABSL_EXCLUSIVE_LOCKS_REQUIRED(run.write_mu);
  // Stores the run's end (after its progress) and lets go of it.
  void Finish(const std::shared_ptr<Run>& run);
  // Ends the run's job at once (it never got a worker).
  void Fail(const std::shared_ptr<Run>& run, const absl::Status& status);
  absl::Status ApplyOutcome(const Run& run, const WorkerOutcome& outcome,
                            JobChange& change);
  // Frees the run's slot and forgets it.
  void Release(const std::shared_ptr<Run>& run);
  // The claim was lost: stop the worker, write nothing more.
  void LoseLease(Run& run, const std::string& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Re-queues (or ends) a job whose replica went away.
  absl::Status Reclaim(JobChange& change, bool own_restart) const;
  void SetReachable(bool reachable);
  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string JobDir(const std::string& job_id) const;

  const DispatcherOptions options_;
  JobStore* const store_;
  BlobStore* const blobs_;
  Launcher* const launcher_;
  JobEvents* const events_;
  TenantQuotas* const quotas_;

  mutable absl::Mutex mu_;
  DevicePool pool_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<Run>> runs_
      ABSL_GUARDED_BY(mu_);
  // Handles of exited workers, destroyed by the claim thread (never inside
  // their own callbacks).
  std::vector<std::unique_ptr<WorkerHandle>> finished_ ABSL_GUARDED_BY(mu_);
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  int claiming_ ABSL_GUARDED_BY(mu_) = 0;  // claims between store and runs_
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool leases_stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool reachable_ ABSL_GUARDED_BY(mu_) = true;
  std::thread claimer_;
  std::thread leaser_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_DISPATCHER_H_
