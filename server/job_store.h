// job_store.h: durable records of models, jobs and job events.
//
// Records are the API's own messages (zeroq.v1.Model, Job, JobEvent), stored
// whole, with the fields the server queries by (tenant, state, model, request
// id, creation order) kept beside them as columns.
//
//   ZQ_ASSIGN_OR_RETURN(auto store,
//   SqliteJobStore::Open("/var/lib/zeroq/zeroq.db"));
//   ZQ_ASSIGN_OR_RETURN(CreateJobResult r, store->CreateJob(job));
//   if (!r.created) { /* a retry: r.job is the first call's job */ }
//   ZQ_RETURN_IF_ERROR(store->UpdateJob(job, {event1, event2}));
//
// Every write is durable when it returns (a transaction). Thread-safe: calls
// from many threads are serialised inside. A store only keeps what it is
// given; ids and state rules are the caller's, and so are event sequence
// numbers for UpdateJob (CreateJob and the queue methods number events
// themselves, under the row's lock).
#ifndef ZEROQ_SERVER_JOB_STORE_H_
#define ZEROQ_SERVER_JOB_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

namespace v1 = ::zeroq::v1;

template <typename T>
struct Page {
  std::vector<T> items;
  std::string next_page_token;  // empty on the last page
};

struct CreateJobResult {
  v1::Job job;
  bool created = false;  // false: (tenant, request_id) existed; job is that one
  // Not created because the tenant already had `queued` QUEUED jobs, at
  // least CreateJob's max_queued (an existing request id wins over this).
  bool over_queued_limit = false;
  int64_t queued = 0;
};

// ---- the queue, shared by every replica on one store (see JobStore below)

// Who may write a RUNNING job: the replica that claimed it, for the attempt
// it claimed (the job's `attempts` after the claim). A fencing token: a
// claim always makes a new attempt, so a replica that lost its lease cannot
// write over its successor's work.
struct Fence {
  std::string owner;
  int32_t attempt = 0;
};

// A change to one job, made inside a store transaction.
struct JobChange {
  v1::Job job;  // the stored record: edit it
  // Appended with the record; the store numbers them after job.last_seq
  // (and sets job.last_seq), so replicas never race for a seq.
  std::vector<v1::JobEvent> events;
  // For a job the change leaves QUEUED: not claimed before this (a retry's
  // backoff). The default: at once.
  absl::Time not_before = absl::InfinitePast();
  std::string owner;  // read only: the replica holding it ("" when none)
};

// Edits `change` (or leaves it alone, and appends nothing). A non-OK status
// rolls the transaction back and is returned by the store call.
using JobEdit = std::function<absl::Status(JobChange& change)>;

// A stored change: the record as written and its events with their seqs.
struct JobWrite {
  v1::Job job;
  std::vector<v1::JobEvent> events;
};

struct ClaimOptions {
  std::string owner;  // the claiming replica (its --replica_id)
  absl::Duration lease = absl::Seconds(10);
  // The device preferences this replica can place now (DEVICE_ANY: a job
  // that takes any device). Jobs asking for others are left to other
  // replicas.
  std::vector<v1::DeviceKind> devices;
  // A tenant's running-jobs limit (<= 0: none); counted over every replica
  // inside the claim's transaction. May be empty: no limits.
  std::function<int(const std::string& tenant)> running_limit;
};

// A RUNNING job a replica holds, as RenewLeases returns it.
struct LeaseInfo {
  std::string job_id;
  int32_t attempt = 0;
  bool cancel_requested = false;
};

// What the store tells replicas that listen (PostgreSQL: LISTEN/NOTIFY;
// SQLite has one replica and tells nothing). Called on the store's own
// thread; must not block.
class StoreListener {
 public:
  virtual ~StoreListener() = default;
  // New events were appended to the job (by any replica).
  virtual void OnJobEvents(const std::string& job_id) = 0;
  // A job became QUEUED (submitted, retried, re-queued).
  virtual void OnJobQueued() = 0;
  // CancelJob marked a RUNNING job.
  virtual void OnCancelRequested(const std::string& job_id) = 0;
  // The notification connection broke (some may be lost) or came back.
  virtual void OnListening(bool listening) = 0;
};

// What a tenant's stored bytes are made of, largest first: a model's upload
// or a succeeded job's artifacts.
struct Holding {
  std::string owner;  // a model id or a job id
  bool is_model = false;
  int64_t bytes = 0;
};

struct JobFilter {
  std::string tenant;                              // required
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;  // unspecified: any
  std::string model_id;                            // empty: any
};

class JobStore {
 public:
  virtual ~JobStore() = default;

  // ---- models
  // Inserts, or replaces the record with the same id.
  virtual absl::Status PutModel(const v1::Model& model) = 0;
  // NOT_FOUND when there is no such id.
  virtual absl::StatusOr<v1::Model> GetModel(const std::string& id) = 0;
  // Newest first. INVALID_ARGUMENT for a malformed page token.
  virtual absl::StatusOr<Page<v1::Model>> ListModels(
      const std::string& tenant, int page_size,
      const std::string& page_token) = 0;
  // Every tenant's models in `state`, oldest first (recovery at start).
  virtual absl::StatusOr<std::vector<v1::Model>> ModelsInState(
      v1::ModelState state) = 0;
  // NOT_FOUND when absent.
  virtual absl::Status DeleteModel(const std::string& id) = 0;

