#include "server/pg_job_store.h"

#include <libpq-fe.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <pqxx/pqxx>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "server/job_store_common.h"
#include "server/log.h"

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

// Held by every migration transaction (pg_advisory_xact_lock, released at
// commit or rollback): replicas starting together would otherwise all read
// version N and all run migration N + 1. Advisory locks are per database;
// nothing else in a ZeroQ database takes this key ("ZeroQ" in ASCII).
constexpr int64_t kMigrationLockKey = 0x5a65726f51;

// Without a connect_timeout, a connection to a host that drops packets waits
// for the system's TCP timeout (minutes), and so would the RPC.
constexpr absl::string_view kDefaultConnectTimeoutSeconds = "10";

// A conflict between concurrent transactions (serialization failure,
// deadlock) is retried this many times in all before it is reported.
constexpr int kConflictAttempts = 3;

// LIMIT for "no limit" (PostgreSQL has no LIMIT -1).
constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

// Per-tenant advisory locks are two-key locks (class, hashtext(tenant)), a
// key space apart from the migration's one-key lock. One class serialises
// the queued-jobs count of CreateJob, the other the running-jobs count of
// ClaimJob, so that a submission never makes a claim skip the tenant. Two
// tenants whose names hash alike merely share a lock.
constexpr int kQueuedLockClass = 0x5a5101;
constexpr int kRunningLockClass = 0x5a5102;

// ClaimJob reads this many candidates at a time.
constexpr int kClaimBatch = 64;

// What Listen's connection LISTENs on, and what writes NOTIFY.
constexpr char kEventsChannel[] = "zeroq_events";
constexpr char kQueueChannel[] = "zeroq_queue";
constexpr char kCancelChannel[] = "zeroq_cancel";

// Listen's connection: how long one wait for notifications lasts (what a
// destructor may wait for the thread), how long a quiet connection goes
// before a query checks it is alive (a dropped TCP connection says nothing
// until written to), and the backoff between attempts to connect again.
constexpr long kListenWaitMicros = 200000;
constexpr absl::Duration kListenProbeInterval = absl::Seconds(10);
constexpr absl::Duration kListenMinBackoff = absl::Milliseconds(250);
constexpr absl::Duration kListenMaxBackoff = absl::Seconds(2);

// Messages the server sends outside a query's result (notices, warnings,
// the FATAL that ends a terminated session) arrive here; pqxx would print
// them on stderr. Notices are dropped; the rest goes to the server's log.
class NoticeLog : public pqxx::errorhandler {
 public:
  explicit NoticeLog(pqxx::connection_base& connection)
      : pqxx::errorhandler(connection) {}

  bool operator()(const char message[]) noexcept override {
    try {
      const absl::string_view text =
          absl::StripTrailingAsciiWhitespace(message);
      for (absl::string_view quiet : {"NOTICE:", "INFO:", "DEBUG", "LOG:"}) {
        if (absl::StartsWith(text, quiet)) return false;
      }
      LogWarning({}, absl::StrCat("postgresql: ", text));
    } catch (...) {
      // Nothing may leave a notice handler; a lost warning is harmless.
    }
    return false;
  }
};

// One connection of the pool, with the statements prepared on it so far.
class Connection {
 public:
  explicit Connection(const std::string& uri)
      : connection_(uri), notices_(connection_) {}

  pqxx::connection& connection() { return connection_; }

  // The name under which `sql` is prepared on this connection; registered on
  // first use. The server plans each statement once per connection.
  const std::string& Prepared(const std::string& sql) {
    auto it = prepared_.find(sql);
    if (it == prepared_.end()) {
      std::string name = absl::StrCat("zq", prepared_.size());
      connection_.prepare(name, sql);
      it = prepared_.emplace(sql, std::move(name)).first;
    }
    return it->second;
  }

 private:
  pqxx::connection connection_;
  NoticeLog notices_;  // after connection_: unregisters before it closes
  absl::flat_hash_map<std::string, std::string> prepared_;
};

// A transaction in progress: what the bodies of the store's methods see.
class Tx {
 public:
  Tx(Connection* connection, pqxx::transaction_base* txn)
      : connection_(connection), txn_(txn) {}

  // Runs the prepared form of `sql` with these parameters ($1, $2, ...).
  template <typename... Args>
  pqxx::result Exec(const std::string& sql, Args&&... args) {
    return txn_->exec_prepared(connection_->Prepared(sql),
                               std::forward<Args>(args)...);
  }
  // Runs statements separated by semicolons, without parameters
  // (migrations).
  pqxx::result ExecScript(const std::string& sql) { return txn_->exec(sql); }

 private:
  Connection* connection_;
  pqxx::transaction_base* txn_;
};

// libpq passes text parameters as C strings, and PostgreSQL's text holds
// neither NUL nor (in a UTF8 database) invalid UTF-8. SQLite keeps such
// strings; here a key that cannot be stored cannot exist either, so lookups
// find nothing and writes are refused, rather than a truncated key matching
// another row.
bool Storable(absl::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == 0) return false;
    if (c < 0x80) {
      ++i;
      continue;
    }
    int length = 0;
    uint32_t code = 0;
    if ((c & 0xe0) == 0xc0) {
      length = 2;
      code = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      length = 3;
      code = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      length = 4;
      code = c & 0x07;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;
    for (int k = 1; k < length; ++k) {
      const unsigned char next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xc0) != 0x80) return false;
      code = (code << 6) | (next & 0x3f);
    }
    // Overlong forms, surrogates and code points past Unicode.
    static constexpr uint32_t kMinimum[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < kMinimum[length] || code > 0x10ffff ||
        (code >= 0xd800 && code <= 0xdfff)) {
      return false;
    }
    i += length;
  }
  return true;
}

bool AllStorable(std::initializer_list<absl::string_view> texts) {
  for (absl::string_view text : texts) {
    if (!Storable(text)) return false;
  }
  return true;
}

absl::Status CheckStorable(
    absl::string_view what,
    std::initializer_list<std::pair<absl::string_view, absl::string_view>>
        fields) {
  for (const auto& [name, value] : fields) {
    if (!Storable(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": ", name,
                       " holds a NUL byte or invalid UTF-8, which the "
                       "PostgreSQL store cannot keep"));
    }
  }
  return absl::OkStatus();
}

// An exception's text on one line: libpq and the server end lines, and
// continue them with DETAIL or HINT lines.
std::string OneLine(const char* text) {
  std::string out;
  bool blank = false;
  for (const char* p = text; *p != '\0'; ++p) {
    if (absl::ascii_isspace(static_cast<unsigned char>(*p))) {
      blank = true;
      continue;
    }
    if (blank && !out.empty()) out += ' ';
    blank = false;
    out += *p;
  }
  return out;
}

// SQLSTATE classes of a lost connection: 08 (connection exception) and the
// server going away (57P01 terminated by an administrator, 57P02 crash of
// another backend, 57P03 not yet accepting connections).
bool IsConnectionLoss(const std::string& sqlstate) {
  return absl::StartsWith(sqlstate, "08") || sqlstate == "57P01" ||
         sqlstate == "57P02" || sqlstate == "57P03";
}

// Serialization failure, deadlock: another transaction won; the same
// transaction may well succeed when run again.
bool IsConflict(const std::string& sqlstate) {
  return sqlstate == "40001" || sqlstate == "40P01";
}

absl::Status PgError(const pqxx::sql_error& e, absl::string_view context) {
  return absl::InternalError(absl::StrCat(context, ": postgresql error ",
                                          e.sqlstate(), " (", OneLine(e.what()),
                                          ")"));
}

pqxx::binarystring Bytes(const std::string& bytes) {
  return pqxx::binarystring(bytes);
}

template <typename Message>
absl::Status ParseField(const pqxx::field& field, absl::string_view what,
                        Message* out) {
  const pqxx::binarystring bytes(field);
  return ParseRecord(absl::string_view(bytes.get(), bytes.size()), what, out);
}

// Every row's column `column` as a record.
template <typename Message>
absl::Status ReadAll(const pqxx::result& rows, int column,
                     absl::string_view what, std::vector<Message>* out) {
  out->reserve(out->size() + rows.size());
  for (const pqxx::row& row : rows) {
    ZQ_RETURN_IF_ERROR(ParseField(row[column], what, &out->emplace_back()));
  }
  return absl::OkStatus();
}

