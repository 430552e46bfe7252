#include "server/job_store.h"

#include <sqlite3.h>

#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "server/job_store_common.h"

namespace zeroq::server {
namespace {

using store_common::ClampPageSize;
using store_common::EndUnix;
using store_common::IsTerminal;
using store_common::kJobTokenPrefix;
using store_common::kModelTokenPrefix;
using store_common::ParsePageToken;
using store_common::ParseRecord;
using store_common::Serialize;

// Another process (a backup, the sqlite3 shell) may hold the write lock for a
// moment; wait rather than fail the RPC.
constexpr int kBusyTimeoutMs = 5000;

struct Migration {
  int version;
  const char* sql;
  // Fills what SQL alone cannot (columns from the protobuf records); runs
  // after `sql` in the same transaction. May be null.
  absl::Status (*backfill)(sqlite3* db);
};

absl::Status BackfillVersion2(sqlite3* db);
absl::Status BackfillVersion3(sqlite3* db);

// Append only: a released migration never changes, since databases in the
// field have already run it. Each runs in its own transaction together with
// the user_version bump.
//
// Ordering uses an explicit INTEGER PRIMARY KEY AUTOINCREMENT (created_seq)
// rather than the implicit rowid: VACUUM may renumber implicit rowids, and
// AUTOINCREMENT never hands out the number of a deleted row again, so page
// tokens stay meaningful. `id` is then a UNIQUE key instead of the PRIMARY KEY.
// Jobs have no foreign key to models: jobs and their events outlive a
// deleted model.
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE TABLE models (
  created_seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  state INTEGER NOT NULL,
  record BLOB NOT NULL
);
CREATE INDEX models_by_tenant ON models (tenant, created_seq);
CREATE INDEX models_by_state ON models (state, created_seq);
CREATE INDEX models_by_sha256 ON models (sha256);

CREATE TABLE jobs (
  created_seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  model_id TEXT NOT NULL,
  state INTEGER NOT NULL,
  request_id TEXT NOT NULL,
  record BLOB NOT NULL
);
CREATE UNIQUE INDEX jobs_by_request_id ON jobs (tenant, request_id)
  WHERE request_id != '';
CREATE INDEX jobs_by_tenant ON jobs (tenant, created_seq);
CREATE INDEX jobs_by_tenant_state ON jobs (tenant, state, created_seq);
CREATE INDEX jobs_by_model ON jobs (model_id, state);
CREATE INDEX jobs_by_state ON jobs (state, created_seq);

CREATE TABLE events (
  job_id TEXT NOT NULL REFERENCES jobs (id),
  seq INTEGER NOT NULL,
  record BLOB NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
)sql",
     nullptr},
    // Blob references, so that stored bytes and a blob's users need no scan
    // of the records: one row per model (name '') and per artifact of a
    // succeeded job. end_unix: when a job became SUCCEEDED, FAILED or
    // CANCELLED (NULL before), for retention.
    {2, R"sql(
CREATE TABLE blob_refs (
  owner TEXT NOT NULL,
  name TEXT NOT NULL,
  tenant TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  size_bytes INTEGER NOT NULL,
  PRIMARY KEY (owner, name)
) WITHOUT ROWID;
CREATE INDEX blob_refs_by_sha256 ON blob_refs (sha256);
CREATE INDEX blob_refs_by_tenant ON blob_refs (tenant, sha256);
ALTER TABLE jobs ADD COLUMN end_unix INTEGER;
CREATE INDEX jobs_by_end ON jobs (end_unix) WHERE end_unix IS NOT NULL;
)sql",
     BackfillVersion2},
    // The queue shared by replicas: columns the claim filters and orders by
    // (priority, device, attempt and cancel_requested mirror the record),
    // and the claim's own: the replica holding a RUNNING job and its lease
    // (unix ms), and not_before (unix ms, 0: at once) for a QUEUED job
    // waiting out a retry's backoff. A job left RUNNING by a version 2
    // server has no owner and gets a lease that has run out, so that it is
    // reclaimed like a dead replica's.
    {3, R"sql(
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN device INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
ALTER TABLE jobs ADD COLUMN not_before INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_queue ON jobs (state, priority DESC, created_seq);
CREATE INDEX jobs_running_by_owner ON jobs (owner) WHERE state = 2;
UPDATE jobs SET lease_until = 0 WHERE state = 2;
)sql",
     BackfillVersion3},
};

static_assert(kMigrations[std::size(kMigrations) - 1].version ==
                  SqliteJobStore::kSchemaVersion,
              "kSchemaVersion must be the last migration's version");
// The schema's indexes and the queue's statements name these states by
// number (a partial index serves only a query with the same literal).
static_assert(v1::JOB_QUEUED == 1 && v1::JOB_RUNNING == 2,
              "the queue's SQL names JOB_QUEUED as 1 and JOB_RUNNING as 2");

absl::Status SqliteError(sqlite3* db, int rc, absl::string_view context) {
  const char* detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  return absl::InternalError(
      absl::StrCat(context, ": sqlite error ", rc, " (", detail, ")"));
}

bool IsConstraintError(int rc) { return (rc & 0xff) == SQLITE_CONSTRAINT; }

