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
// given; ids, sequence numbers and state rules are the caller's.
#ifndef ZEROQ_SERVER_JOB_STORE_H_
#define ZEROQ_SERVER_JOB_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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
  // Inserts a new job, unless job.request_id is not empty and the tenant
  // already has a job with that request id: then returns that one.
  virtual absl::StatusOr<CreateJobResult> CreateJob(const v1::Job& job) = 0;
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

  // ---- events
  // Events of a job with seq > after_seq, in seq order, at most `limit`
  // (<= 0: all).
  virtual absl::StatusOr<std::vector<v1::JobEvent>> ListEvents(
      const std::string& job_id, int64_t after_seq, int limit = 0) = 0;
};

// SQLite in WAL mode (synchronous=NORMAL: a commit survives a process crash;
// FULL would add an fsync per commit for power loss). The schema carries a
// version in PRAGMA user_version and is migrated forward on Open; a database
// from a newer server is refused with FAILED_PRECONDITION.
class SqliteJobStore : public JobStore {
 public:
  static constexpr int kSchemaVersion = 2;
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
  absl::StatusOr<CreateJobResult> CreateJob(const v1::Job& job) override;
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
