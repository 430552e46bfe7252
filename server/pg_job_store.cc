#include "server/pg_job_store.h"

#include <libpq-fe.h>

#include <cstdint>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <pqxx/pqxx>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
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
};

static_assert(kMigrations[std::size(kMigrations) - 1].version ==
                  PostgresJobStore::kSchemaVersion,
              "kSchemaVersion must be the last migration's version");

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

  // Written once in Open, before the store is shared.
  std::string connect_uri;  // as given, with a connect_timeout
  std::string display;      // without passwords: for messages
  int schema_version = 0;

  absl::Mutex mu;
  std::vector<std::unique_ptr<Connection>> idle ABSL_GUARDED_BY(mu);
  int open ABSL_GUARDED_BY(mu) = 0;  // idle and leased
};

PostgresJobStore::PostgresJobStore(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

PostgresJobStore::~PostgresJobStore() = default;

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
    const v1::Job& job) {
  if (job.id().empty())
    return absl::InvalidArgumentError("CreateJob: job id is empty");
  ZQ_RETURN_IF_ERROR(CheckStorable(absl::StrCat("job ", job.id()),
                                   {{"id", job.id()},
                                    {"tenant", job.tenant()},
                                    {"model_id", job.model_id()},
                                    {"request_id", job.request_id()}}));
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(job, "job"));
  CreateJobResult result;
  ZQ_RETURN_IF_ERROR(impl_->Write(
      absl::StrCat("create job ", job.id()), [&](Tx& tx) -> absl::Status {
        result = CreateJobResult();
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
        pqxx::result inserted;
        try {
          // Two replicas may both have found no job for the request id; the
          // unique index lets one insert, and the other then finds its job.
          inserted = tx.Exec(
              "INSERT INTO jobs (id, tenant, model_id, state, request_id, "
              "record) VALUES ($1, $2, $3, $4, $5, $6) "
              "ON CONFLICT (tenant, request_id) WHERE request_id <> '' "
              "DO NOTHING",
              job.id(), job.tenant(), job.model_id(),
              static_cast<int>(job.state()), job.request_id(), Bytes(record));
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
        result.job = job;
        result.created = true;
        return absl::OkStatus();
      }));
  return result;
}

absl::Status PostgresJobStore::UpdateJob(
    const v1::Job& job, const std::vector<v1::JobEvent>& events) {
  if (!Storable(job.id()))
    return absl::NotFoundError(absl::StrCat("job ", job.id(), " not found"));
  ZQ_RETURN_IF_ERROR(CheckStorable(absl::StrCat("job ", job.id()),
                                   {{"tenant", job.tenant()},
                                    {"model_id", job.model_id()},
                                    {"request_id", job.request_id()}}));
  const bool terminal = IsTerminal(job.state());
  if (terminal) ZQ_RETURN_IF_ERROR(CheckJobRefs(job));
  ZQ_ASSIGN_OR_RETURN(std::string record, Serialize(job, "job"));
  std::vector<pqxx::binarystring> event_records;
  event_records.reserve(events.size());
  for (const v1::JobEvent& event : events) {
    ZQ_ASSIGN_OR_RETURN(std::string event_record,
                        Serialize(event, "job event"));
    event_records.push_back(Bytes(event_record));
  }
  // NULL before the job ended: pqxx passes a null char pointer as NULL.
  const std::string end_text = terminal ? absl::StrCat(EndUnix(job)) : "";
  const char* end_unix = terminal ? end_text.c_str() : nullptr;
  return impl_->Write(
      absl::StrCat("update job ", job.id()), [&](Tx& tx) -> absl::Status {
        try {
          // Every column mirrors the record, so a listing by tenant or
          // request id always agrees with what GetJob returns.
          const pqxx::result updated = tx.Exec(
              "UPDATE jobs SET tenant = $2, model_id = $3, state = $4, "
              "request_id = $5, record = $6, end_unix = $7 WHERE id = $1",
              job.id(), job.tenant(), job.model_id(),
              static_cast<int>(job.state()), job.request_id(), Bytes(record),
              end_unix);
          if (updated.affected_rows() == 0) {
            return absl::NotFoundError(
                absl::StrCat("job ", job.id(), " not found"));
          }
        } catch (const pqxx::unique_violation&) {
          return absl::AlreadyExistsError(absl::StrCat(
              "job ", job.id(), ": tenant ", job.tenant(),
              " already has another job with request id ", job.request_id()));
        }
        if (terminal) {
          // Only a terminal record can carry artifacts; progress updates
          // (the many) skip this.
          tx.Exec("DELETE FROM blob_refs WHERE owner = $1", job.id());
          InsertJobRefs(tx, job);
        }
        for (size_t i = 0; i < events.size(); ++i) {
          try {
            tx.Exec(
                "INSERT INTO events (job_id, seq, record) VALUES ($1, $2, $3)",
                job.id(), events[i].seq(), event_records[i]);
          } catch (const pqxx::unique_violation&) {
            return absl::AlreadyExistsError(absl::StrCat(
                "job ", job.id(), " already has an event with seq ",
                events[i].seq()));
          }
        }
        return absl::OkStatus();
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