// A cached prepared statement in use: bindings in, rows out, and reset on
// scope exit so that the cache can hand it out again and no read
// transaction stays open.
class Statement {
 public:
  Statement(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  Statement(Statement&& other) noexcept
      : db_(other.db_),
        stmt_(std::exchange(other.stmt_, nullptr)),
        bind_rc_(other.bind_rc_) {}
  Statement& operator=(Statement&&) = delete;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement() {
    if (stmt_ == nullptr) return;
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  // An empty view may have a null data pointer, which sqlite would bind as
  // NULL; the NOT NULL columns want an empty value instead.
  void BindText(int index, absl::string_view text) {
    Check(sqlite3_bind_text64(stmt_, index, text.empty() ? "" : text.data(),
                              text.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
  }
  void BindBlob(int index, absl::string_view bytes) {
    if (bytes.empty()) {
      Check(sqlite3_bind_zeroblob(stmt_, index, 0));
      return;
    }
    Check(sqlite3_bind_blob64(stmt_, index, bytes.data(), bytes.size(),
                              SQLITE_TRANSIENT));
  }
  void BindInt64(int index, int64_t value) {
    Check(sqlite3_bind_int64(stmt_, index, value));
  }

  // SQLITE_ROW, SQLITE_DONE, or an error code (a failed bind included).
  int Step() {
    if (bind_rc_ != SQLITE_OK) return bind_rc_;
    return sqlite3_step(stmt_);
  }
  // Makes the statement ready to run again with new bindings.
  void Reset() { sqlite3_reset(stmt_); }
  int64_t ColumnInt64(int column) {
    return sqlite3_column_int64(stmt_, column);
  }
  // Valid until the next Step.
  absl::string_view ColumnBlob(int column) {
    const void* data = sqlite3_column_blob(stmt_, column);
    const int size = sqlite3_column_bytes(stmt_, column);
    if (data == nullptr) return absl::string_view();
    return absl::string_view(static_cast<const char*>(data),
                             static_cast<size_t>(size));
  }
  sqlite3* db() const { return db_; }

 private:
  void Check(int rc) {
    if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_;
  int bind_rc_ = SQLITE_OK;
};

// The record of the one row `query` selects by id: NOT_FOUND when none.
template <typename T>
absl::StatusOr<T> ReadRecordById(sqlite3* db, Statement& query,
                                 absl::string_view what,
                                 const std::string& id) {
  const int rc = query.Step();
  if (rc == SQLITE_DONE) {
    return absl::NotFoundError(absl::StrCat(what, " ", id, " not found"));
  }
  if (rc != SQLITE_ROW) {
    return SqliteError(db, rc, absl::StrCat("get ", what, " ", id));
  }
  T record;
  ZQ_RETURN_IF_ERROR(ParseRecord(query.ColumnBlob(0), what, &record));
  return record;
}

// Reads rows of (created_seq, record), newest first, fetched with LIMIT
// page_size + 1 so that a full last page does not promise another.
template <typename Message>
absl::StatusOr<Page<Message>> ReadPage(Statement& query, int page_size,
                                       absl::string_view token_prefix,
                                       absl::string_view what) {
  Page<Message> page;
  int64_t last_seq = 0;
  while (true) {
    const int rc = query.Step();
    if (rc == SQLITE_DONE) return page;
    if (rc != SQLITE_ROW)
      return SqliteError(query.db(), rc, absl::StrCat("list ", what, "s"));
    if (static_cast<int>(page.items.size()) == page_size) {
      page.next_page_token = absl::StrCat(token_prefix, last_seq);
      return page;
    }
    last_seq = query.ColumnInt64(0);
    ZQ_RETURN_IF_ERROR(
        ParseRecord(query.ColumnBlob(1), what, &page.items.emplace_back()));
  }
}

// Reads every row's column 0 as a record.
template <typename Message>
absl::StatusOr<std::vector<Message>> ReadAll(Statement& query,
                                             absl::string_view what) {
  std::vector<Message> out;
  while (true) {
    const int rc = query.Step();
    if (rc == SQLITE_DONE) return out;
    if (rc != SQLITE_ROW)
      return SqliteError(query.db(), rc, absl::StrCat("read ", what, "s"));
    ZQ_RETURN_IF_ERROR(
        ParseRecord(query.ColumnBlob(0), what, &out.emplace_back()));
  }
}

// For statements that return one row of one integer (COUNT, PRAGMA).
absl::StatusOr<int64_t> ReadInt64(Statement& query, absl::string_view what) {
  const int rc = query.Step();
  if (rc == SQLITE_ROW) return query.ColumnInt64(0);
  if (rc == SQLITE_DONE)
    return absl::InternalError(absl::StrCat(what, ": no row"));
  return SqliteError(query.db(), rc, what);
}

constexpr const char* kInsertRef =
    "INSERT OR REPLACE INTO blob_refs (owner, name, tenant, sha256, "
    "size_bytes) VALUES (?1, ?2, ?3, ?4, ?5)";

// Rows of blob_refs for a model's upload.
absl::Status InsertModelRef(Statement& insert, const v1::Model& model) {
  insert.BindText(1, model.id());
  insert.BindText(2, "");
  insert.BindText(3, model.tenant());
  insert.BindText(4, model.sha256());
  insert.BindInt64(5, model.size_bytes());
  const int rc = insert.Step();
  insert.Reset();
  if (rc != SQLITE_DONE)
    return SqliteError(insert.db(), rc, absl::StrCat("refs of model ", model.id()));
  return absl::OkStatus();
}

// ... and for a job's artifacts (none unless it SUCCEEDED).
absl::Status InsertJobRefs(Statement& insert, const v1::Job& job) {
  for (const v1::Artifact& a : job.result().artifacts()) {
    if (a.sha256().empty()) continue;
    insert.BindText(1, job.id());
    insert.BindText(2, a.name());
    insert.BindText(3, job.tenant());
    insert.BindText(4, a.sha256());
    insert.BindInt64(5, a.size_bytes());
    const int rc = insert.Step();
    insert.Reset();
    if (rc != SQLITE_DONE)
      return SqliteError(insert.db(), rc, absl::StrCat("refs of job ", job.id()));
  }
  return absl::OkStatus();
}

// A statement prepared for the backfill only (not cached).
class OwnedStatement {
 public:
  ~OwnedStatement() { sqlite3_finalize(stmt_); }
  absl::StatusOr<Statement> Prepare(sqlite3* db, const char* sql) {
    const int rc = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
    if (rc != SQLITE_OK) return SqliteError(db, rc, sql);
    return Statement(db, stmt_);
  }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

absl::Status BackfillVersion2(sqlite3* db) {
  OwnedStatement insert_owned, models_owned, jobs_owned, end_owned;
  ZQ_ASSIGN_OR_RETURN(Statement insert, insert_owned.Prepare(db, kInsertRef));
  {
    ZQ_ASSIGN_OR_RETURN(Statement models,
                        models_owned.Prepare(db, "SELECT record FROM models"));
    ZQ_ASSIGN_OR_RETURN(std::vector<v1::Model> all,
                        ReadAll<v1::Model>(models, "model"));
    for (const v1::Model& m : all) ZQ_RETURN_IF_ERROR(InsertModelRef(insert, m));
  }
  ZQ_ASSIGN_OR_RETURN(Statement jobs,
                      jobs_owned.Prepare(db, "SELECT record FROM jobs WHERE "
                                             "state IN (3, 4, 5)"));
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> ended,
                      ReadAll<v1::Job>(jobs, "job"));
  ZQ_ASSIGN_OR_RETURN(
      Statement set_end,
      end_owned.Prepare(db, "UPDATE jobs SET end_unix = ?2 WHERE id = ?1"));
  for (const v1::Job& job : ended) {
    ZQ_RETURN_IF_ERROR(InsertJobRefs(insert, job));
    set_end.BindText(1, job.id());
    set_end.BindInt64(2, EndUnix(job));
    const int rc = set_end.Step();
    set_end.Reset();
    if (rc != SQLITE_DONE) return SqliteError(db, rc, "backfill end_unix");
  }
  return absl::OkStatus();
}

absl::Status BackfillVersion3(sqlite3* db) {
  OwnedStatement jobs_owned, set_owned;
  ZQ_ASSIGN_OR_RETURN(Statement jobs,
                      jobs_owned.Prepare(db, "SELECT record FROM jobs"));
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Job> all, ReadAll<v1::Job>(jobs, "job"));
  ZQ_ASSIGN_OR_RETURN(
      Statement set,
      set_owned.Prepare(db,
                        "UPDATE jobs SET priority = ?2, device = ?3, "
                        "attempt = ?4, cancel_requested = ?5 WHERE id = ?1"));
  for (const v1::Job& job : all) {
    set.BindText(1, job.id());
    set.BindInt64(2, job.priority());
    set.BindInt64(3, job.device_preference());
    set.BindInt64(4, job.attempts());
    set.BindInt64(5, job.cancel_requested() ? 1 : 0);
    const int rc = set.Step();
    set.Reset();
    if (rc != SQLITE_DONE) return SqliteError(db, rc, "backfill queue columns");
  }
  return absl::OkStatus();
}

// Where a write leaves a job's queue-only columns. Unset fields keep what
// the row holds as far as the job's new state allows: only a RUNNING job
// has an owner and a lease, only a QUEUED one a not_before.
struct QueueColumns {
  std::optional<std::string> owner;
  std::optional<int64_t> lease_until;  // unix ms
  std::optional<int64_t> not_before;   // unix ms
};

absl::StatusOr<std::vector<std::string>> SerializeEvents(
    const std::vector<v1::JobEvent>& events) {
  std::vector<std::string> records;
  records.reserve(events.size());
  for (const v1::JobEvent& event : events) {
    ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(event, "job event"));
    records.push_back(std::move(record));
  }
  return records;
}

// A job row as the queue methods read it.
struct StoredJob {
  v1::Job job;
  std::string owner;  // "" when none
};

}  // namespace

struct SqliteJobStore::Impl {
  ~Impl() {
    for (auto& [sql, stmt] : statements) sqlite3_finalize(stmt);
    // close_v2 defers the close, never leaks, if something is still open.
    if (db != nullptr) sqlite3_close_v2(db);
  }

  // A cached statement for `sql`; prepared on first use.
  absl::StatusOr<Statement> Query(const std::string& sql)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = statements.find(sql);
    if (it == statements.end()) {
      sqlite3_stmt* stmt = nullptr;
      const int rc =
          sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()),
                             SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
      if (rc != SQLITE_OK)
        return SqliteError(db, rc, absl::StrCat("prepare \"", sql, "\""));
      it = statements.emplace(sql, stmt).first;
    }
    return Statement(db, it->second);
  }