  // ---- stored bytes
  // The store keeps, beside the records, which blobs each model (its upload)
  // and each succeeded job (its artifacts) refers to, so that these need no
  // scan of the records.
  // How many models and artifacts (any tenant) refer to this blob.
  virtual absl::StatusOr<int64_t> CountBlobRefs(const std::string& sha256) = 0;
  // The bytes of the distinct blobs the tenant's models and artifacts refer
  // to: what it really stores (one blob referred to twice counts once).
  virtual absl::StatusOr<int64_t> StoredBytes(const std::string& tenant) = 0;
  // StoredBytes of every tenant that holds anything.
  virtual absl::StatusOr<std::vector<std::pair<std::string, int64_t>>>
  StoredBytesByTenant() = 0;
  // Whether one of the tenant's models or artifacts already is this blob.
  virtual absl::StatusOr<bool> TenantHoldsBlob(const std::string& tenant,
                                               const std::string& sha256) = 0;
  // The tenant's `limit` largest models and jobs, by the bytes they refer to.
  virtual absl::StatusOr<std::vector<Holding>> LargestHoldings(
      const std::string& tenant, int limit) = 0;

  // ---- jobs
  // Inserts a new job with its first `events` (numbered 1, 2, ... by the
  // store), unless job.request_id is not empty and the tenant already has a
  // job with that request id: then returns that one. With max_queued > 0 a
  // tenant with that many QUEUED jobs gets over_queued_limit instead (counted
  // in the same transaction, over every replica).
  virtual absl::StatusOr<CreateJobResult> CreateJob(
      const v1::Job& job, const std::vector<v1::JobEvent>& events = {},
      int max_queued = 0) = 0;
  // Replaces the job record (by id) and appends `events` in one transaction.
  // NOT_FOUND for an unknown id; ALREADY_EXISTS for an event seq the job has.
  virtual absl::Status UpdateJob(
      const v1::Job& job, const std::vector<v1::JobEvent>& events = {}) = 0;
  virtual absl::StatusOr<v1::Job> GetJob(const std::string& id) = 0;
  // Newest first.
  virtual absl::StatusOr<Page<v1::Job>> ListJobs(
      const JobFilter& filter, int page_size,
      const std::string& page_token) = 0;
  // Every tenant's jobs in any of `states`, oldest first (recovery at start).
  virtual absl::StatusOr<std::vector<v1::Job>> JobsInStates(
      const std::vector<v1::JobState>& states) = 0;
  // Removes the job with its events and blob references. NOT_FOUND when
  // absent. The blobs themselves are the caller's (see CountBlobRefs).
  virtual absl::Status DeleteJob(const std::string& id) = 0;
  // Jobs (any tenant) that reached SUCCEEDED, FAILED or CANCELLED before
  // `unix_seconds`, oldest end first, at most `limit`.
  virtual absl::StatusOr<std::vector<v1::Job>> JobsEndedBefore(
      int64_t unix_seconds, int limit) = 0;
  // Jobs of the model that are QUEUED or RUNNING.
  virtual absl::StatusOr<int64_t> CountActiveJobsForModel(
      const std::string& model_id) = 0;
  // Jobs in `state` (any tenant; all states: UNSPECIFIED).
  virtual absl::StatusOr<int64_t> CountJobs(v1::JobState state) = 0;

  // ---- the queue and its leases
  // Claims the next QUEUED job this replica can place, in this order:
  // highest priority; then the tenant with the fewest RUNNING jobs (over
  // every replica); then the oldest (creation order, which a retried job
  // keeps). Skipped: jobs whose not_before has not come, whose device
  // preference is not in options.devices, whose tenant is at its running
  // limit, and jobs another replica is claiming at this moment (FOR UPDATE
  // SKIP LOCKED: replicas never wait for each other). In the same
  // transaction `start` edits the job (it must leave it RUNNING with
  // attempts grown by one) and the store records options.owner with a lease
  // of options.lease from now. nullopt: nothing to claim.
  virtual absl::StatusOr<std::optional<JobWrite>> ClaimJob(
      const ClaimOptions& options, const JobEdit& start) = 0;
  // Reads the job under a row lock, applies `edit`, writes it back with the
  // change's events, in one transaction. With `fence`: ABORTED ("the lease
  // on job ... was lost") unless the job is RUNNING, held by fence->owner at
  // attempt fence->attempt. A change that leaves the job anything but
  // RUNNING releases its owner and lease. NOT_FOUND for an unknown id.
  virtual absl::StatusOr<JobWrite> EditJob(const std::string& id,
                                           const Fence* fence,
                                           const JobEdit& edit) = 0;
  // Extends to now + lease the lease of every RUNNING job `owner` holds, and
  // returns them: a job the caller runs that is missing was taken from it.
  virtual absl::StatusOr<std::vector<LeaseInfo>> RenewLeases(
      const std::string& owner, absl::Duration lease) = 0;
  // RUNNING jobs whose lease ran out (their replica died or was cut off), at
  // most `limit`, each edited by `reclaim` (which re-queues or ends it) in
  // the same transaction; jobs another replica is reclaiming are skipped.
  // change.owner is the replica that lost it.
  virtual absl::StatusOr<std::vector<JobWrite>> ReclaimExpired(
      int limit, const JobEdit& reclaim) = 0;
  // The RUNNING jobs `owner` holds, whatever their lease, each edited by
  // `reclaim`: a replica's start, for the jobs its previous run left.
  virtual absl::StatusOr<std::vector<JobWrite>> ReclaimOwned(
      const std::string& owner, const JobEdit& reclaim) = 0;
  // Starts telling `listener` about changes (see StoreListener); a store
  // that cannot tell returns OK and never calls it. At most one listener;
  // Listen(nullptr) stops telling and returns once no call to the old
  // listener is running, after which it may be destroyed. A listener still
  // set must outlive the store.
  virtual absl::Status Listen(StoreListener* listener) = 0;

