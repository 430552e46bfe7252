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
// nothing of its transaction was committed.
#ifndef ZEROQ_SERVER_PG_JOB_STORE_H_
#define ZEROQ_SERVER_PG_JOB_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/job_store.h"

namespace zeroq::server {

// `uri` with the password (of the user part or a password= parameter)
// replaced by "***": what logs and error messages show of a store URI.
std::string RedactPostgresUri(absl::string_view uri);

// Whether `uri` is a libpq connection URI (postgresql:// or postgres://).
bool IsPostgresUri(absl::string_view uri);

class PostgresJobStore : public JobStore {
 public:
  static constexpr int kSchemaVersion = 2;
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
  explicit PostgresJobStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_PG_JOB_STORE_H_