  // Runs a statement that returns no rows.
  absl::Status Exec(const std::string& sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_ASSIGN_OR_RETURN(Statement query, Query(sql));
    const int rc = query.Step();
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) return SqliteError(db, rc, sql);
    return absl::OkStatus();
  }

  // IMMEDIATE takes the write lock up front, so a read-then-write
  // transaction cannot fail half way with SQLITE_BUSY on the upgrade.
  absl::Status Begin() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return Exec("BEGIN IMMEDIATE");
  }

  // Commits when `status` is OK, otherwise rolls back; returns the outcome.
  absl::Status Finish(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (status.ok()) {
      status = Exec("COMMIT");
      if (status.ok()) return status;
    }
    if (!sqlite3_get_autocommit(db)) Exec("ROLLBACK").IgnoreError();
    return status;
  }

  absl::StatusOr<int64_t> UserVersion() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_ASSIGN_OR_RETURN(Statement query, Query("PRAGMA user_version"));
    return ReadInt64(query, "read schema version");
  }

  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    for (const Migration& migration : kMigrations) {
      ZQ_RETURN_IF_ERROR(Begin());
      // Read inside the write transaction: another process may have migrated
      // the file since we last looked.
      absl::StatusOr<int64_t> version = UserVersion();
      absl::Status status = version.status();
      if (status.ok() && *version < migration.version) {
        char* error = nullptr;
        const int rc =
            sqlite3_exec(db, migration.sql, nullptr, nullptr, &error);
        if (rc != SQLITE_OK) {
          status = absl::InternalError(
              absl::StrCat("schema migration to version ", migration.version,
                           " failed: ", error != nullptr ? error : "unknown"));
        }
        sqlite3_free(error);
        if (status.ok() && migration.backfill != nullptr) {
          status = migration.backfill(db);
        }
        if (status.ok()) {
          status =
              Exec(absl::StrCat("PRAGMA user_version = ", migration.version));
        }
      }
      ZQ_RETURN_IF_ERROR(Finish(std::move(status)));
    }
    return absl::OkStatus();
  }

  // The body of SqliteJobStore::CreateJob; runs inside a transaction.
  // `job` and `events` are numbered already.
  absl::Status CreateJob(const v1::Job& job, const std::string& record,
                         const std::vector<v1::JobEvent>& events,
                         const std::vector<std::string>& event_records,
                         int max_queued, CreateJobResult* result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (!job.request_id().empty()) {
      // The repeated `request_id != ''` lets the planner use the partial index.
      ZQ_ASSIGN_OR_RETURN(Statement query,
                          Query("SELECT record FROM jobs WHERE tenant = ?1 "
                                "AND request_id = ?2 AND request_id != ''"));
      query.BindText(1, job.tenant());
      query.BindText(2, job.request_id());
      const int rc = query.Step();
      if (rc == SQLITE_ROW)
        return ParseRecord(query.ColumnBlob(0), "job", &result->job);
      if (rc != SQLITE_DONE) {
        return SqliteError(
            db, rc, absl::StrCat("look up request id ", job.request_id()));
      }
    }
    if (max_queued > 0) {
      ZQ_ASSIGN_OR_RETURN(Statement query,
                          Query("SELECT COUNT(*) FROM jobs WHERE tenant = ?1 "
                                "AND state = ?2"));
      query.BindText(1, job.tenant());
      query.BindInt64(2, v1::JOB_QUEUED);
      ZQ_ASSIGN_OR_RETURN(int64_t queued,
                          ReadInt64(query, "count queued jobs"));
      if (queued >= max_queued) {
        result->over_queued_limit = true;
        result->queued = queued;
        return absl::OkStatus();
      }
    }
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        Query("INSERT INTO jobs (id, tenant, model_id, state, request_id, "
              "record, priority, device, attempt, cancel_requested) "
              "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"));
    query.BindText(1, job.id());
    query.BindText(2, job.tenant());
    query.BindText(3, job.model_id());
    query.BindInt64(4, job.state());
    query.BindText(5, job.request_id());
    query.BindBlob(6, record);
    query.BindInt64(7, job.priority());
    query.BindInt64(8, job.device_preference());
    query.BindInt64(9, job.attempts());
    query.BindInt64(10, job.cancel_requested() ? 1 : 0);
    const int rc = query.Step();
    if (IsConstraintError(rc)) {
      return absl::AlreadyExistsError(
          absl::StrCat("job ", job.id(), " already exists"));
    }
    if (rc != SQLITE_DONE)
      return SqliteError(db, rc, absl::StrCat("create job ", job.id()));
    ZQ_RETURN_IF_ERROR(InsertEvents(job.id(), events, event_records));
    result->job = job;
    result->created = true;
    return absl::OkStatus();
  }

  // Replaces the job's row (by id) and appends `events`; runs inside a
  // transaction. The body of SqliteJobStore::UpdateJob, and the write of
  // every queue method.
  absl::Status WriteJob(const v1::Job& job, const std::string& record,
                        const QueueColumns& queue,
                        const std::vector<v1::JobEvent>& events,
                        const std::vector<std::string>& event_records)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    {
      // Every column mirrors the record, so a listing by tenant or request id
      // (or the claim's order) always agrees with what GetJob returns.
      ZQ_ASSIGN_OR_RETURN(
          Statement query,
          Query("UPDATE jobs SET tenant = ?2, model_id = ?3, state = ?4, "
                "request_id = ?5, record = ?6, end_unix = ?7, priority = ?8, "
                "device = ?9, attempt = ?10, cancel_requested = ?11, "
                "owner = CASE WHEN ?4 = 2 THEN COALESCE(?12, owner) END, "
                "lease_until = "
                "CASE WHEN ?4 = 2 THEN COALESCE(?13, lease_until) END, "
                "not_before = "
                "CASE WHEN ?4 = 1 THEN COALESCE(?14, not_before) ELSE 0 END "
                "WHERE id = ?1"));
      query.BindText(1, job.id());
      query.BindText(2, job.tenant());
      query.BindText(3, job.model_id());
      query.BindInt64(4, job.state());
      query.BindText(5, job.request_id());
      query.BindBlob(6, record);
      if (IsTerminal(job.state())) query.BindInt64(7, EndUnix(job));  // else NULL
      query.BindInt64(8, job.priority());
      query.BindInt64(9, job.device_preference());
      query.BindInt64(10, job.attempts());
      query.BindInt64(11, job.cancel_requested() ? 1 : 0);
      // Unbound parameters are NULL: keep.
      if (queue.owner.has_value()) query.BindText(12, *queue.owner);
      if (queue.lease_until.has_value())
        query.BindInt64(13, *queue.lease_until);
      if (queue.not_before.has_value()) query.BindInt64(14, *queue.not_before);
      const int rc = query.Step();
      if (IsConstraintError(rc)) {
        return absl::AlreadyExistsError(absl::StrCat(
            "job ", job.id(), ": tenant ", job.tenant(),
            " already has another job with request id ", job.request_id()));
      }
      if (rc != SQLITE_DONE)
        return SqliteError(db, rc, absl::StrCat("update job ", job.id()));
      if (sqlite3_changes(db) == 0) {
        return absl::NotFoundError(
            absl::StrCat("job ", job.id(), " not found"));
      }
    }
    if (IsTerminal(job.state())) {
      // Only a terminal record can carry artifacts; progress updates (the
      // many) skip this.
      ZQ_RETURN_IF_ERROR(DeleteRefs(job.id()));
      ZQ_ASSIGN_OR_RETURN(Statement insert, Query(kInsertRef));
      ZQ_RETURN_IF_ERROR(InsertJobRefs(insert, job));
    }
    return InsertEvents(job.id(), events, event_records);
  }

  absl::Status InsertEvents(const std::string& job_id,
                            const std::vector<v1::JobEvent>& events,
                            const std::vector<std::string>& event_records)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        Query("INSERT INTO events (job_id, seq, record) VALUES (?1, ?2, ?3)"));
    for (size_t i = 0; i < events.size(); ++i) {
      query.BindText(1, job_id);
      query.BindInt64(2, events[i].seq());
      query.BindBlob(3, event_records[i]);
      const int rc = query.Step();
      if (IsConstraintError(rc)) {
        return absl::AlreadyExistsError(
            absl::StrCat("job ", job_id, " already has an event with seq ",
                         events[i].seq()));
      }
      if (rc != SQLITE_DONE) {
        return SqliteError(
            db, rc,
            absl::StrCat("append event ", events[i].seq(), " of job ", job_id));
      }
      query.Reset();
    }
    return absl::OkStatus();
  }

  // Reads the rows (record, owner) `query` selects.
  absl::StatusOr<std::vector<StoredJob>> ReadStoredJobs(Statement& query)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::vector<StoredJob> out;
    while (true) {
      const int rc = query.Step();
      if (rc == SQLITE_DONE) return out;
      if (rc != SQLITE_ROW) return SqliteError(db, rc, "read jobs");
      StoredJob& stored = out.emplace_back();
      ZQ_RETURN_IF_ERROR(ParseRecord(query.ColumnBlob(0), "job", &stored.job));
      stored.owner = std::string(query.ColumnBlob(1));
    }
  }

  // Numbers the change's events after the stored record's, and writes the
  // record and the events; runs inside a transaction.
  absl::StatusOr<JobWrite> WriteChange(const StoredJob& stored,
                                       JobChange& change,
                                       const QueueColumns& queue)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_RETURN_IF_ERROR(store_common::CheckSameJob(stored.job.id(), change.job));
    store_common::NumberEvents(stored.job.last_seq(), absl::Now(), change.job,
                               change.events);
    ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(change.job, "job"));
    ZQ_ASSIGN_OR_RETURN(std::vector<std::string> event_records,
                        SerializeEvents(change.events));
    ZQ_RETURN_IF_ERROR(
        WriteJob(change.job, record, queue, change.events, event_records));
    return JobWrite{std::move(change.job), std::move(change.events)};
  }

  // Applies `reclaim` to each of `jobs` (RUNNING, read in this transaction)
  // and writes them back without owner or lease.
  absl::StatusOr<std::vector<JobWrite>> Reclaim(std::vector<StoredJob> jobs,
                                                const JobEdit& reclaim)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::vector<JobWrite> out;
    for (const StoredJob& stored : jobs) {
      JobChange change{stored.job, {}, absl::InfinitePast(), stored.owner};
      ZQ_RETURN_IF_ERROR(reclaim(change));
      ZQ_RETURN_IF_ERROR(store_common::CheckReclaimed(change.job));
      QueueColumns queue;
      queue.not_before = store_common::UnixMillis(change.not_before);
      ZQ_ASSIGN_OR_RETURN(JobWrite written, WriteChange(stored, change, queue));
      out.push_back(std::move(written));
    }
    return out;
  }

  // The first QUEUED job a claim may take (see JobStore::ClaimJob), or
  // nullopt. The transaction holds SQLite's write lock, so nothing changes
  // under the walk.
  absl::StatusOr<std::optional<StoredJob>> FindClaimable(
      const ClaimOptions& options, int64_t now_ms)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::string sql =
        "SELECT record, tenant FROM jobs AS j WHERE state = 1 AND "
        "not_before <= ?1 AND device IN (";
    for (size_t i = 0; i < options.devices.size(); ++i) {
      absl::StrAppend(&sql, i == 0 ? "?" : ", ?", i + 2);
    }
    absl::StrAppend(&sql,
                    ") ORDER BY priority DESC, (SELECT COUNT(*) FROM jobs AS r "
                    "WHERE r.tenant = j.tenant AND r.state = 2), created_seq");
    ZQ_ASSIGN_OR_RETURN(Statement candidates, Query(sql));
    candidates.BindInt64(1, now_ms);
    for (size_t i = 0; i < options.devices.size(); ++i) {
      candidates.BindInt64(static_cast<int>(i + 2), options.devices[i]);
    }
    absl::flat_hash_set<std::string> at_limit;
    while (true) {
      const int rc = candidates.Step();
      if (rc == SQLITE_DONE) return std::nullopt;
      if (rc != SQLITE_ROW) return SqliteError(db, rc, "find a job to claim");
      const std::string tenant(candidates.ColumnBlob(1));
      if (at_limit.contains(tenant)) continue;
      const int limit =
          options.running_limit ? options.running_limit(tenant) : 0;
      if (limit > 0) {
        ZQ_ASSIGN_OR_RETURN(int64_t running, CountRunning(tenant));
        if (running >= limit) {
          at_limit.insert(tenant);
          continue;
        }
      }
      StoredJob stored;
      ZQ_RETURN_IF_ERROR(
          ParseRecord(candidates.ColumnBlob(0), "job", &stored.job));
      return stored;
    }
  }

  absl::StatusOr<int64_t> CountRunning(const std::string& tenant)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        Query("SELECT COUNT(*) FROM jobs WHERE tenant = ?1 AND state = 2"));
    query.BindText(1, tenant);
    return ReadInt64(query, "count running jobs");
  }

  absl::Status DeleteRefs(const std::string& owner)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_ASSIGN_OR_RETURN(Statement query,
                        Query("DELETE FROM blob_refs WHERE owner = ?1"));
    query.BindText(1, owner);
    const int rc = query.Step();
    if (rc != SQLITE_DONE)
      return SqliteError(db, rc, absl::StrCat("delete refs of ", owner));
    return absl::OkStatus();
  }

  // Runs a DELETE of the row with id ?1; NOT_FOUND when there was none.
  absl::Status DeleteById(const std::string& sql, absl::string_view what,
                          const std::string& id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    ZQ_ASSIGN_OR_RETURN(Statement query, Query(sql));
    query.BindText(1, id);
    const int rc = query.Step();
    if (rc != SQLITE_DONE)
      return SqliteError(db, rc, absl::StrCat("delete ", what, " ", id));
    if (sqlite3_changes(db) == 0)
      return absl::NotFoundError(absl::StrCat(what, " ", id, " not found"));
    return absl::OkStatus();
  }

  absl::Mutex mu;
  sqlite3* db ABSL_GUARDED_BY(mu) = nullptr;
  // Keyed by SQL text; a handful of fixed statements plus the few variants of
  // the filtered queries.
  absl::flat_hash_map<std::string, sqlite3_stmt*> statements
      ABSL_GUARDED_BY(mu);
  // Written once in Open, before the store is shared.
  int schema_version = 0;
  bool listening ABSL_GUARDED_BY(mu) = false;
};