  // ---- events
  // Events of a job with seq > after_seq, in seq order, at most `limit`
  // (<= 0: all).
  virtual absl::StatusOr<std::vector<v1::JobEvent>> ListEvents(
      const std::string& job_id, int64_t after_seq, int limit = 0) = 0;
};

// SQLite in WAL mode (synchronous=NORMAL: a commit survives a process crash;
// FULL would add an fsync per commit for power loss). The schema carries a
// version in PRAGMA user_version and is migrated forward on Open; a database
// from a newer server is refused with FAILED_PRECONDITION. The queue is
// for one replica per file: a claim holds the file's write lock (several
// stores on one file wait for each other), leases use this machine's clock,
// and Listen never calls its listener.
class SqliteJobStore : public JobStore {
 public:
  static constexpr int kSchemaVersion = 3;
  // Creates the file (and the schema) when absent.
  static absl::StatusOr<std::unique_ptr<SqliteJobStore>> Open(
      const std::string& path);
  ~SqliteJobStore() override;

  absl::Status PutModel(const v1::Model& model) override;
  absl::StatusOr<v1::Model> GetModel(const std::string& id) override;
  absl::StatusOr<Page<v1::Model>> ListModels(
      const std::string& tenant, int page_size,
      const std::string& page_token) override;
  absl::StatusOr<std::vector<v1::Model>> ModelsInState(
      v1::ModelState state) override;
  absl::Status DeleteModel(const std::string& id) override;
  absl::StatusOr<int64_t> CountBlobRefs(const std::string& sha256) override;
  absl::StatusOr<int64_t> StoredBytes(const std::string& tenant) override;
  absl::StatusOr<std::vector<std::pair<std::string, int64_t>>>
  StoredBytesByTenant() override;
  absl::StatusOr<bool> TenantHoldsBlob(const std::string& tenant,
                                       const std::string& sha256) override;
  absl::StatusOr<std::vector<Holding>> LargestHoldings(
      const std::string& tenant, int limit) override;
  absl::StatusOr<CreateJobResult> CreateJob(
      const v1::Job& job, const std::vector<v1::JobEvent>& events,
      int max_queued) override;
  absl::Status UpdateJob(const v1::Job& job,
                         const std::vector<v1::JobEvent>& events) override;
  absl::StatusOr<v1::Job> GetJob(const std::string& id) override;
  absl::StatusOr<Page<v1::Job>> ListJobs(
      const JobFilter& filter, int page_size,
      const std::string& page_token) override;
  absl::StatusOr<std::vector<v1::Job>> JobsInStates(
      const std::vector<v1::JobState>& states) override;
  absl::Status DeleteJob(const std::string& id) override;
  absl::StatusOr<std::vector<v1::Job>> JobsEndedBefore(int64_t unix_seconds,
                                                       int limit) override;
  absl::StatusOr<int64_t> CountActiveJobsForModel(
      const std::string& model_id) override;
  absl::StatusOr<int64_t> CountJobs(v1::JobState state) override;
  absl::StatusOr<std::optional<JobWrite>> ClaimJob(
      const ClaimOptions& options, const JobEdit& start) override;
  absl::StatusOr<JobWrite> EditJob(const std::string& id, const Fence* fence,
                                   const JobEdit& edit) override;
  absl::StatusOr<std::vector<LeaseInfo>> RenewLeases(
      const std::string& owner, absl::Duration lease) override;
  absl::StatusOr<std::vector<JobWrite>> ReclaimExpired(
      int limit, const JobEdit& reclaim) override;
  absl::StatusOr<std::vector<JobWrite>> ReclaimOwned(
      const std::string& owner, const JobEdit& reclaim) override;
  absl::Status Listen(StoreListener* listener) override;
  absl::StatusOr<std::vector<v1::JobEvent>> ListEvents(
      const std::string& job_id, int64_t after_seq, int limit) override;

  int schema_version() const;

 private:
  struct Impl;
  explicit SqliteJobStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_JOB_STORE_H_
