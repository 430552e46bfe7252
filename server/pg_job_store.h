// pg_job_store.h: the JobStore on PostgreSQL, for several server replicas
// sharing one database.
//
//   ZQ_ASSIGN_OR_RETURN(
//       auto store, PostgresJobStore::Open(
//                       "postgresql://zeroq@db.internal:5432/zeroq"
//                       "?sslmode=verify-full&connect_timeout=5"));
//   ZQ_ASSIGN_OR_RETURN(CreateJobResult r, store->CreateJob(job));
//   LogInfo({}, absl::StrCat("store ", RedactPostgresUri(uri)));
//
// The same contract as SqliteJobStore (job_store.h): the same records, error
// codes and messages, page tokens and orderings. The schema carries a version
// in the table zeroq_schema_version and is migrated forward on Open, one
// transaction per migration under an advisory lock, so that replicas starting
// together migrate once; a database from a newer server is refused with
// FAILED_PRECONDITION. The tables live in the connection's current schema
// (the first of search_path; `options=-csearch_path%3DNAME` in the URI picks
// another).
//
// Thread-safe: calls take a connection from a small pool (at most
// kMaxConnections; more calls wait). A call whose connection broke, or that
// cannot connect, returns UNAVAILABLE; a stale pooled connection (the
// database restarted since) is replaced once without failing the call, since
// nothing of its transaction was committed. A call that takes callbacks
// (ClaimJob, EditJob, Reclaim*) runs them again whenever its transaction is
// run again (that case, or a conflict), on the records as read anew.
//
// Replicas: leases are kept in the database's time (now()), and writes
// NOTIFY, in their transaction, on zeroq_events (payload: the job id),
// zeroq_queue (a job is QUEUED) and zeroq_cancel (the job id). Listen
// LISTENs on them on a connection of its own, outside the pool, from a
// thread that reconnects with backoff and that the destructor stops first.
#ifndef ZEROQ_SERVER_PG_JOB_STORE_H_
#define ZEROQ_SERVER_PG_JOB_STORE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/job_store.h"

namespace zeroq::server {

// `uri` with the password (of the user part or a password= parameter)
// replaced by "***": what logs and error messages show of a store URI.
std::string RedactPostgresUri(absl::string_view uri);

// Whether `uri` is a libpq connection URI (postgresql:// or postgres://).
bool IsPostgresUri(absl::string_view uri);

class PostgresJobStore : public JobStore {
 public:
  static constexpr int kSchemaVersion = 3;
  static constexpr int kMaxConnections = 4;
  // A libpq URI: postgresql://user[:password]@host[:port]/db?params, or
  // postgresql:///db?host=/socket/dir&port=N. Without connect_timeout in it,
  // connecting gives up after 10 s rather than the system's TCP timeout.
  // INVALID_ARGUMENT for another scheme, UNAVAILABLE when the server cannot
  // be reached.
  static absl::StatusOr<std::unique_ptr<PostgresJobStore>> Open(
      const std::string& uri);
  ~PostgresJobStore() override;

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
  explicit PostgresJobStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_PG_JOB_STORE_H_