SqliteJobStore::SqliteJobStore(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

SqliteJobStore::~SqliteJobStore() = default;

int SqliteJobStore::schema_version() const { return impl_->schema_version; }

absl::StatusOr<std::unique_ptr<SqliteJobStore>> SqliteJobStore::Open(
    const std::string& path) {
  auto impl = std::make_unique<Impl>();
  {
    absl::MutexLock lock(&impl->mu);
    // NOMUTEX: impl->mu already serialises every use of the connection.
    const int rc = sqlite3_open_v2(
        path.c_str(), &impl->db,
        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
        nullptr);
    if (rc != SQLITE_OK)
      return SqliteError(impl->db, rc, absl::StrCat("open ", path));
    sqlite3_extended_result_codes(impl->db, 1);
    sqlite3_busy_timeout(impl->db, kBusyTimeoutMs);

    // Before touching anything else: a newer server's file must stay as it is.
    ZQ_ASSIGN_OR_RETURN(int64_t version, impl->UserVersion());
    if (version > kSchemaVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " has schema version ", version, ", newer than this server's ",
          kSchemaVersion, "; it was written by a newer ZeroQ server"));
    }

    {
      ZQ_ASSIGN_OR_RETURN(Statement query,
                          impl->Query("PRAGMA journal_mode = WAL"));
      const int step = query.Step();
      if (step != SQLITE_ROW)
        return SqliteError(impl->db, step, "set journal_mode");
      const absl::string_view mode = query.ColumnBlob(0);
      // In-memory databases cannot use WAL and report "memory".
      if (!absl::EqualsIgnoreCase(mode, "wal") &&
          !absl::EqualsIgnoreCase(mode, "memory")) {
        return absl::InternalError(absl::StrCat(
            "cannot put ", path, " in WAL mode (journal_mode is ", mode, ")"));
      }
    }
    ZQ_RETURN_IF_ERROR(impl->Exec("PRAGMA synchronous = NORMAL"));
    ZQ_RETURN_IF_ERROR(impl->Exec("PRAGMA foreign_keys = ON"));
    ZQ_RETURN_IF_ERROR(impl->Migrate());
    ZQ_ASSIGN_OR_RETURN(version, impl->UserVersion());
    impl->schema_version = static_cast<int>(version);
  }
  return std::unique_ptr<SqliteJobStore>(new SqliteJobStore(std::move(impl)));
}