// Rows of (created_seq, record), newest first, fetched with LIMIT
// page_size + 1 so that a full last page does not promise another.
template <typename Message>
absl::Status ReadPage(const pqxx::result& rows, int page_size,
                      absl::string_view token_prefix, absl::string_view what,
                      Page<Message>* page) {
  int64_t last_seq = 0;
  for (const pqxx::row& row : rows) {
    if (static_cast<int>(page->items.size()) == page_size) {
      page->next_page_token = absl::StrCat(token_prefix, last_seq);
      break;
    }
    last_seq = row[0].as<int64_t>();
    ZQ_RETURN_IF_ERROR(ParseField(row[1], what, &page->items.emplace_back()));
  }
  return absl::OkStatus();
}

// blob_refs rows: one per model (name '') and per artifact of a succeeded
// job. An upsert, as SQLite's INSERT OR REPLACE.
constexpr const char* kInsertRef =
    "INSERT INTO blob_refs (owner, name, tenant, sha256, size_bytes) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, name) DO UPDATE SET "
    "tenant = excluded.tenant, sha256 = excluded.sha256, "
    "size_bytes = excluded.size_bytes";

void InsertModelRef(Tx& tx, const v1::Model& model) {
  tx.Exec(kInsertRef, model.id(), "", model.tenant(), model.sha256(),
          model.size_bytes());
}

void InsertJobRefs(Tx& tx, const v1::Job& job) {
  for (const v1::Artifact& a : job.result().artifacts()) {
    if (a.sha256().empty()) continue;
    tx.Exec(kInsertRef, job.id(), a.name(), job.tenant(), a.sha256(),
            a.size_bytes());
  }
}

absl::Status CheckJobRefs(const v1::Job& job) {
  for (const v1::Artifact& a : job.result().artifacts()) {
    if (a.sha256().empty()) continue;
    ZQ_RETURN_IF_ERROR(CheckStorable(
        absl::StrCat("job ", job.id()),
        {{"artifact name", a.name()}, {"artifact sha256", a.sha256()}}));
  }
  return absl::OkStatus();
}

struct Migration {
  int version;
  const char* sql;
  // Fills what SQL alone cannot (columns from the protobuf records); runs
  // after `sql` in the same transaction. May be null.
  absl::Status (*backfill)(Tx& tx);
};

absl::Status BackfillVersion2(Tx& tx) {
  std::vector<v1::Model> models;
  ZQ_RETURN_IF_ERROR(
      ReadAll(tx.Exec("SELECT record FROM models"), 0, "model", &models));
  for (const v1::Model& m : models) InsertModelRef(tx, m);
  std::vector<v1::Job> ended;
  ZQ_RETURN_IF_ERROR(
      ReadAll(tx.Exec("SELECT record FROM jobs WHERE state IN ($1, $2, $3)",
                      static_cast<int>(v1::JOB_SUCCEEDED),
                      static_cast<int>(v1::JOB_FAILED),
                      static_cast<int>(v1::JOB_CANCELLED)),
              0, "job", &ended));
  for (const v1::Job& job : ended) {
    InsertJobRefs(tx, job);
    tx.Exec("UPDATE jobs SET end_unix = $2 WHERE id = $1", job.id(),
            EndUnix(job));
  }
  return absl::OkStatus();
}

absl::Status BackfillVersion3(Tx& tx) {
  std::vector<v1::Job> jobs;
  ZQ_RETURN_IF_ERROR(
      ReadAll(tx.Exec("SELECT record FROM jobs"), 0, "job", &jobs));
  for (const v1::Job& job : jobs) {
    tx.Exec(
        "UPDATE jobs SET priority = $2, device = $3, attempt = $4, "
        "cancel_requested = $5 WHERE id = $1",
        job.id(), job.priority(), static_cast<int>(job.device_preference()),
        job.attempts(), job.cancel_requested());
  }
  return absl::OkStatus();
}

// Append only, as SQLite's: a released migration never changes. The same
// tables, columns and indexes as SQLite's schema of the same version, with
// PostgreSQL's types:
//  - created_seq is an identity column (a sequence): like AUTOINCREMENT it
//    never hands out a number twice, deleted rows' included, so page tokens
//    stay meaningful;
//  - text columns compare bytewise (COLLATE "C"), as SQLite's do, so that
//    orderings by tenant or owner do not depend on the database's locale;
//  - records are BYTEA.
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE TABLE models (
  created_seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT COLLATE "C" NOT NULL UNIQUE,
  tenant TEXT COLLATE "C" NOT NULL,
  sha256 TEXT COLLATE "C" NOT NULL,
  state INTEGER NOT NULL,
  record BYTEA NOT NULL
);
CREATE INDEX models_by_tenant ON models (tenant, created_seq);
CREATE INDEX models_by_state ON models (state, created_seq);
CREATE INDEX models_by_sha256 ON models (sha256);

CREATE TABLE jobs (
  created_seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT COLLATE "C" NOT NULL UNIQUE,
  tenant TEXT COLLATE "C" NOT NULL,
  model_id TEXT COLLATE "C" NOT NULL,
  state INTEGER NOT NULL,
  request_id TEXT COLLATE "C" NOT NULL,
  record BYTEA NOT NULL
);
CREATE UNIQUE INDEX jobs_by_request_id ON jobs (tenant, request_id)
  WHERE request_id <> '';
CREATE INDEX jobs_by_tenant ON jobs (tenant, created_seq);
CREATE INDEX jobs_by_tenant_state ON jobs (tenant, state, created_seq);
CREATE INDEX jobs_by_model ON jobs (model_id, state);
CREATE INDEX jobs_by_state ON jobs (state, created_seq);

CREATE TABLE events (
  job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs (id),
  seq BIGINT NOT NULL,
  record BYTEA NOT NULL,
  PRIMARY KEY (job_id, seq)
);
)sql",
     nullptr},
    // Blob references and the end time, as SQLite's version 2.
    {2, R"sql(
CREATE TABLE blob_refs (
  owner TEXT COLLATE "C" NOT NULL,
  name TEXT COLLATE "C" NOT NULL,
  tenant TEXT COLLATE "C" NOT NULL,
  sha256 TEXT COLLATE "C" NOT NULL,
  size_bytes BIGINT NOT NULL,
  PRIMARY KEY (owner, name)
);
CREATE INDEX blob_refs_by_sha256 ON blob_refs (sha256);
CREATE INDEX blob_refs_by_tenant ON blob_refs (tenant, sha256);
ALTER TABLE jobs ADD COLUMN end_unix BIGINT;
CREATE INDEX jobs_by_end ON jobs (end_unix) WHERE end_unix IS NOT NULL;
)sql",
     BackfillVersion2},
    // The queue, as SQLite's version 3; lease_until is the database's time
    // (now()), so that the replicas' clocks do not matter.
    {3, R"sql(
ALTER TABLE jobs
  ADD COLUMN priority INTEGER NOT NULL DEFAULT 0,
  ADD COLUMN device INTEGER NOT NULL DEFAULT 0,
  ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0,
  ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false,
  ADD COLUMN owner TEXT COLLATE "C",
  ADD COLUMN lease_until TIMESTAMPTZ,
  ADD COLUMN not_before BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_queue ON jobs (state, priority DESC, created_seq);
CREATE INDEX jobs_running_by_owner ON jobs (owner) WHERE state = 2;
UPDATE jobs SET lease_until = TIMESTAMPTZ 'epoch' WHERE state = 2;
)sql",
     BackfillVersion3},
};

static_assert(kMigrations[std::size(kMigrations) - 1].version ==
                  PostgresJobStore::kSchemaVersion,
              "kSchemaVersion must be the last migration's version");
// The schema's indexes and the queue's statements name these states by
// number, as SQLite's do.
static_assert(v1::JOB_QUEUED == 1 && v1::JOB_RUNNING == 2,
              "the queue's SQL names JOB_QUEUED as 1 and JOB_RUNNING as 2");