// ---------------------------------------------------------------- models

absl::Status SqliteJobStore::PutModel(const v1::Model& model) {
  if (model.id().empty())
    return absl::InvalidArgumentError("PutModel: model id is empty");
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(model, "model"));
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  auto body = [&]() -> absl::Status {
    // An upsert, not INSERT OR REPLACE: replacing would delete the row and
    // give it a new created_seq, moving the model in the listing order.
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        impl_->Query("INSERT INTO models (id, tenant, sha256, state, record) "
                     "VALUES (?1, ?2, ?3, ?4, ?5) "
                     "ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, "
                     "sha256 = excluded.sha256, state = excluded.state, "
                     "record = excluded.record"));
    query.BindText(1, model.id());
    query.BindText(2, model.tenant());
    query.BindText(3, model.sha256());
    query.BindInt64(4, model.state());
    query.BindBlob(5, record);
    const int rc = query.Step();
    if (rc != SQLITE_DONE)
      return SqliteError(impl_->db, rc, absl::StrCat("put model ", model.id()));
    ZQ_ASSIGN_OR_RETURN(Statement insert, impl_->Query(kInsertRef));
    return InsertModelRef(insert, model);
  };
  return impl_->Finish(body());
}

absl::StatusOr<v1::Model> SqliteJobStore::GetModel(const std::string& id) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(Statement query,
                      impl_->Query("SELECT record FROM models WHERE id = ?1"));
  query.BindText(1, id);
  return ReadRecordById<v1::Model>(impl_->db, query, "model", id);
}

absl::StatusOr<Page<v1::Model>> SqliteJobStore::ListModels(
    const std::string& tenant, int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int64_t before,
                      ParsePageToken(page_token, kModelTokenPrefix));
  page_size = ClampPageSize(page_size);
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(Statement query,
                      impl_->Query("SELECT created_seq, record FROM models "
                                   "WHERE tenant = ?1 AND created_seq < ?2 "
                                   "ORDER BY created_seq DESC LIMIT ?3"));
  query.BindText(1, tenant);
  query.BindInt64(2, before);
  query.BindInt64(3, page_size + 1);
  return ReadPage<v1::Model>(query, page_size, kModelTokenPrefix, "model");
}

absl::StatusOr<std::vector<v1::Model>> SqliteJobStore::ModelsInState(
    v1::ModelState state) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query(
          "SELECT record FROM models WHERE state = ?1 ORDER BY created_seq"));
  query.BindInt64(1, state);
  return ReadAll<v1::Model>(query, "model");
}

absl::Status SqliteJobStore::DeleteModel(const std::string& id) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  absl::Status status =
      impl_->DeleteById("DELETE FROM models WHERE id = ?1", "model", id);
  if (status.ok()) status = impl_->DeleteRefs(id);
  return impl_->Finish(std::move(status));
}

// ---------------------------------------------------------------- blob refs

absl::StatusOr<int64_t> SqliteJobStore::CountBlobRefs(
    const std::string& sha256) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT COUNT(*) FROM blob_refs WHERE sha256 = ?1"));
  query.BindText(1, sha256);
  return ReadInt64(query, "count blob references");
}

absl::StatusOr<int64_t> SqliteJobStore::StoredBytes(const std::string& tenant) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT COALESCE(SUM(size_bytes), 0) FROM (SELECT DISTINCT "
                   "sha256, size_bytes FROM blob_refs WHERE tenant = ?1)"));
  query.BindText(1, tenant);
  return ReadInt64(query, "stored bytes");
}

absl::StatusOr<std::vector<std::pair<std::string, int64_t>>>
SqliteJobStore::StoredBytesByTenant() {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT tenant, SUM(size_bytes) FROM (SELECT DISTINCT "
                   "tenant, sha256, size_bytes FROM blob_refs) GROUP BY "
                   "tenant ORDER BY tenant"));
  std::vector<std::pair<std::string, int64_t>> out;
  while (true) {
    const int rc = query.Step();
    if (rc == SQLITE_DONE) return out;
    if (rc != SQLITE_ROW)
      return SqliteError(impl_->db, rc, "stored bytes by tenant");
    out.emplace_back(std::string(query.ColumnBlob(0)), query.ColumnInt64(1));
  }
}

absl::StatusOr<bool> SqliteJobStore::TenantHoldsBlob(
    const std::string& tenant, const std::string& sha256) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT EXISTS (SELECT 1 FROM blob_refs WHERE tenant = ?1 "
                   "AND sha256 = ?2)"));
  query.BindText(1, tenant);
  query.BindText(2, sha256);
  ZQ_ASSIGN_OR_RETURN(int64_t found, ReadInt64(query, "look up a blob"));
  return found != 0;
}

absl::StatusOr<std::vector<Holding>> SqliteJobStore::LargestHoldings(
    const std::string& tenant, int limit) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT owner, MIN(name) = '', SUM(size_bytes) AS bytes "
                   "FROM blob_refs WHERE tenant = ?1 GROUP BY owner "
                   "ORDER BY bytes DESC, owner LIMIT ?2"));
  query.BindText(1, tenant);
  query.BindInt64(2, limit);
  std::vector<Holding> out;
  while (true) {
    const int rc = query.Step();
    if (rc == SQLITE_DONE) return out;
    if (rc != SQLITE_ROW) return SqliteError(impl_->db, rc, "largest holdings");
    Holding& h = out.emplace_back();
    h.owner = std::string(query.ColumnBlob(0));
    h.is_model = query.ColumnInt64(1) != 0;
    h.bytes = query.ColumnInt64(2);
  }
}