// A PostgreSQL array literal ({"a","b"}) of these texts, for an array
// parameter ($1::TEXT[]).
std::string TextArray(const absl::flat_hash_set<std::string>& texts) {
  std::string out = "{";
  for (const std::string& text : texts) {
    if (out.size() > 1) out += ',';
    out += '"';
    for (char c : text) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  out += '}';
  return out;
}

std::string DeviceArray(const std::vector<v1::DeviceKind>& devices) {
  return absl::StrCat("{",
                      absl::StrJoin(devices, ",",
                                    [](std::string* out, v1::DeviceKind d) {
                                      absl::StrAppend(out, static_cast<int>(d));
                                    }),
                      "}");
}

// Where a write leaves a job's queue-only columns. Unset fields keep what
// the row holds as far as the job's new state allows: only a RUNNING job
// has an owner and a lease, only a QUEUED one a not_before.
struct QueueColumns {
  std::optional<std::string> owner;
  std::optional<int64_t> lease_ms;    // a lease from now()
  std::optional<int64_t> not_before;  // unix ms
};

// A job row as the queue methods read it (columns record, owner).
struct StoredJob {
  v1::Job job;
  std::string owner;  // "" when none
};

absl::Status ReadStoredJobs(const pqxx::result& rows,
                            std::vector<StoredJob>* out) {
  out->clear();
  for (const pqxx::row& row : rows) {
    StoredJob& stored = out->emplace_back();
    ZQ_RETURN_IF_ERROR(ParseField(row[0], "job", &stored.job));
    stored.owner = row[1].c_str();  // libpq gives NULL as ""
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<pqxx::binarystring>> SerializeEvents(
    const std::vector<v1::JobEvent>& events) {
  std::vector<pqxx::binarystring> records;
  records.reserve(events.size());
  for (const v1::JobEvent& event : events) {
    ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(event, "job event"));
    records.push_back(Bytes(record));
  }
  return records;
}

absl::Status CheckJobText(const v1::Job& job) {
  ZQ_RETURN_IF_ERROR(CheckStorable(absl::StrCat("job ", job.id()),
                                   {{"tenant", job.tenant()},
                                    {"model_id", job.model_id()},
                                    {"request_id", job.request_id()}}));
  if (IsTerminal(job.state())) ZQ_RETURN_IF_ERROR(CheckJobRefs(job));
  return absl::OkStatus();
}

absl::Status InsertEvents(Tx& tx, const std::string& job_id,
                          const std::vector<v1::JobEvent>& events,
                          const std::vector<pqxx::binarystring>& records) {
  for (size_t i = 0; i < events.size(); ++i) {
    try {
      tx.Exec("INSERT INTO events (job_id, seq, record) VALUES ($1, $2, $3)",
              job_id, events[i].seq(), records[i]);
    } catch (const pqxx::unique_violation&) {
      return absl::AlreadyExistsError(absl::StrCat(
          "job ", job_id, " already has an event with seq ", events[i].seq()));
    }
  }
  if (!events.empty()) {
    tx.Exec("SELECT pg_notify($1, $2)", kEventsChannel, job_id);
  }
  return absl::OkStatus();
}

// Replaces the job's row (by id) and appends `events`: the body of
// UpdateJob, and the write of every queue method. Tells listeners of the
// events and of a QUEUED job (committed with the write, or not at all).
absl::Status WriteJob(Tx& tx, const v1::Job& job, const std::string& record,
                      const QueueColumns& queue,
                      const std::vector<v1::JobEvent>& events,
                      const std::vector<pqxx::binarystring>& event_records) {
  const bool terminal = IsTerminal(job.state());
  // NULL for an unset value: pqxx passes a null char pointer as NULL.
  const std::string end_text = terminal ? absl::StrCat(EndUnix(job)) : "";
  const std::string lease_text =
      queue.lease_ms.has_value() ? absl::StrCat(*queue.lease_ms) : "";
  const std::string not_before_text =
      queue.not_before.has_value() ? absl::StrCat(*queue.not_before) : "";
  try {
    // Every column mirrors the record, so a listing by tenant or request id
    // (or the claim's order) always agrees with what GetJob returns.
    const pqxx::result updated = tx.Exec(
        "UPDATE jobs SET tenant = $2, model_id = $3, state = $4, "
        "request_id = $5, record = $6, end_unix = $7, priority = $8, "
        "device = $9, attempt = $10, cancel_requested = $11, "
        "owner = CASE WHEN $4 = 2 THEN COALESCE($12, owner) END, "
        "lease_until = CASE WHEN $4 = 2 THEN COALESCE(now() + "
        "$13::DOUBLE PRECISION * INTERVAL '1 millisecond', lease_until) END, "
        "not_before = CASE WHEN $4 = 1 THEN COALESCE($14, not_before) "
        "ELSE 0 END WHERE id = $1",
        job.id(), job.tenant(), job.model_id(), static_cast<int>(job.state()),
        job.request_id(), Bytes(record), terminal ? end_text.c_str() : nullptr,
        job.priority(), static_cast<int>(job.device_preference()),
        job.attempts(), job.cancel_requested(),
        queue.owner.has_value() ? queue.owner->c_str() : nullptr,
        queue.lease_ms.has_value() ? lease_text.c_str() : nullptr,
        queue.not_before.has_value() ? not_before_text.c_str() : nullptr);
    if (updated.affected_rows() == 0) {
      return absl::NotFoundError(absl::StrCat("job ", job.id(), " not found"));
    }
  } catch (const pqxx::unique_violation&) {
    return absl::AlreadyExistsError(absl::StrCat(
        "job ", job.id(), ": tenant ", job.tenant(),
        " already has another job with request id ", job.request_id()));
  }
  if (terminal) {
    // Only a terminal record can carry artifacts; progress updates (the
    // many) skip this.
    tx.Exec("DELETE FROM blob_refs WHERE owner = $1", job.id());
    InsertJobRefs(tx, job);
  }
  ZQ_RETURN_IF_ERROR(InsertEvents(tx, job.id(), events, event_records));
  if (job.state() == v1::JOB_QUEUED) {
    tx.Exec("SELECT pg_notify($1, '')", kQueueChannel);
  }
  return absl::OkStatus();
}

// Numbers the change's events after the stored record's, and writes the
// record and the events (see WriteJob); a cancel newly asked of a RUNNING
// job is told to listeners too.
absl::StatusOr<JobWrite> WriteChange(Tx& tx, const StoredJob& stored,
                                     JobChange& change,
                                     const QueueColumns& queue) {
  ZQ_RETURN_IF_ERROR(store_common::CheckSameJob(stored.job.id(), change.job));
  ZQ_RETURN_IF_ERROR(CheckJobText(change.job));
  store_common::NumberEvents(stored.job.last_seq(), absl::Now(), change.job,
                             change.events);
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(change.job, "job"));
  ZQ_ASSIGN_OR_RETURN(std::vector<pqxx::binarystring> event_records,
                      SerializeEvents(change.events));
  ZQ_RETURN_IF_ERROR(
      WriteJob(tx, change.job, record, queue, change.events, event_records));
  if (change.job.state() == v1::JOB_RUNNING && change.job.cancel_requested() &&
      !stored.job.cancel_requested()) {
    tx.Exec("SELECT pg_notify($1, $2)", kCancelChannel, change.job.id());
  }
  return JobWrite{change.job, change.events};
}

// Applies `reclaim` to each of `jobs` (RUNNING, locked by this transaction)
// and writes them back without owner or lease.
absl::Status Reclaim(Tx& tx, const std::vector<StoredJob>& jobs,
                     const JobEdit& reclaim, std::vector<JobWrite>* out) {
  out->clear();
  for (const StoredJob& stored : jobs) {
    JobChange change{stored.job, {}, absl::InfinitePast(), stored.owner};
    ZQ_RETURN_IF_ERROR(reclaim(change));
    ZQ_RETURN_IF_ERROR(store_common::CheckReclaimed(change.job));
    QueueColumns queue;
    queue.not_before = store_common::UnixMillis(change.not_before);
    ZQ_ASSIGN_OR_RETURN(JobWrite written,
                        WriteChange(tx, stored, change, queue));
    out->push_back(std::move(written));
  }
  return absl::OkStatus();
}

// Calls `on` with each notification's payload on one channel.
class Receiver : public pqxx::notification_receiver {
 public:
  Receiver(pqxx::connection_base& connection, const std::string& channel,
           std::function<void(const std::string&)> on)
      : pqxx::notification_receiver(connection, channel), on_(std::move(on)) {}

  void operator()(const std::string& payload, int) override { on_(payload); }

 private:
  std::function<void(const std::string&)> on_;
};

// The schema version, from the one-row table zeroq_schema_version of the
// current schema, which is created (at version 0) in an empty database.
absl::StatusOr<int64_t> SchemaVersion(Tx& tx) {
  const bool exists =
      tx.Exec(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = "
            "current_schema() AND tablename = 'zeroq_schema_version')")[0][0]
          .as<bool>();
  if (!exists) {
    tx.ExecScript(
        "CREATE TABLE zeroq_schema_version (version INTEGER NOT NULL); "
        "INSERT INTO zeroq_schema_version (version) VALUES (0)");
  }
  const pqxx::result rows = tx.Exec("SELECT version FROM zeroq_schema_version");
  if (rows.size() != 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("zeroq_schema_version holds ", rows.size(),
                     " rows instead of one; the database was changed by hand"));
  }
  return rows[0][0].as<int64_t>();
}

// Where a URI's passwords are: the user part's (user:PASSWORD@) and password=
// parameters', as [begin, end) offsets.
std::vector<std::pair<size_t, size_t>> PasswordSpans(absl::string_view uri) {
  std::vector<std::pair<size_t, size_t>> spans;
  const size_t scheme = uri.find("://");
  if (scheme == absl::string_view::npos) return spans;
  const size_t authority = scheme + 3;
  // libpq ends the user part at the first '@' before the path's '/'; the
  // last '@' before it also covers an unencoded '@' in a password.
  size_t path = uri.find('/', authority);
  if (path == absl::string_view::npos) path = uri.size();
  const size_t at = uri.substr(0, path).rfind('@');
  size_t rest = authority;
  if (at != absl::string_view::npos && at >= authority) {
    const size_t colon = uri.find(':', authority);
    if (colon < at) spans.emplace_back(colon + 1, at);
    rest = at + 1;
  }
  size_t param = uri.find('?', rest);
  while (param != absl::string_view::npos) {
    const size_t begin = param + 1;
    size_t end = uri.find('&', begin);
    if (end == absl::string_view::npos) end = uri.size();
    const absl::string_view pair = uri.substr(begin, end - begin);
    if (absl::StartsWith(pair, "password=")) {
      spans.emplace_back(begin + 9, end);
    }
    param = end < uri.size() ? end : absl::string_view::npos;
  }
  return spans;
}

// `text` with every password of `uri` in it replaced: libpq's messages about
// a malformed URI may quote pieces of it.
std::string ScrubPasswords(absl::string_view uri, std::string text) {
  for (const auto& [begin, end] : PasswordSpans(uri)) {
    if (end > begin) {
      absl::StrReplaceAll({{uri.substr(begin, end - begin), "***"}}, &text);
    }
  }
  return text;
}

}  // namespace

std::string RedactPostgresUri(absl::string_view uri) {
  std::string out;
  size_t copied = 0;
  for (const auto& [begin, end] : PasswordSpans(uri)) {
    absl::StrAppend(&out, uri.substr(copied, begin - copied), "***");
    copied = end;
  }
  absl::StrAppend(&out, uri.substr(copied));
  return out;
}

bool IsPostgresUri(absl::string_view uri) {
  return absl::StartsWith(uri, "postgresql://") ||
         absl::StartsWith(uri, "postgres://");
}

struct PostgresJobStore::Impl {
  // A connection taken from the pool; back into it when the lease ends,
  // unless Discard()ed.
  class Lease {
   public:
    Lease(Impl* impl, std::unique_ptr<Connection> connection, bool reused)
        : impl_(impl), connection_(std::move(connection)), reused_(reused) {}
    Lease(Lease&& other) noexcept = default;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (connection_ != nullptr) impl_->Release(std::move(connection_));
    }

    Connection* connection() const { return connection_.get(); }
    // Whether it had served an earlier call (and so may have gone stale).
    bool reused() const { return reused_; }
    // Closes the connection instead of returning it: it broke.
    void Discard() {
      impl_->Forget();
      connection_.reset();
    }

   private:
    Impl* impl_;
    std::unique_ptr<Connection> connection_;
    bool reused_;
  };

  absl::StatusOr<std::unique_ptr<Connection>> Connect() {
    try {
      return std::make_unique<Connection>(connect_uri);
    } catch (const std::exception& e) {
      // A refused login or an unknown database too: nothing in this call
      // can change that, and a later one may succeed.
      return absl::UnavailableError(
          absl::StrCat("cannot connect to ", display, ": ",
                       ScrubPasswords(connect_uri, OneLine(e.what()))));
    }
  }

  bool CanAcquire() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return !idle.empty() || open < PostgresJobStore::kMaxConnections;
  }

  // An idle connection (the most recently used: likely still warm), else a
  // new one while fewer than kMaxConnections are open, else waits.
  absl::StatusOr<Lease> Acquire() {
    {
      absl::MutexLock lock(&mu);
      mu.Await(absl::Condition(this, &Impl::CanAcquire));
      if (!idle.empty()) {
        std::unique_ptr<Connection> connection = std::move(idle.back());
        idle.pop_back();
        return Lease(this, std::move(connection), /*reused=*/true);
      }
      ++open;
    }
    // Connecting takes a round trip or more; others may use the pool
    // meanwhile.
    absl::StatusOr<std::unique_ptr<Connection>> connection = Connect();
    if (!connection.ok()) {
      Forget();
      return connection.status();
    }
    return Lease(this, *std::move(connection), /*reused=*/false);
  }

  void Release(std::unique_ptr<Connection> connection) {
    if (!connection->connection().is_open()) {
      Forget();
      return;
    }
    absl::MutexLock lock(&mu);
    idle.push_back(std::move(connection));
  }

  void Forget() {
    absl::MutexLock lock(&mu);
    --open;
  }

  // After one pooled connection turned out broken, the others most likely
  // are too (the server restarted): close them all.
  void DropIdle() {
    std::vector<std::unique_ptr<Connection>> stale;
    {
      absl::MutexLock lock(&mu);
      stale.swap(idle);
      open -= static_cast<int>(stale.size());
    }
  }

  // Runs `body` in a transaction of type Txn (pqxx::work: BEGIN ... COMMIT;
  // pqxx::nontransaction: one statement on its own, for reads), commits when
  // it returns OK and rolls back otherwise. Errors of the database become
  // statuses: UNAVAILABLE for a lost or impossible connection, INTERNAL for
  // the rest, with `what` as the context.
  template <typename Txn>
  absl::Status Run(absl::string_view what,
                   absl::FunctionRef<absl::Status(Tx&)> body) {
    int conflicts = 0;
    bool replaced_stale = false;
    while (true) {
      ZQ_ASSIGN_OR_RETURN(Lease lease, Acquire());
      bool committing = false;
      // A connection that broke before COMMIT was sent committed nothing:
      // the call may run again on a new one. One that had been idle in the
      // pool gets that chance once; a new one failing means the database is
      // unreachable now.
      auto lost = [&]() -> bool {
        lease.Discard();
        if (committing || !lease.reused() || replaced_stale) return false;
        replaced_stale = true;
        DropIdle();
        return true;
      };
      try {
        Txn txn(lease.connection()->connection());
        Tx tx(lease.connection(), &txn);
        absl::Status status = body(tx);
        if (!status.ok()) return status;  // ~Txn rolls back
        committing = true;
        txn.commit();
        return status;
      } catch (const pqxx::in_doubt_error& e) {
        lease.Discard();
        return absl::UnavailableError(
            absl::StrCat(what, ": the connection to ", display,
                         " was lost while committing; the outcome is unknown"));
      } catch (const pqxx::broken_connection& e) {
        if (lost()) continue;
        return absl::UnavailableError(
            absl::StrCat(what, ": lost the connection to ", display, ": ",
                         ScrubPasswords(connect_uri, OneLine(e.what()))));
      } catch (const pqxx::sql_error& e) {
        if (IsConnectionLoss(e.sqlstate())) {
          if (lost()) continue;
          return absl::UnavailableError(
              absl::StrCat(what, ": lost the connection to ", display, ": ",
                           OneLine(e.what())));
        }
        if (!committing && IsConflict(e.sqlstate()) &&
            ++conflicts < kConflictAttempts) {
          continue;
        }
        if (IsConflict(e.sqlstate())) {
          return absl::AbortedError(
              absl::StrCat(what, ": conflicting concurrent writes (",
                           OneLine(e.what()), "); try again"));
        }
        return PgError(e, what);
      } catch (const std::exception& e) {
        return absl::InternalError(
            absl::StrCat(what, ": postgresql: ", OneLine(e.what())));
      }
    }
  }

  absl::Status Read(absl::string_view what,
                    absl::FunctionRef<absl::Status(Tx&)> body) {
    return Run<pqxx::nontransaction>(what, body);
  }
  absl::Status Write(absl::string_view what,
                     absl::FunctionRef<absl::Status(Tx&)> body) {
    return Run<pqxx::work>(what, body);
  }

  absl::Status Migrate() {
    for (const Migration& migration : kMigrations) {
      ZQ_RETURN_IF_ERROR(Write("schema migration", [&](Tx& tx) -> absl::Status {
        tx.Exec("SELECT pg_advisory_xact_lock($1)", kMigrationLockKey);
        // Read under the lock: another replica may have migrated since.
        ZQ_ASSIGN_OR_RETURN(int64_t version, SchemaVersion(tx));
        // Before anything changes: a newer server's database stays as it is.
        if (version > kSchemaVersion) {
          return absl::FailedPreconditionError(
              absl::StrCat(display, " has schema version ", version,
                           ", newer than this server's ", kSchemaVersion,
                           "; it was written by a newer ZeroQ server"));
        }
        if (version >= migration.version) return absl::OkStatus();
        try {
          tx.ExecScript(migration.sql);
        } catch (const pqxx::sql_error& e) {
          if (IsConnectionLoss(e.sqlstate())) throw;
          return absl::InternalError(
              absl::StrCat("schema migration to version ", migration.version,
                           " failed: ", OneLine(e.what())));
        }
        if (migration.backfill != nullptr) {
          ZQ_RETURN_IF_ERROR(migration.backfill(tx));
        }
        tx.Exec("UPDATE zeroq_schema_version SET version = $1",
                migration.version);
        return absl::OkStatus();
      }));
    }
    return Read("read schema version", [&](Tx& tx) -> absl::Status {
      ZQ_ASSIGN_OR_RETURN(int64_t version, SchemaVersion(tx));
      schema_version = static_cast<int>(version);
      return absl::OkStatus();
    });
  }

  // Runs a DELETE of the row with id $1; NOT_FOUND when there was none.
  static absl::Status DeleteById(Tx& tx, const std::string& sql,
                                 absl::string_view what,
                                 const std::string& id) {
    if (tx.Exec(sql, id).affected_rows() == 0)
      return absl::NotFoundError(absl::StrCat(what, " ", id, " not found"));
    return absl::OkStatus();
  }

  // The record of the one row `rows` holds: NOT_FOUND when none.
  template <typename T>
  static absl::StatusOr<T> OneRecord(const pqxx::result& rows,
                                     absl::string_view what,
                                     const std::string& id) {
    if (rows.empty())
      return absl::NotFoundError(absl::StrCat(what, " ", id, " not found"));
    T record;
    ZQ_RETURN_IF_ERROR(ParseField(rows[0][0], what, &record));
    return record;
  }

  bool Stopping() {
    absl::MutexLock lock(&listen_mu);
    return stopping;
  }

  // Tells Listen that the first attempt to listen is over (either way).
  void FirstAttemptDone() {
    absl::MutexLock lock(&listen_mu);
    first_attempt_done = true;
  }

  // Listen's thread: LISTENs on its own connection and tells `listener`
  // until the store goes; after a lost connection, connects again with
  // backoff.
  void ListenLoop(StoreListener* listener) {
    absl::Duration backoff = kListenMinBackoff;
    bool listening = false;
    bool told = false;  // whether OnListening was called at all
    while (!Stopping()) {
      std::string error;
      try {
        pqxx::connection connection(connect_uri);
        NoticeLog notices(connection);
        // Registering a receiver LISTENs on its channel. After them: they
        // UNLISTEN on destruction.
        Receiver events(connection, kEventsChannel,
                        [listener](const std::string& job_id) {
                          listener->OnJobEvents(job_id);
                        });
        Receiver queued(
            connection, kQueueChannel,
            [listener](const std::string&) { listener->OnJobQueued(); });
        Receiver cancel(connection, kCancelChannel,
                        [listener](const std::string& job_id) {
                          listener->OnCancelRequested(job_id);
                        });
        listening = told = true;
        listener->OnListening(true);
        FirstAttemptDone();
        backoff = kListenMinBackoff;
        absl::Time heard = absl::Now();
        while (!Stopping()) {
          if (connection.await_notification(0, kListenWaitMicros) > 0) {
            heard = absl::Now();
          }
          // Checked before pqxx touches the connection again: it would
          // quietly open a new one, and the notifications in between would
          // be lost unsaid.
          if (!connection.is_open()) {
            throw pqxx::broken_connection("the connection closed");
          }
          if (absl::Now() - heard > kListenProbeInterval) {
            pqxx::nontransaction probe(connection);
            probe.exec("SELECT 1");
            heard = absl::Now();
          }
        }
        return;
      } catch (const std::exception& e) {
        error = ScrubPasswords(connect_uri, OneLine(e.what()));
      }
      FirstAttemptDone();
      if (listening || !told) {
        LogWarning({}, absl::StrCat("not listening to ", display,
                                    " for changes (trying again): ", error));
        listening = false;
        told = true;
        listener->OnListening(false);
      }
      absl::MutexLock lock(&listen_mu);
      listen_mu.AwaitWithTimeout(absl::Condition(&stopping), backoff);
      backoff = std::min(backoff * 2, kListenMaxBackoff);
    }
  }

  void StopListening() {
    {
      absl::MutexLock lock(&listen_mu);
      stopping = true;
    }
    if (listen_thread.joinable()) listen_thread.join();
  }

  // Written once in Open, before the store is shared.
  std::string connect_uri;  // as given, with a connect_timeout
  std::string display;      // without passwords: for messages
  int schema_version = 0;

  absl::Mutex mu;
  std::vector<std::unique_ptr<Connection>> idle ABSL_GUARDED_BY(mu);
  int open ABSL_GUARDED_BY(mu) = 0;  // idle and leased

  absl::Mutex listen_mu;
  bool listening ABSL_GUARDED_BY(listen_mu) = false;  // Listen was called
  bool first_attempt_done ABSL_GUARDED_BY(listen_mu) = false;
  bool stopping ABSL_GUARDED_BY(listen_mu) = false;
  std::thread listen_thread;  // started by Listen, joined by the destructor
};