// ---------------------------------------------------------------- jobs

absl::StatusOr<CreateJobResult> SqliteJobStore::CreateJob(
    const v1::Job& job, const std::vector<v1::JobEvent>& events,
    int max_queued) {
  if (job.id().empty())
    return absl::InvalidArgumentError("CreateJob: job id is empty");
  v1::Job numbered = job;
  std::vector<v1::JobEvent> numbered_events = events;
  store_common::NumberEvents(0, absl::Now(), numbered, numbered_events);
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(numbered, "job"));
  ZQ_ASSIGN_OR_RETURN(std::vector<std::string> event_records,
                      SerializeEvents(numbered_events));
  CreateJobResult result;
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  ZQ_RETURN_IF_ERROR(impl_->Finish(impl_->CreateJob(
      numbered, record, numbered_events, event_records, max_queued, &result)));
  return result;
}

absl::Status SqliteJobStore::UpdateJob(
    const v1::Job& job, const std::vector<v1::JobEvent>& events) {
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(job, "job"));
  ZQ_ASSIGN_OR_RETURN(std::vector<std::string> event_records,
                      SerializeEvents(events));
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  return impl_->Finish(
      impl_->WriteJob(job, record, QueueColumns(), events, event_records));
}

absl::StatusOr<v1::Job> SqliteJobStore::GetJob(const std::string& id) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(Statement query,
                      impl_->Query("SELECT record FROM jobs WHERE id = ?1"));
  query.BindText(1, id);
  return ReadRecordById<v1::Job>(impl_->db, query, "job", id);
}

absl::StatusOr<Page<v1::Job>> SqliteJobStore::ListJobs(
    const JobFilter& filter, int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int64_t before,
                      ParsePageToken(page_token, kJobTokenPrefix));
  page_size = ClampPageSize(page_size);
  const bool by_state = filter.state != v1::JOB_STATE_UNSPECIFIED;
  const bool by_model = !filter.model_id.empty();
  // One statement per filter shape (four at most), so each gets the index
  // that fits it instead of a catch-all "(?3 = 0 OR state = ?3)".
  std::string sql =
      "SELECT created_seq, record FROM jobs WHERE tenant = ?1 AND created_seq "
      "< ?2";
  if (by_state) absl::StrAppend(&sql, " AND state = ?3");
  if (by_model) absl::StrAppend(&sql, " AND model_id = ?4");
  absl::StrAppend(&sql, " ORDER BY created_seq DESC LIMIT ?5");
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(Statement query, impl_->Query(sql));
  query.BindText(1, filter.tenant);
  query.BindInt64(2, before);
  if (by_state) query.BindInt64(3, filter.state);
  if (by_model) query.BindText(4, filter.model_id);
  query.BindInt64(5, page_size + 1);
  return ReadPage<v1::Job>(query, page_size, kJobTokenPrefix, "job");
}

absl::StatusOr<std::vector<v1::Job>> SqliteJobStore::JobsInStates(
    const std::vector<v1::JobState>& states) {
  if (states.empty()) return std::vector<v1::Job>();
  std::string sql = "SELECT record FROM jobs WHERE state IN (";
  for (size_t i = 0; i < states.size(); ++i) {
    absl::StrAppend(&sql, i == 0 ? "?" : ", ?", i + 1);
  }
  absl::StrAppend(&sql, ") ORDER BY created_seq");
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(Statement query, impl_->Query(sql));
  for (size_t i = 0; i < states.size(); ++i) {
    query.BindInt64(static_cast<int>(i + 1), states[i]);
  }
  return ReadAll<v1::Job>(query, "job");
}

absl::Status SqliteJobStore::DeleteJob(const std::string& id) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  auto body = [&]() -> absl::Status {
    // Events first: they refer to the job row.
    ZQ_ASSIGN_OR_RETURN(Statement events,
                        impl_->Query("DELETE FROM events WHERE job_id = ?1"));
    events.BindText(1, id);
    const int rc = events.Step();
    if (rc != SQLITE_DONE)
      return SqliteError(impl_->db, rc, absl::StrCat("delete events of ", id));
    ZQ_RETURN_IF_ERROR(impl_->DeleteRefs(id));
    return impl_->DeleteById("DELETE FROM jobs WHERE id = ?1", "job", id);
  };
  return impl_->Finish(body());
}

absl::StatusOr<std::vector<v1::Job>> SqliteJobStore::JobsEndedBefore(
    int64_t unix_seconds, int limit) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT record FROM jobs WHERE end_unix IS NOT NULL AND "
                   "end_unix < ?1 ORDER BY end_unix LIMIT ?2"));
  query.BindInt64(1, unix_seconds);
  query.BindInt64(2, limit <= 0 ? -1 : limit);
  return ReadAll<v1::Job>(query, "job");
}

absl::StatusOr<int64_t> SqliteJobStore::CountActiveJobsForModel(
    const std::string& model_id) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(Statement query,
                      impl_->Query("SELECT COUNT(*) FROM jobs WHERE model_id = "
                                   "?1 AND state IN (?2, ?3)"));
  query.BindText(1, model_id);
  query.BindInt64(2, v1::JOB_QUEUED);
  query.BindInt64(3, v1::JOB_RUNNING);
  return ReadInt64(query, "count active jobs");
}

absl::StatusOr<int64_t> SqliteJobStore::CountJobs(v1::JobState state) {
  absl::MutexLock lock(&impl_->mu);
  if (state == v1::JOB_STATE_UNSPECIFIED) {
    ZQ_ASSIGN_OR_RETURN(Statement query,
                        impl_->Query("SELECT COUNT(*) FROM jobs"));
    return ReadInt64(query, "count jobs");
  }
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT COUNT(*) FROM jobs WHERE state = ?1"));
  query.BindInt64(1, state);
  return ReadInt64(query, "count jobs");
}

// ---------------------------------------------------------------- the queue
// One process at a time writes an SQLite file (BEGIN IMMEDIATE takes the
// write lock), so its claims need no row locks; several stores on one file
// (tests, or a second process) wait for each other on the file lock.