PostgresJobStore::PostgresJobStore(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

PostgresJobStore::~PostgresJobStore() {
  // First: the thread uses the store's state and calls the listener.
  impl_->StopListening();
}

int PostgresJobStore::schema_version() const { return impl_->schema_version; }

absl::StatusOr<std::unique_ptr<PostgresJobStore>> PostgresJobStore::Open(
    const std::string& uri) {
  if (!IsPostgresUri(uri)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not a PostgreSQL URI (postgresql://...): ", RedactPostgresUri(uri)));
  }
  // libpq would report a malformed URI only when connecting, as a failed
  // connection; it is the caller's mistake instead.
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(uri.c_str(), &error);
  bool has_timeout = false;
  if (options == nullptr) {
    std::string detail = error != nullptr ? OneLine(error) : "out of memory";
    PQfreemem(error);
    return absl::InvalidArgumentError(
        absl::StrCat("malformed PostgreSQL URI ", RedactPostgresUri(uri), ": ",
                     ScrubPasswords(uri, std::move(detail))));
  }
  for (PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (absl::string_view(o->keyword) == "connect_timeout" &&
        o->val != nullptr && o->val[0] != '\0') {
      has_timeout = true;
    }
  }
  PQconninfoFree(options);

  auto impl = std::make_unique<Impl>();
  impl->display = RedactPostgresUri(uri);
  impl->connect_uri = uri;
  if (!has_timeout) {
    absl::StrAppend(&impl->connect_uri,
                    uri.find('?') == std::string::npos ? "?" : "&",
                    "connect_timeout=", kDefaultConnectTimeoutSeconds);
  }
  ZQ_RETURN_IF_ERROR(impl->Migrate());
  return std::unique_ptr<PostgresJobStore>(
      new PostgresJobStore(std::move(impl)));
}

// ---------------------------------------------------------------- models

absl::Status PostgresJobStore::PutModel(const v1::Model& model) {
  if (model.id().empty())
    return absl::InvalidArgumentError("PutModel: model id is empty");
  ZQ_RETURN_IF_ERROR(CheckStorable(absl::StrCat("model ", model.id()),
                                   {{"id", model.id()},
                                    {"tenant", model.tenant()},
                                    {"sha256", model.sha256()}}));
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(model, "model"));
  return impl_->Write(
      absl::StrCat("put model ", model.id()), [&](Tx& tx) -> absl::Status {
        // An upsert keeps the row, and so its created_seq: the model keeps
        // its place in the listing order.
        tx.Exec(
            "INSERT INTO models (id, tenant, sha256, state, record) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET "
            "tenant = excluded.tenant, sha256 = excluded.sha256, "
            "state = excluded.state, record = excluded.record",
            model.id(), model.tenant(), model.sha256(),
            static_cast<int>(model.state()), Bytes(record));
        InsertModelRef(tx, model);
        return absl::OkStatus();
      });
}

absl::StatusOr<v1::Model> PostgresJobStore::GetModel(const std::string& id) {
  if (!Storable(id))
    return absl::NotFoundError(absl::StrCat("model ", id, " not found"));
  absl::StatusOr<v1::Model> model;
  ZQ_RETURN_IF_ERROR(
      impl_->Read(absl::StrCat("get model ", id), [&](Tx& tx) -> absl::Status {
        model = Impl::OneRecord<v1::Model>(
            tx.Exec("SELECT record FROM models WHERE id = $1", id), "model",
            id);
        return absl::OkStatus();
      }));
  return model;
}

absl::StatusOr<Page<v1::Model>> PostgresJobStore::ListModels(
    const std::string& tenant, int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int64_t before,
                      ParsePageToken(page_token, kModelTokenPrefix));
  page_size = ClampPageSize(page_size);
  Page<v1::Model> page;
  if (!Storable(tenant)) return page;
  ZQ_RETURN_IF_ERROR(impl_->Read("list models", [&](Tx& tx) -> absl::Status {
    page = Page<v1::Model>();
    return ReadPage(tx.Exec("SELECT created_seq, record FROM models "
                            "WHERE tenant = $1 AND created_seq < $2 "
                            "ORDER BY created_seq DESC LIMIT $3",
                            tenant, before, page_size + 1),
                    page_size, kModelTokenPrefix, "model", &page);
  }));
  return page;
}

absl::StatusOr<std::vector<v1::Model>> PostgresJobStore::ModelsInState(
    v1::ModelState state) {
  std::vector<v1::Model> models;
  ZQ_RETURN_IF_ERROR(impl_->Read("read models", [&](Tx& tx) -> absl::Status {
    models.clear();
    return ReadAll(tx.Exec("SELECT record FROM models WHERE state = $1 "
                           "ORDER BY created_seq",
                           static_cast<int>(state)),
                   0, "model", &models);
  }));
  return models;
}

absl::Status PostgresJobStore::DeleteModel(const std::string& id) {
  if (!Storable(id))
    return absl::NotFoundError(absl::StrCat("model ", id, " not found"));
  return impl_->Write(
      absl::StrCat("delete model ", id), [&](Tx& tx) -> absl::Status {
        ZQ_RETURN_IF_ERROR(Impl::DeleteById(
            tx, "DELETE FROM models WHERE id = $1", "model", id));
        tx.Exec("DELETE FROM blob_refs WHERE owner = $1", id);
        return absl::OkStatus();
      });
}

// ---------------------------------------------------------------- blob refs

absl::StatusOr<int64_t> PostgresJobStore::CountBlobRefs(
    const std::string& sha256) {
  int64_t count = 0;
  if (!Storable(sha256)) return count;
  ZQ_RETURN_IF_ERROR(
      impl_->Read("count blob references", [&](Tx& tx) -> absl::Status {
        count = tx.Exec("SELECT COUNT(*) FROM blob_refs WHERE sha256 = $1",
                        sha256)[0][0]
                    .as<int64_t>();
        return absl::OkStatus();
      }));
  return count;
}

absl::StatusOr<int64_t> PostgresJobStore::StoredBytes(
    const std::string& tenant) {
  int64_t bytes = 0;
  if (!Storable(tenant)) return bytes;
  // SUM of BIGINT is NUMERIC in PostgreSQL; the cast brings it back.
  ZQ_RETURN_IF_ERROR(impl_->Read("stored bytes", [&](Tx& tx) -> absl::Status {
    bytes = tx.Exec(
                  "SELECT COALESCE(SUM(size_bytes), 0)::BIGINT FROM "
                  "(SELECT DISTINCT sha256, size_bytes FROM blob_refs "
                  "WHERE tenant = $1) AS blobs",
                  tenant)[0][0]
                .as<int64_t>();
    return absl::OkStatus();
  }));
  return bytes;
}

absl::StatusOr<std::vector<std::pair<std::string, int64_t>>>
PostgresJobStore::StoredBytesByTenant() {
  std::vector<std::pair<std::string, int64_t>> out;
  ZQ_RETURN_IF_ERROR(
      impl_->Read("stored bytes by tenant", [&](Tx& tx) -> absl::Status {
        out.clear();
        for (const pqxx::row& row :
             tx.Exec("SELECT tenant, SUM(size_bytes)::BIGINT FROM (SELECT "
                     "DISTINCT tenant, sha256, size_bytes FROM blob_refs) AS "
                     "blobs GROUP BY tenant ORDER BY tenant")) {
          out.emplace_back(row[0].as<std::string>(), row[1].as<int64_t>());
        }
        return absl::OkStatus();
      }));
  return out;
}

absl::StatusOr<bool> PostgresJobStore::TenantHoldsBlob(
    const std::string& tenant, const std::string& sha256) {
  bool found = false;
  if (!AllStorable({tenant, sha256})) return found;
  ZQ_RETURN_IF_ERROR(impl_->Read("look up a blob", [&](Tx& tx) -> absl::Status {
    found = tx.Exec(
                  "SELECT EXISTS (SELECT 1 FROM blob_refs WHERE tenant = $1 "
                  "AND sha256 = $2)",
                  tenant, sha256)[0][0]
                .as<bool>();
    return absl::OkStatus();
  }));
  return found;
}

absl::StatusOr<std::vector<Holding>> PostgresJobStore::LargestHoldings(
    const std::string& tenant, int limit) {
  std::vector<Holding> out;
  if (!Storable(tenant)) return out;
  // SQLite's LIMIT takes a negative limit as none.
  const int64_t rows = limit < 0 ? kNoLimit : limit;
  ZQ_RETURN_IF_ERROR(
      impl_->Read("largest holdings", [&](Tx& tx) -> absl::Status {
        out.clear();
        for (const pqxx::row& row :
             tx.Exec("SELECT owner, MIN(name) = '', SUM(size_bytes)::BIGINT "
                     "AS bytes FROM blob_refs WHERE tenant = $1 GROUP BY "
                     "owner ORDER BY bytes DESC, owner LIMIT $2",
                     tenant, rows)) {
          Holding& h = out.emplace_back();
          h.owner = row[0].as<std::string>();
          h.is_model = row[1].as<bool>();
          h.bytes = row[2].as<int64_t>();
        }
        return absl::OkStatus();
      }));
  return out;
}

// ---------------------------------------------------------------- jobs

absl::StatusOr<CreateJobResult> PostgresJobStore::CreateJob(
    const v1::Job& job, const std::vector<v1::JobEvent>& events,
    int max_queued) {
  if (job.id().empty())
    return absl::InvalidArgumentError("CreateJob: job id is empty");
  ZQ_RETURN_IF_ERROR(CheckStorable(absl::StrCat("job ", job.id()),
                                   {{"id", job.id()},
                                    {"tenant", job.tenant()},
                                    {"model_id", job.model_id()},
                                    {"request_id", job.request_id()}}));
  v1::Job numbered = job;
  std::vector<v1::JobEvent> numbered_events = events;
  store_common::NumberEvents(0, absl::Now(), numbered, numbered_events);
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(numbered, "job"));
  ZQ_ASSIGN_OR_RETURN(std::vector<pqxx::binarystring> event_records,
                      SerializeEvents(numbered_events));
  CreateJobResult result;
  ZQ_RETURN_IF_ERROR(impl_->Write(
      absl::StrCat("create job ", job.id()), [&](Tx& tx) -> absl::Status {
        result = CreateJobResult();
        if (max_queued > 0) {
          // Before counting: two replicas must not both find room for one
          // more job.
          tx.Exec("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                  kQueuedLockClass, job.tenant());
        }
        // The repeated `request_id <> ''` lets the planner use the partial
        // index.
        const std::string by_request_id =
            "SELECT record FROM jobs WHERE tenant = $1 AND request_id = $2 "
            "AND request_id <> ''";
        if (!job.request_id().empty()) {
          const pqxx::result rows =
              tx.Exec(by_request_id, job.tenant(), job.request_id());
          if (!rows.empty()) return ParseField(rows[0][0], "job", &result.job);
        }
        if (max_queued > 0) {
          const int64_t queued =
              tx.Exec(
                    "SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND "
                    "state = $2",
                    job.tenant(), static_cast<int>(v1::JOB_QUEUED))[0][0]
                  .as<int64_t>();
          if (queued >= max_queued) {
            result.over_queued_limit = true;
            result.queued = queued;
            return absl::OkStatus();
          }
        }
        pqxx::result inserted;
        try {
          // Two replicas may both have found no job for the request id; the
          // unique index lets one insert, and the other then finds its job.
          inserted = tx.Exec(
              "INSERT INTO jobs (id, tenant, model_id, state, request_id, "
              "record, priority, device, attempt, cancel_requested) VALUES "
              "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
              "ON CONFLICT (tenant, request_id) WHERE request_id <> '' "
              "DO NOTHING",
              job.id(), job.tenant(), job.model_id(),
              static_cast<int>(job.state()), job.request_id(), Bytes(record),
              job.priority(), static_cast<int>(job.device_preference()),
              job.attempts(), job.cancel_requested());
        } catch (const pqxx::unique_violation&) {
          return absl::AlreadyExistsError(
              absl::StrCat("job ", job.id(), " already exists"));
        }
        if (inserted.affected_rows() == 0) {
          const pqxx::result rows =
              tx.Exec(by_request_id, job.tenant(), job.request_id());
          if (rows.empty()) {
            return absl::InternalError(absl::StrCat(
                "create job ", job.id(), ": request id ", job.request_id(),
                " conflicted, yet no job has it"));
          }
          return ParseField(rows[0][0], "job", &result.job);
        }
        ZQ_RETURN_IF_ERROR(
            InsertEvents(tx, job.id(), numbered_events, event_records));
        if (job.state() == v1::JOB_QUEUED) {
          tx.Exec("SELECT pg_notify($1, '')", kQueueChannel);
        }
        result.job = numbered;
        result.created = true;
        return absl::OkStatus();
      }));
  return result;
}