absl::StatusOr<std::optional<JobWrite>> SqliteJobStore::ClaimJob(
    const ClaimOptions& options, const JobEdit& start) {
  if (options.owner.empty())
    return absl::InvalidArgumentError("ClaimJob: owner is empty");
  std::optional<JobWrite> claimed;
  if (options.devices.empty()) return claimed;
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  auto body = [&]() -> absl::Status {
    const absl::Time now = absl::Now();
    ZQ_ASSIGN_OR_RETURN(
        std::optional<StoredJob> stored,
        impl_->FindClaimable(options, store_common::UnixMillis(now)));
    if (!stored.has_value()) return absl::OkStatus();
    JobChange change{stored->job, {}, absl::InfinitePast(), ""};
    ZQ_RETURN_IF_ERROR(start(change));
    ZQ_RETURN_IF_ERROR(store_common::CheckStarted(stored->job, change.job));
    QueueColumns queue;
    queue.owner = options.owner;
    queue.lease_until = store_common::UnixMillis(now + options.lease);
    ZQ_ASSIGN_OR_RETURN(JobWrite written,
                        impl_->WriteChange(*stored, change, queue));
    claimed = std::move(written);
    return absl::OkStatus();
  };
  absl::Status status = impl_->Finish(body());
  if (!status.ok()) return status;
  return claimed;
}

absl::StatusOr<JobWrite> SqliteJobStore::EditJob(const std::string& id,
                                                 const Fence* fence,
                                                 const JobEdit& edit) {
  absl::StatusOr<JobWrite> written;
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  auto body = [&]() -> absl::Status {
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        impl_->Query("SELECT record, owner FROM jobs WHERE id = ?1"));
    query.BindText(1, id);
    ZQ_ASSIGN_OR_RETURN(std::vector<StoredJob> rows,
                        impl_->ReadStoredJobs(query));
    if (rows.empty())
      return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
    const StoredJob& stored = rows[0];
    ZQ_RETURN_IF_ERROR(
        store_common::CheckFence(fence, stored.job, stored.owner));
    JobChange change{stored.job, {}, absl::InfinitePast(), stored.owner};
    ZQ_RETURN_IF_ERROR(edit(change));
    QueueColumns queue;
    queue.not_before = store_common::UnixMillis(change.not_before);
    written = impl_->WriteChange(stored, change, queue);
    return written.status();
  };
  ZQ_RETURN_IF_ERROR(impl_->Finish(body()));
  return written;
}

absl::StatusOr<std::vector<LeaseInfo>> SqliteJobStore::RenewLeases(
    const std::string& owner, absl::Duration lease) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("UPDATE jobs SET lease_until = ?2 WHERE owner = ?1 AND "
                   "state = 2 RETURNING id, attempt, cancel_requested"));
  query.BindText(1, owner);
  query.BindInt64(2, store_common::UnixMillis(absl::Now() + lease));
  std::vector<LeaseInfo> out;
  while (true) {
    const int rc = query.Step();
    if (rc == SQLITE_DONE) return out;
    if (rc != SQLITE_ROW)
      return SqliteError(impl_->db, rc,
                         absl::StrCat("renew leases of ", owner));
    LeaseInfo& info = out.emplace_back();
    info.job_id = std::string(query.ColumnBlob(0));
    info.attempt = static_cast<int32_t>(query.ColumnInt64(1));
    info.cancel_requested = query.ColumnInt64(2) != 0;
  }
}

absl::StatusOr<std::vector<JobWrite>> SqliteJobStore::ReclaimExpired(
    int limit, const JobEdit& reclaim) {
  absl::StatusOr<std::vector<JobWrite>> written;
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  auto body = [&]() -> absl::Status {
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        impl_->Query("SELECT record, owner FROM jobs WHERE "
                     "state = 2 AND lease_until < ?1 ORDER BY lease_until, "
                     "created_seq LIMIT ?2"));
    query.BindInt64(1, store_common::UnixMillis(absl::Now()));
    query.BindInt64(2, limit <= 0 ? -1 : limit);
    ZQ_ASSIGN_OR_RETURN(std::vector<StoredJob> expired,
                        impl_->ReadStoredJobs(query));
    written = impl_->Reclaim(std::move(expired), reclaim);
    return written.status();
  };
  ZQ_RETURN_IF_ERROR(impl_->Finish(body()));
  return written;
}

absl::StatusOr<std::vector<JobWrite>> SqliteJobStore::ReclaimOwned(
    const std::string& owner, const JobEdit& reclaim) {
  absl::StatusOr<std::vector<JobWrite>> written;
  absl::MutexLock lock(&impl_->mu);
  ZQ_RETURN_IF_ERROR(impl_->Begin());
  auto body = [&]() -> absl::Status {
    ZQ_ASSIGN_OR_RETURN(
        Statement query,
        impl_->Query("SELECT record, owner FROM jobs WHERE owner = ?1 AND "
                     "state = 2 ORDER BY created_seq"));
    query.BindText(1, owner);
    ZQ_ASSIGN_OR_RETURN(std::vector<StoredJob> held,
                        impl_->ReadStoredJobs(query));
    written = impl_->Reclaim(std::move(held), reclaim);
    return written.status();
  };
  ZQ_RETURN_IF_ERROR(impl_->Finish(body()));
  return written;
}

absl::Status SqliteJobStore::Listen(StoreListener* listener) {
  absl::MutexLock lock(&impl_->mu);
  if (listener == nullptr) {
    impl_->listening = false;
    return absl::OkStatus();
  }
  if (impl_->listening)
    return absl::FailedPreconditionError("Listen: the store has a listener");
  // One replica per file: there is nobody else's change to tell.
  impl_->listening = true;
  return absl::OkStatus();
}

// ---------------------------------------------------------------- events

absl::StatusOr<std::vector<v1::JobEvent>> SqliteJobStore::ListEvents(
    const std::string& job_id, int64_t after_seq, int limit) {
  absl::MutexLock lock(&impl_->mu);
  ZQ_ASSIGN_OR_RETURN(
      Statement query,
      impl_->Query("SELECT record FROM events WHERE job_id = ?1 AND seq > ?2 "
                   "ORDER BY seq LIMIT ?3"));
  query.BindText(1, job_id);
  query.BindInt64(2, after_seq);
  query.BindInt64(3, limit <= 0 ? -1 : limit);  // LIMIT -1: no limit
  return ReadAll<v1::JobEvent>(query, "job event");
}

}  // namespace zeroq::server