absl::Status PostgresJobStore::UpdateJob(
    const v1::Job& job, const std::vector<v1::JobEvent>& events) {
  if (!Storable(job.id()))
    return absl::NotFoundError(absl::StrCat("job ", job.id(), " not found"));
  ZQ_RETURN_IF_ERROR(CheckJobText(job));
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(job, "job"));
  ZQ_ASSIGN_OR_RETURN(std::vector<pqxx::binarystring> event_records,
                      SerializeEvents(events));
  return impl_->Write(
      absl::StrCat("update job ", job.id()), [&](Tx& tx) -> absl::Status {
        return WriteJob(tx, job, record, QueueColumns(), events, event_records);
      });
}

absl::StatusOr<v1::Job> PostgresJobStore::GetJob(const std::string& id) {
  if (!Storable(id))
    return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  absl::StatusOr<v1::Job> job;
  ZQ_RETURN_IF_ERROR(
      impl_->Read(absl::StrCat("get job ", id), [&](Tx& tx) -> absl::Status {
        job = Impl::OneRecord<v1::Job>(
            tx.Exec("SELECT record FROM jobs WHERE id = $1", id), "job", id);
        return absl::OkStatus();
      }));
  return job;
}

absl::StatusOr<Page<v1::Job>> PostgresJobStore::ListJobs(
    const JobFilter& filter, int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int64_t before,
                      ParsePageToken(page_token, kJobTokenPrefix));
  page_size = ClampPageSize(page_size);
  Page<v1::Job> page;
  if (!AllStorable({filter.tenant, filter.model_id})) return page;
  // One statement per filter shape (four at most), so each gets the index
  // that fits it instead of a catch-all "($3 = 0 OR state = $3)".
  std::vector<std::string> params = {filter.tenant, absl::StrCat(before)};
  std::string sql =
      "SELECT created_seq, record FROM jobs WHERE tenant = $1 AND "
      "created_seq < $2";
  if (filter.state != v1::JOB_STATE_UNSPECIFIED) {
    params.push_back(absl::StrCat(static_cast<int>(filter.state)));
    absl::StrAppend(&sql, " AND state = $", params.size());
  }
  if (!filter.model_id.empty()) {
    params.push_back(filter.model_id);
    absl::StrAppend(&sql, " AND model_id = $", params.size());
  }
  params.push_back(absl::StrCat(page_size + 1));
  absl::StrAppend(&sql, " ORDER BY created_seq DESC LIMIT $", params.size());
  ZQ_RETURN_IF_ERROR(impl_->Read("list jobs", [&](Tx& tx) -> absl::Status {
    page = Page<v1::Job>();
    return ReadPage(tx.Exec(sql, pqxx::prepare::make_dynamic_params(params)),
                    page_size, kJobTokenPrefix, "job", &page);
  }));
  return page;
}

absl::StatusOr<std::vector<v1::Job>> PostgresJobStore::JobsInStates(
    const std::vector<v1::JobState>& states) {
  std::vector<v1::Job> jobs;
  if (states.empty()) return jobs;
  // One statement for any number of states: an array parameter.
  const std::string array =
      absl::StrCat("{",
                   absl::StrJoin(states, ",",
                                 [](std::string* out, v1::JobState s) {
                                   absl::StrAppend(out, static_cast<int>(s));
                                 }),
                   "}");
  ZQ_RETURN_IF_ERROR(impl_->Read("read jobs", [&](Tx& tx) -> absl::Status {
    jobs.clear();
    return ReadAll(tx.Exec("SELECT record FROM jobs WHERE state = "
                           "ANY ($1::INTEGER[]) ORDER BY created_seq",
                           array),
                   0, "job", &jobs);
  }));
  return jobs;
}

absl::Status PostgresJobStore::DeleteJob(const std::string& id) {
  if (!Storable(id))
    return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return impl_->Write(
      absl::StrCat("delete job ", id), [&](Tx& tx) -> absl::Status {
        // The job's row first, locked: a concurrent UpdateJob of the job
        // locks it first too, so the two cannot deadlock over its events.
        if (tx.Exec("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", id)
                .empty()) {
          return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
        }
        // Events before the job: they refer to its row.
        tx.Exec("DELETE FROM events WHERE job_id = $1", id);
        tx.Exec("DELETE FROM blob_refs WHERE owner = $1", id);
        return Impl::DeleteById(tx, "DELETE FROM jobs WHERE id = $1", "job",
                                id);
      });
}

absl::StatusOr<std::vector<v1::Job>> PostgresJobStore::JobsEndedBefore(
    int64_t unix_seconds, int limit) {
  std::vector<v1::Job> jobs;
  // created_seq breaks ties as SQLite's index (end_unix, rowid) does.
  ZQ_RETURN_IF_ERROR(
      impl_->Read("read ended jobs", [&](Tx& tx) -> absl::Status {
        jobs.clear();
        return ReadAll(
            tx.Exec("SELECT record FROM jobs WHERE end_unix IS NOT NULL AND "
                    "end_unix < $1 ORDER BY end_unix, created_seq LIMIT $2",
                    unix_seconds, limit <= 0 ? kNoLimit : limit),
            0, "job", &jobs);
      }));
  return jobs;
}

absl::StatusOr<int64_t> PostgresJobStore::CountActiveJobsForModel(
    const std::string& model_id) {
  int64_t count = 0;
  if (!Storable(model_id)) return count;
  ZQ_RETURN_IF_ERROR(
      impl_->Read("count active jobs", [&](Tx& tx) -> absl::Status {
        count = tx.Exec(
                      "SELECT COUNT(*) FROM jobs WHERE model_id = $1 AND "
                      "state IN ($2, $3)",
                      model_id, static_cast<int>(v1::JOB_QUEUED),
                      static_cast<int>(v1::JOB_RUNNING))[0][0]
                    .as<int64_t>();
        return absl::OkStatus();
      }));
  return count;
}

absl::StatusOr<int64_t> PostgresJobStore::CountJobs(v1::JobState state) {
  int64_t count = 0;
  ZQ_RETURN_IF_ERROR(impl_->Read("count jobs", [&](Tx& tx) -> absl::Status {
    count = (state == v1::JOB_STATE_UNSPECIFIED
                 ? tx.Exec("SELECT COUNT(*) FROM jobs")
                 : tx.Exec("SELECT COUNT(*) FROM jobs WHERE state = $1",
                           static_cast<int>(state)))[0][0]
                .as<int64_t>();
    return absl::OkStatus();
  }));
  return count;
}

// ---------------------------------------------------------------- the queue

absl::StatusOr<std::optional<JobWrite>> PostgresJobStore::ClaimJob(
    const ClaimOptions& options, const JobEdit& start) {
  if (options.owner.empty())
    return absl::InvalidArgumentError("ClaimJob: owner is empty");
  ZQ_RETURN_IF_ERROR(CheckStorable("ClaimJob", {{"owner", options.owner}}));
  std::optional<JobWrite> claimed;
  if (options.devices.empty()) return claimed;
  const std::string devices = DeviceArray(options.devices);
  const int64_t lease_ms = absl::ToInt64Milliseconds(options.lease);
  // The candidates are read without locks and then locked one at a time
  // (SKIP LOCKED): FOR UPDATE on the whole batch would hold every
  // candidate until this claim commits, and replicas claiming together
  // would find nothing left to lock but the one each takes.
  const std::string candidates =
      "SELECT id, tenant FROM jobs AS j WHERE state = 1 AND not_before <= "
      "(EXTRACT(EPOCH FROM now()) * 1000)::BIGINT AND device = ANY "
      "($1::INTEGER[]) AND NOT (tenant = ANY ($2::TEXT[])) ORDER BY priority "
      "DESC, (SELECT COUNT(*) FROM jobs AS r WHERE r.tenant = j.tenant AND "
      "r.state = 2), created_seq LIMIT $3 OFFSET $4";
  ZQ_RETURN_IF_ERROR(impl_->Write("claim a job", [&](Tx& tx) -> absl::Status {
    claimed.reset();
    // Tenants whose jobs this claim may take (their running count was
    // checked under the tenant's lock), and those it may not (at their
    // limit, or another replica is placing one of their jobs): the next
    // batch leaves the latter out, so that a tenant at its limit with many
    // jobs of high priority cannot hide the others'.
    absl::flat_hash_set<std::string> placeable, skipped;
    int64_t locked_elsewhere = 0;  // candidates whose row lock was taken
    while (true) {
      const pqxx::result batch =
          tx.Exec(candidates, devices, TextArray(skipped), kClaimBatch,
                  locked_elsewhere);
      for (const pqxx::row& row : batch) {
        const std::string id = row[0].as<std::string>();
        const std::string tenant = row[1].as<std::string>();
        if (skipped.contains(tenant)) continue;
        if (!placeable.contains(tenant)) {
          const int limit =
              options.running_limit ? options.running_limit(tenant) : 0;
          if (limit > 0) {
            // TRY: a replica never waits for another (no deadlock between
            // tenants' locks), it leaves the tenant to the one placing it.
            const bool locked =
                tx.Exec("SELECT pg_try_advisory_xact_lock($1, hashtext($2))",
                        kRunningLockClass, tenant)[0][0]
                    .as<bool>();
            if (!locked || tx.Exec("SELECT COUNT(*) FROM jobs WHERE "
                                   "tenant = $1 AND state = 2",
                                   tenant)[0][0]
                                   .as<int64_t>() >= limit) {
              skipped.insert(tenant);
              continue;
            }
          }
          placeable.insert(tenant);
        }
        // Read again under the lock: the row may have been claimed or
        // changed since the batch was read.
        std::vector<StoredJob> rows;
        ZQ_RETURN_IF_ERROR(ReadStoredJobs(
            tx.Exec("SELECT record, owner FROM jobs WHERE id = $1 AND "
                    "state = 1 AND not_before <= (EXTRACT(EPOCH FROM now()) "
                    "* 1000)::BIGINT AND device = ANY ($2::INTEGER[]) "
                    "FOR UPDATE SKIP LOCKED",
                    id, devices),
            &rows));
        if (rows.empty()) {
          ++locked_elsewhere;
          continue;
        }
        const StoredJob& stored = rows[0];
        JobChange change{stored.job, {}, absl::InfinitePast(), ""};
        ZQ_RETURN_IF_ERROR(start(change));
        ZQ_RETURN_IF_ERROR(store_common::CheckStarted(stored.job, change.job));
        QueueColumns queue;
        queue.owner = options.owner;
        queue.lease_ms = lease_ms;
        ZQ_ASSIGN_OR_RETURN(JobWrite written,
                            WriteChange(tx, stored, change, queue));
        claimed = std::move(written);
        return absl::OkStatus();
      }
      if (batch.size() < static_cast<size_t>(kClaimBatch)) {
        return absl::OkStatus();
      }
    }
  }));
  return claimed;
}

absl::StatusOr<JobWrite> PostgresJobStore::EditJob(const std::string& id,
                                                   const Fence* fence,
                                                   const JobEdit& edit) {
  if (!Storable(id))
    return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  std::optional<JobWrite> written;
  ZQ_RETURN_IF_ERROR(
      impl_->Write(absl::StrCat("edit job ", id), [&](Tx& tx) -> absl::Status {
        written.reset();
        std::vector<StoredJob> rows;
        ZQ_RETURN_IF_ERROR(ReadStoredJobs(
            tx.Exec("SELECT record, owner FROM jobs WHERE id = $1 FOR UPDATE",
                    id),
            &rows));
        if (rows.empty())
          return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
        const StoredJob& stored = rows[0];
        ZQ_RETURN_IF_ERROR(
            store_common::CheckFence(fence, stored.job, stored.owner));
        JobChange change{stored.job, {}, absl::InfinitePast(), stored.owner};
        ZQ_RETURN_IF_ERROR(edit(change));
        QueueColumns queue;
        queue.not_before = store_common::UnixMillis(change.not_before);
        ZQ_ASSIGN_OR_RETURN(JobWrite result,
                            WriteChange(tx, stored, change, queue));
        written = std::move(result);
        return absl::OkStatus();
      }));
  return *std::move(written);
}

absl::StatusOr<std::vector<LeaseInfo>> PostgresJobStore::RenewLeases(
    const std::string& owner, absl::Duration lease) {
  std::vector<LeaseInfo> out;
  if (!Storable(owner)) return out;
  ZQ_RETURN_IF_ERROR(impl_->Write(
      absl::StrCat("renew leases of ", owner), [&](Tx& tx) -> absl::Status {
        out.clear();
        for (const pqxx::row& row : tx.Exec(
                 "UPDATE jobs SET lease_until = now() + $2::DOUBLE PRECISION "
                 "* INTERVAL '1 millisecond' WHERE owner = $1 AND state = 2 "
                 "RETURNING id, attempt, cancel_requested",
                 owner, absl::ToInt64Milliseconds(lease))) {
          LeaseInfo& info = out.emplace_back();
          info.job_id = row[0].as<std::string>();
          info.attempt = row[1].as<int32_t>();
          info.cancel_requested = row[2].as<bool>();
        }
        return absl::OkStatus();
      }));
  return out;
}

absl::StatusOr<std::vector<JobWrite>> PostgresJobStore::ReclaimExpired(
    int limit, const JobEdit& reclaim) {
  std::vector<JobWrite> out;
  ZQ_RETURN_IF_ERROR(
      impl_->Write("reclaim expired leases", [&](Tx& tx) -> absl::Status {
        std::vector<StoredJob> expired;
        ZQ_RETURN_IF_ERROR(ReadStoredJobs(
            tx.Exec("SELECT record, owner FROM jobs WHERE state = 2 AND "
                    "lease_until < now() ORDER BY lease_until, created_seq "
                    "LIMIT $1 FOR UPDATE SKIP LOCKED",
                    limit <= 0 ? kNoLimit : limit),
            &expired));
        return Reclaim(tx, expired, reclaim, &out);
      }));
  return out;
}

absl::StatusOr<std::vector<JobWrite>> PostgresJobStore::ReclaimOwned(
    const std::string& owner, const JobEdit& reclaim) {
  std::vector<JobWrite> out;
  if (!Storable(owner)) return out;
  ZQ_RETURN_IF_ERROR(impl_->Write(
      absl::StrCat("reclaim the jobs of ", owner), [&](Tx& tx) -> absl::Status {
        // Waits for a row another transaction holds (an expired lease being
        // reclaimed, say), then reads it as that one left it.
        std::vector<StoredJob> held;
        ZQ_RETURN_IF_ERROR(ReadStoredJobs(
            tx.Exec("SELECT record, owner FROM jobs WHERE owner = $1 AND "
                    "state = 2 ORDER BY created_seq FOR UPDATE",
                    owner),
            &held));
        return Reclaim(tx, held, reclaim, &out);
      }));
  return out;
}

absl::Status PostgresJobStore::Listen(StoreListener* listener) {
  if (listener == nullptr) {
    // Stops telling; a later Listen may start again.
    impl_->StopListening();
    absl::MutexLock lock(&impl_->listen_mu);
    impl_->listening = false;
    impl_->stopping = false;
    impl_->first_attempt_done = false;
    return absl::OkStatus();
  }
  {
    absl::MutexLock lock(&impl_->listen_mu);
    if (impl_->listening)
      return absl::FailedPreconditionError("Listen: the store has a listener");
    impl_->listening = true;
  }
  Impl* impl = impl_.get();
  impl_->listen_thread =
      std::thread([impl, listener] { impl->ListenLoop(listener); });
  // Returns once the first attempt to listen is over, so that a caller that
  // writes, or reads what it may have missed, after this does not race the
  // LISTEN (when the database is down, OnListening(false) said so).
  absl::MutexLock lock(&impl_->listen_mu);
  impl_->listen_mu.Await(absl::Condition(&impl_->first_attempt_done));
  return absl::OkStatus();
}

// ---------------------------------------------------------------- events

absl::StatusOr<std::vector<v1::JobEvent>> PostgresJobStore::ListEvents(
    const std::string& job_id, int64_t after_seq, int limit) {
  std::vector<v1::JobEvent> events;
  if (!Storable(job_id)) return events;
  ZQ_RETURN_IF_ERROR(
      impl_->Read("read job events", [&](Tx& tx) -> absl::Status {
        events.clear();
        return ReadAll(
            tx.Exec("SELECT record FROM events WHERE job_id = $1 AND "
                    "seq > $2 ORDER BY seq LIMIT $3",
                    job_id, after_seq, limit <= 0 ? kNoLimit : limit),
            0, "job event", &events);
      }));
  return events;
}

}  // namespace zeroq::server
