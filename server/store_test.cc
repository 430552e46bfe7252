// Tests of the server's storage: Sha256, FileBlobStore, and the JobStore
// conformance suite run on both backends (SqliteJobStore, PostgresJobStore),
// plus what is particular to each. The PostgreSQL tests use a fresh database
// per test on the server ZEROQ_TEST_PG_URI names, and fail without one.
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <ostream>
#include <pqxx/pqxx>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "server/blob_store.h"
#include "server/job_store.h"
#include "server/pg_job_store.h"
#include "server/sha256.h"

namespace zeroq::server {
namespace {

#define ZQ_ASSERT_OK(expr)                       \
  do {                                           \
    const absl::Status zq_s_ = (expr);           \
    ASSERT_TRUE(zq_s_.ok()) << zq_s_.ToString(); \
  } while (0)

#define ZQ_ASSERT_OK_AND_ASSIGN(lhs, expr)                                   \
  ZQ_ASSERT_OK_AND_ASSIGN_IMPL_(ZQ_TEST_CONCAT_(zq_test_or_, __LINE__), lhs, \
                                expr)
#define ZQ_TEST_CONCAT_INNER_(x, y) x##y
#define ZQ_TEST_CONCAT_(x, y) ZQ_TEST_CONCAT_INNER_(x, y)
#define ZQ_ASSERT_OK_AND_ASSIGN_IMPL_(var, lhs, expr) \
  auto var = (expr);                                  \
  ASSERT_TRUE(var.ok()) << var.status().ToString();   \
  lhs = std::move(var).value()

// A fresh directory under the test temp dir, removed with everything in it.
class ScratchDir {
 public:
  ScratchDir() {
    std::string pattern = testing::TempDir();
    if (pattern.empty() || pattern.back() != '/') pattern += '/';
    pattern += "zeroq-store-test-XXXXXX";
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    if (mkdtemp(buffer.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp " << pattern << " failed";
      return;
    }
    path_ = buffer.data();
  }
  ~ScratchDir() {
    if (path_.empty()) return;
    nftw(
        path_.c_str(),
        [](const char* path, const struct stat*, int, struct FTW*) {
          return remove(path);
        },
        16, FTW_DEPTH | FTW_PHYS);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::string& path() const { return path_; }
  std::string Sub(absl::string_view name) const {
    return absl::StrCat(path_, "/", name);
  }

 private:
  std::string path_;
};

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return names;
  while (struct dirent* entry = readdir(d)) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

bool PathExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

std::string ReadFile(const std::string& path) {
  std::string out;
  FILE* f = fopen(path.c_str(), "rb");
  if (f == nullptr) return out;
  char buffer[65536];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), f)) > 0) out.append(buffer, n);
  fclose(f);
  return out;
}

void WriteFile(const std::string& path, absl::string_view bytes) {
  FILE* f = fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
  fclose(f);
}

std::string RandomBytes(size_t size, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string bytes(size, '\0');
  for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
  return bytes;
}

// ---------------------------------------------------------------- Sha256

constexpr absl::string_view kEmptySha =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr absl::string_view kAbcSha =
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), kEmptySha);
  EXPECT_EQ(Sha256Hex("abc"), kAbcSha);
  EXPECT_EQ(
      Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
      "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // FIPS 180-2's long message: one million 'a'.
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, IncrementalMatchesOneShot) {
  const std::string bytes = RandomBytes((1 << 20) + 12345, 7);
  const std::string expected = Sha256Hex(bytes);
  for (size_t step : {1u, 63u, 64u, 65u, 4096u, 1000003u}) {
    Sha256 hash;
    absl::string_view rest = bytes;
    // Single-byte steps over a MiB are slow; cover the head that way only.
    if (step == 1) {
      for (int i = 0; i < 300; ++i) {
        hash.Update(rest.substr(0, 1));
        rest.remove_prefix(1);
      }
      step = 8191;
    }
    while (!rest.empty()) {
      const size_t n = std::min(step, rest.size());
      hash.Update(rest.substr(0, n));
      rest.remove_prefix(n);
    }
    EXPECT_EQ(hash.HexDigest(), expected) << "step " << step;
  }
  Sha256 nothing;
  nothing.Update("");
  EXPECT_EQ(nothing.HexDigest(), kEmptySha);
}

TEST(Sha256, File) {
  ScratchDir dir;
  WriteFile(dir.Sub("abc"), "abc");
  ZQ_ASSERT_OK_AND_ASSIGN(std::string hex, Sha256File(dir.Sub("abc")));
  EXPECT_EQ(hex, kAbcSha);
  WriteFile(dir.Sub("empty"), "");
  ZQ_ASSERT_OK_AND_ASSIGN(hex, Sha256File(dir.Sub("empty")));
  EXPECT_EQ(hex, kEmptySha);
  const std::string big = RandomBytes(3 * (1 << 20) + 17, 3);
  WriteFile(dir.Sub("big"), big);
  ZQ_ASSERT_OK_AND_ASSIGN(hex, Sha256File(dir.Sub("big")));
  EXPECT_EQ(hex, Sha256Hex(big));
  EXPECT_EQ(Sha256File(dir.Sub("missing")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(Sha256, IsSha256Hex) {
  EXPECT_TRUE(IsSha256Hex(kAbcSha));
  EXPECT_TRUE(IsSha256Hex(std::string(64, '0')));
  EXPECT_FALSE(IsSha256Hex(""));
  EXPECT_FALSE(IsSha256Hex(kAbcSha.substr(1)));
  EXPECT_FALSE(IsSha256Hex(absl::StrCat(kAbcSha, "0")));
  EXPECT_FALSE(IsSha256Hex(
      "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"));
  EXPECT_FALSE(IsSha256Hex(absl::StrCat("g", kAbcSha.substr(1))));
  EXPECT_FALSE(IsSha256Hex(absl::StrCat("../", kAbcSha.substr(3))));
}

// ---------------------------------------------------------------- BlobStore

std::unique_ptr<FileBlobStore> MakeBlobStore(const std::string& root) {
  auto store = FileBlobStore::Create(root);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

absl::StatusOr<BlobInfo> PutBytes(BlobStore& store, absl::string_view bytes,
                                  int64_t expected_size = -1,
                                  absl::string_view expected_sha = "") {
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store.NewWriter();
  if (!writer.ok()) return writer.status();
  absl::Status status = (*writer)->Append(bytes);
  if (!status.ok()) return status;
  return (*writer)->Commit(expected_size, expected_sha);
}

TEST(BlobStore, RoundTrip) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.Sub("blobs"));
  ASSERT_NE(store, nullptr);
  // Small appends (buffered), block-sized ones with and without pending
  // bytes (direct writes), and an empty one.
  const std::string bytes = RandomBytes(5 * (1 << 20) + 321, 11);
  const std::vector<size_t> pieces = {3,      0,  1 << 20,      (1 << 20) + 5,
                                      100000, 17, 2 * (1 << 20)};
  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlobWriter> writer,
                          store->NewWriter());
  size_t offset = 0;
  for (size_t n : pieces) {
    n = std::min(n, bytes.size() - offset);
    ZQ_ASSERT_OK(writer->Append(absl::string_view(bytes).substr(offset, n)));
    offset += n;
  }
  ZQ_ASSERT_OK(writer->Append(absl::string_view(bytes).substr(offset)));
  EXPECT_EQ(writer->bytes_written(), static_cast<int64_t>(bytes.size()));
  const std::string sha = Sha256Hex(bytes);
  ZQ_ASSERT_OK_AND_ASSIGN(BlobInfo info, writer->Commit(bytes.size(), sha));
  EXPECT_EQ(info.sha256, sha);
  EXPECT_EQ(info.size_bytes, static_cast<int64_t>(bytes.size()));

  EXPECT_EQ(store->Path(sha),
            absl::StrCat(dir.Sub("blobs"), "/", sha.substr(0, 2), "/", sha));
  EXPECT_EQ(ReadFile(store->Path(sha)), bytes);
  EXPECT_TRUE(store->Exists(sha));
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t size, store->Size(sha));
  EXPECT_EQ(size, static_cast<int64_t>(bytes.size()));
  EXPECT_TRUE(ListDir(dir.Sub("blobs/tmp")).empty());
  // A second Commit is a caller bug, reported rather than acted on.
  EXPECT_FALSE(writer->Commit().ok());
  writer.reset();
  EXPECT_EQ(ReadFile(store->Path(sha)), bytes);
}

TEST(BlobStore, EmptyBlob) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlobWriter> writer,
                          store->NewWriter());
  ZQ_ASSERT_OK_AND_ASSIGN(BlobInfo info, writer->Commit(0, kEmptySha));
  EXPECT_EQ(info.sha256, kEmptySha);
  EXPECT_EQ(info.size_bytes, 0);
  EXPECT_TRUE(store->Exists(kEmptySha));
}

TEST(BlobStore, SizeMismatchIsDataLossAndLeavesNothing) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  const std::string bytes = RandomBytes(3 * (1 << 20) + 1, 5);
  absl::StatusOr<BlobInfo> info = PutBytes(*store, bytes, bytes.size() + 1);
  ASSERT_EQ(info.status().code(), absl::StatusCode::kDataLoss) << info.status();
  EXPECT_NE(info.status().message().find(absl::StrCat(bytes.size() + 1)),
            absl::string_view::npos)
      << info.status();
  EXPECT_NE(info.status().message().find(absl::StrCat(bytes.size())),
            absl::string_view::npos)
      << info.status();
  EXPECT_FALSE(store->Exists(Sha256Hex(bytes)));
  EXPECT_EQ(ListDir(dir.path()), std::vector<std::string>{"tmp"});
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
  EXPECT_EQ(store->StoredBytes(), 0);
}

TEST(BlobStore, HashMismatchIsDataLossAndLeavesNothing) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  const std::string bytes = "the quick brown fox";
  absl::StatusOr<BlobInfo> info =
      PutBytes(*store, bytes, bytes.size(), kAbcSha);
  ASSERT_EQ(info.status().code(), absl::StatusCode::kDataLoss) << info.status();
  EXPECT_NE(info.status().message().find(kAbcSha), absl::string_view::npos)
      << info.status();
  EXPECT_NE(info.status().message().find(Sha256Hex(bytes)),
            absl::string_view::npos)
      << info.status();
  EXPECT_FALSE(store->Exists(Sha256Hex(bytes)));
  EXPECT_FALSE(store->Exists(kAbcSha));
  EXPECT_EQ(ListDir(dir.path()), std::vector<std::string>{"tmp"});
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
}

TEST(BlobStore, SameBytesTwiceDeduplicate) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  const std::string bytes = RandomBytes(300000, 9);
  ZQ_ASSERT_OK_AND_ASSIGN(BlobInfo first, PutBytes(*store, bytes));
  ZQ_ASSERT_OK_AND_ASSIGN(
      BlobInfo second, PutBytes(*store, bytes, bytes.size(), Sha256Hex(bytes)));
  EXPECT_EQ(first.sha256, second.sha256);
  EXPECT_EQ(first.size_bytes, second.size_bytes);
  EXPECT_EQ(ReadFile(store->Path(first.sha256)), bytes);
  EXPECT_EQ(ListDir(dir.Sub(first.sha256.substr(0, 2))),
            std::vector<std::string>{first.sha256});
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
  EXPECT_EQ(store->StoredBytes(), static_cast<int64_t>(bytes.size()));
}

// Replicas share one blob folder: two stores on it (as two servers) write
// the same bytes at the same moment, many times over. Every commit
// succeeds, the blob holds exactly those bytes, and no temp file is left.
TEST(BlobStore, TwoStoresOnOneFolderWriteTheSameBytesAtOnce) {
  ScratchDir dir;
  auto a = MakeBlobStore(dir.path());
  auto b = MakeBlobStore(dir.path());
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const std::string bytes = RandomBytes(3 * (1 << 20) + 11, 5);
  const std::string sha = Sha256Hex(bytes);
  std::atomic<int> failures{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 8; ++t) {
    writers.emplace_back([&, t] {
      BlobStore& store = t % 2 == 0 ? *a : *b;
      for (int i = 0; i < 5; ++i) {
        absl::StatusOr<BlobInfo> info =
            PutBytes(store, bytes, bytes.size(), sha);
        if (!info.ok() || info->sha256 != sha) ++failures;
        // A reader in between sees the whole blob or none.
        if (store.Exists(sha) && ReadFile(store.Path(sha)) != bytes) ++failures;
      }
    });
  }
  for (std::thread& w : writers) w.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(ReadFile(a->Path(sha)), bytes);
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
  EXPECT_EQ(b->StoredBytes(), static_cast<int64_t>(bytes.size()));
}

// On a shared folder only old temp files are a dead writer's: a fresh one
// may be another replica's upload in progress.
TEST(BlobStore, RemoveTemporariesCanSpareRecentOnes) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  WriteFile(dir.Sub("tmp/1-0.part"), "old");
  WriteFile(dir.Sub("tmp/2-0.part"), "fresh");
  const absl::Time two_hours_ago = absl::Now() - absl::Hours(2);
  struct timespec times[2] = {absl::ToTimespec(two_hours_ago),
                              absl::ToTimespec(two_hours_ago)};
  ASSERT_EQ(utimensat(AT_FDCWD, dir.Sub("tmp/1-0.part").c_str(), times, 0), 0);
  ZQ_ASSERT_OK_AND_ASSIGN(int removed, store->RemoveTemporaries(absl::Hours(1)));
  EXPECT_EQ(removed, 1);
  EXPECT_EQ(ListDir(dir.Sub("tmp")), std::vector<std::string>{"2-0.part"});
}

TEST(BlobStore, WriterDestroyedWithoutCommitLeavesNoTemp) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  {
    ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlobWriter> writer,
                            store->NewWriter());
    ZQ_ASSERT_OK(writer->Append(RandomBytes(2 * (1 << 20) + 7, 1)));
    EXPECT_EQ(ListDir(dir.Sub("tmp")).size(), 1u);
  }
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
  EXPECT_EQ(store->StoredBytes(), 0);
}

TEST(BlobStore, RemoveTemporaries) {
  ScratchDir dir;
  {
    auto store = MakeBlobStore(dir.path());
    ASSERT_NE(store, nullptr);
    ZQ_ASSERT_OK_AND_ASSIGN(int removed, store->RemoveTemporaries());
    EXPECT_EQ(removed, 0);
    ZQ_ASSERT_OK(PutBytes(*store, "keep me").status());
  }
  // What a run killed mid-upload leaves behind.
  WriteFile(dir.Sub("tmp/123-0.part"), "partial upload");
  WriteFile(dir.Sub("tmp/123-1.part"), "");
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK_AND_ASSIGN(int removed, store->RemoveTemporaries());
  EXPECT_EQ(removed, 2);
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
  EXPECT_TRUE(store->Exists(Sha256Hex("keep me")));
}

TEST(BlobStore, PutFile) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.Sub("blobs"));
  ASSERT_NE(store, nullptr);
  const std::string bytes = RandomBytes(2 * (1 << 20) + 99, 21);
  WriteFile(dir.Sub("artifact.pt"), bytes);
  ZQ_ASSERT_OK_AND_ASSIGN(BlobInfo info,
                          store->PutFile(dir.Sub("artifact.pt")));
  EXPECT_EQ(info.sha256, Sha256Hex(bytes));
  EXPECT_EQ(info.size_bytes, static_cast<int64_t>(bytes.size()));
  EXPECT_EQ(ReadFile(store->Path(info.sha256)), bytes);
  // A copy: the source stays where it was.
  EXPECT_EQ(ReadFile(dir.Sub("artifact.pt")), bytes);
  EXPECT_EQ(store->PutFile(dir.Sub("absent")).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(ListDir(dir.Sub("blobs/tmp")).empty());
}

TEST(BlobStore, StoredBytesSizeAndDelete) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->StoredBytes(), 0);
  const std::string a = RandomBytes(1000, 1);
  const std::string b = RandomBytes(2345678, 2);
  ZQ_ASSERT_OK_AND_ASSIGN(BlobInfo ia, PutBytes(*store, a));
  ZQ_ASSERT_OK_AND_ASSIGN(BlobInfo ib, PutBytes(*store, b));
  EXPECT_EQ(store->StoredBytes(), 1000 + 2345678);
  // Temp files of writes in progress are not stored bytes.
  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlobWriter> pending,
                          store->NewWriter());
  ZQ_ASSERT_OK(pending->Append(RandomBytes(2 << 20, 3)));
  EXPECT_EQ(store->StoredBytes(), 1000 + 2345678);
  pending.reset();

  ZQ_ASSERT_OK(store->Delete(ia.sha256));
  EXPECT_FALSE(store->Exists(ia.sha256));
  EXPECT_EQ(store->Size(ia.sha256).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store->StoredBytes(), 2345678);
  ZQ_ASSERT_OK(store->Delete(ia.sha256));  // absent: still OK
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t size, store->Size(ib.sha256));
  EXPECT_EQ(size, 2345678);

  // Malformed names never reach the file system.
  EXPECT_FALSE(store->Exists("../../etc/passwd"));
  EXPECT_EQ(store->Size("../x").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Delete("../x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Path("../../etc/passwd").rfind(dir.path(), 0), 0u);
  EXPECT_FALSE(PathExists(store->Path("../../etc/passwd")));
}

TEST(BlobStore, ConcurrentWritersOfTheSameBytes) {
  ScratchDir dir;
  auto store = MakeBlobStore(dir.path());
  ASSERT_NE(store, nullptr);
  const std::string bytes = RandomBytes(1 << 20, 77);
  std::vector<std::thread> threads;
  std::vector<absl::Status> results(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back(
        [&, t] { results[t] = PutBytes(*store, bytes).status(); });
  }
  for (std::thread& thread : threads) thread.join();
  for (const absl::Status& status : results) EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(ReadFile(store->Path(Sha256Hex(bytes))), bytes);
  EXPECT_TRUE(ListDir(dir.Sub("tmp")).empty());
  EXPECT_EQ(store->StoredBytes(), 1 << 20);
}

// ---------------------------------------------------------------- JobStore

int64_t ReadUserVersion(const std::string& path) {
  sqlite3* db = nullptr;
  int64_t version = -1;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) ==
      SQLITE_OK) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, nullptr) ==
            SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW) {
      version = sqlite3_column_int64(stmt, 0);
    }
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  return version;
}

std::string ReadJournalMode(const std::string& path) {
  sqlite3* db = nullptr;
  std::string mode;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) ==
      SQLITE_OK) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, nullptr) ==
            SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW) {
      mode = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    }
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  return mode;
}

// Through the interface, as the server uses it (its default arguments live
// there). For the SQLite-only tests.
std::unique_ptr<JobStore> OpenSqliteStore(const std::string& path) {
  auto store = SqliteJobStore::Open(path);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

// ---- the backends under test

// The database behind one test's stores: a fresh, empty one per test, of the
// backend under test, removed with the test.
class TestDatabase {
 public:
  virtual ~TestDatabase() = default;
  // A store on it; each call opens it again (the same data every time).
  virtual absl::StatusOr<std::unique_ptr<JobStore>> Open() = 0;
  // The schema version the database records (-1 when it cannot be read),
  // and one forged as a newer server would leave it.
  virtual int64_t StoredSchemaVersion() = 0;
  virtual absl::Status SetStoredSchemaVersion(int64_t version) = 0;
  // The backend's kSchemaVersion.
  virtual int CurrentSchemaVersion() const = 0;
};

class SqliteDatabase : public TestDatabase {
 public:
  absl::StatusOr<std::unique_ptr<JobStore>> Open() override {
    ZQ_ASSIGN_OR_RETURN(std::unique_ptr<SqliteJobStore> store,
                        SqliteJobStore::Open(path_));
    if (store->schema_version() != SqliteJobStore::kSchemaVersion) {
      return absl::InternalError(
          absl::StrCat("opened at schema version ", store->schema_version()));
    }
    return std::unique_ptr<JobStore>(std::move(store));
  }
  int64_t StoredSchemaVersion() override { return ReadUserVersion(path_); }
  absl::Status SetStoredSchemaVersion(int64_t version) override {
    sqlite3* db = nullptr;
    int rc = sqlite3_open(path_.c_str(), &db);
    if (rc == SQLITE_OK) {
      const std::string sql = absl::StrCat("PRAGMA user_version = ", version);
      rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr);
    }
    sqlite3_close(db);
    if (rc != SQLITE_OK)
      return absl::InternalError(absl::StrCat("sqlite error ", rc));
    return absl::OkStatus();
  }
  int CurrentSchemaVersion() const override {
    return SqliteJobStore::kSchemaVersion;
  }

 private:
  ScratchDir dir_;
  std::string path_ = dir_.Sub("zeroq.db");
};

constexpr char kPgUriVariable[] = "ZEROQ_TEST_PG_URI";

// `uri` (a libpq URI) naming database `name` instead of its own.
std::string WithDatabase(const std::string& uri, const std::string& name) {
  const size_t authority = uri.find("://") + 3;
  size_t query = uri.find('?', authority);
  if (query == std::string::npos) query = uri.size();
  size_t path = uri.find('/', authority);
  if (path == std::string::npos || path > query) path = query;
  return absl::StrCat(uri.substr(0, path), "/", name, uri.substr(query));
}

// Runs `sql` (statements separated by semicolons) on its own connection to
// `uri`; the first column of the first row of the last statement, "" when
// there is none.
absl::StatusOr<std::string> RunSql(const std::string& uri,
                                   const std::string& sql) {
  try {
    pqxx::connection connection(uri);
    pqxx::quiet_errorhandler quiet(connection);
    pqxx::nontransaction txn(connection);
    const pqxx::result rows = txn.exec(sql);
    if (rows.empty() || rows.columns() == 0 || rows[0][0].is_null()) return "";
    return std::string(rows[0][0].c_str());
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(sql, ": ", e.what()));
  }
}

// A database of its own on the server of ZEROQ_TEST_PG_URI (ctest starts one
// with scripts/pg_test_server.sh), dropped at the end of the test.
class PostgresDatabase : public TestDatabase {
 public:
  static absl::StatusOr<std::unique_ptr<PostgresDatabase>> Create() {
    const char* server = getenv(kPgUriVariable);
    if (server == nullptr || server[0] == '\0') {
      return absl::FailedPreconditionError(absl::StrCat(
          kPgUriVariable,
          " is not set: the PostgreSQL tests need a server. ctest starts one "
          "(the fixture \"postgres\": scripts/pg_test_server.sh); by hand: "
          "export ",
          kPgUriVariable,
          "=$(bash scripts/pg_test_server.sh start /tmp/zq-pg)"));
    }
    static std::atomic<int> counter{0};
    const std::string name =
        absl::StrCat("zq_test_", getpid(), "_", counter.fetch_add(1));
    ZQ_RETURN_IF_ERROR(
        RunSql(server, absl::StrCat("CREATE DATABASE ", name)).status());
    return std::unique_ptr<PostgresDatabase>(
        new PostgresDatabase(server, name));
  }
  ~PostgresDatabase() override {
    // FORCE: a test that failed half way may have left a store open.
    absl::StatusOr<std::string> dropped = RunSql(
        server_uri_,
        absl::StrCat("DROP DATABASE IF EXISTS ", name_, " WITH (FORCE)"));
    EXPECT_TRUE(dropped.ok()) << dropped.status();
  }

  const std::string& uri() const { return uri_; }
  const std::string& name() const { return name_; }
  // Runs SQL in this database, or in the server's own (for what cannot run
  // in the database itself, such as ALTER DATABASE).
  absl::StatusOr<std::string> Sql(const std::string& sql) {
    return RunSql(uri_, sql);
  }
  absl::StatusOr<std::string> ServerSql(const std::string& sql) {
    return RunSql(server_uri_, sql);
  }

  absl::StatusOr<std::unique_ptr<JobStore>> Open() override {
    ZQ_ASSIGN_OR_RETURN(std::unique_ptr<PostgresJobStore> store,
                        PostgresJobStore::Open(uri_));
    if (store->schema_version() != PostgresJobStore::kSchemaVersion) {
      return absl::InternalError(
          absl::StrCat("opened at schema version ", store->schema_version()));
    }
    return std::unique_ptr<JobStore>(std::move(store));
  }
  int64_t StoredSchemaVersion() override {
    absl::StatusOr<std::string> version =
        Sql("SELECT version FROM zeroq_schema_version");
    int64_t out = -1;
    if (!version.ok() || !absl::SimpleAtoi(*version, &out)) return -1;
    return out;
  }
  absl::Status SetStoredSchemaVersion(int64_t version) override {
    return Sql(absl::StrCat("UPDATE zeroq_schema_version SET version = ",
                            version))
        .status();
  }
  int CurrentSchemaVersion() const override {
    return PostgresJobStore::kSchemaVersion;
  }

 private:
  PostgresDatabase(std::string server_uri, std::string name)
      : server_uri_(std::move(server_uri)),
        name_(std::move(name)),
        uri_(WithDatabase(server_uri_, name_)) {}

  std::string server_uri_;  // the server's own database
  std::string name_;
  std::string uri_;  // this test's database
};

enum class Backend { kSqlite, kPostgres };

void PrintTo(Backend backend, std::ostream* out) {
  *out << (backend == Backend::kSqlite ? "SQLite" : "PostgreSQL");
}

// Every behavioural test of the JobStore interface, on both backends: the
// same calls must give the same answers, error codes included.
class JobStoreTest : public testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend::kSqlite) {
      db_ = std::make_unique<SqliteDatabase>();
      return;
    }
    ZQ_ASSERT_OK_AND_ASSIGN(db_, PostgresDatabase::Create());
  }

  // Through the interface, as the server uses it (its default arguments live
  // there).
  std::unique_ptr<JobStore> OpenStore() {
    auto store = db_->Open();
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  std::unique_ptr<TestDatabase> db_;
};

JobFilter ForTenant(const std::string& tenant) {
  JobFilter filter;
  filter.tenant = tenant;
  return filter;
}

v1::Model MakeModel(const std::string& id, const std::string& tenant,
                    v1::ModelState state = v1::MODEL_READY,
                    const std::string& sha = "") {
  v1::Model model;
  model.set_id(id);
  model.set_tenant(tenant);
  model.set_name("name of " + id);
  model.set_sha256(sha.empty() ? Sha256Hex(id) : sha);
  model.set_size_bytes(1234);
  model.add_input_shape(3);
  model.add_input_shape(32);
  model.add_input_shape(32);
  model.set_state(state);
  return model;
}

v1::Job MakeJob(const std::string& id, const std::string& tenant,
                const std::string& model_id,
                v1::JobState state = v1::JOB_QUEUED,
                const std::string& request_id = "") {
  v1::Job job;
  job.set_id(id);
  job.set_tenant(tenant);
  job.set_model_id(model_id);
  job.set_state(state);
  job.set_request_id(request_id);
  job.mutable_config()->set_weight_bits(4);
  job.set_priority(1);
  return job;
}

v1::JobEvent MakeEvent(int64_t seq, const std::string& message = "") {
  v1::JobEvent event;
  event.set_seq(seq);
  event.set_type(v1::EVENT_MESSAGE);
  event.set_message(message.empty() ? absl::StrCat("event ", seq) : message);
  return event;
}

std::vector<std::string> Ids(const std::vector<v1::Model>& models) {
  std::vector<std::string> ids;
  for (const v1::Model& m : models) ids.push_back(m.id());
  return ids;
}

std::vector<std::string> Ids(const std::vector<v1::Job>& jobs) {
  std::vector<std::string> ids;
  for (const v1::Job& j : jobs) ids.push_back(j.id());
  return ids;
}

std::vector<int64_t> Seqs(const std::vector<v1::JobEvent>& events) {
  std::vector<int64_t> seqs;
  for (const v1::JobEvent& e : events) seqs.push_back(e.seq());
  return seqs;
}

// Follows page tokens to the end; fails the test on a repeated token.
void AllModelPages(JobStore& store, const std::string& tenant, int page_size,
                   std::vector<std::string>* ids, int* pages) {
  std::string token;
  std::set<std::string> tokens;
  *pages = 0;
  do {
    ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> page,
                            store.ListModels(tenant, page_size, token));
    ++*pages;
    ASSERT_LE(static_cast<int>(page.items.size()), page_size);
    for (const v1::Model& m : page.items) ids->push_back(m.id());
    token = page.next_page_token;
    ASSERT_TRUE(token.empty() || tokens.insert(token).second)
        << "token repeated: " << token;
  } while (!token.empty());
}

void AllJobPages(JobStore& store, const JobFilter& filter, int page_size,
                 std::vector<std::string>* ids) {
  std::string token;
  do {
    ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Job> page,
                            store.ListJobs(filter, page_size, token));
    ASSERT_LE(static_cast<int>(page.items.size()), page_size);
    for (const v1::Job& j : page.items) ids->push_back(j.id());
    token = page.next_page_token;
  } while (!token.empty());
}

TEST_P(JobStoreTest, PutGetListModelsAcrossPages) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(db_->StoredSchemaVersion(), db_->CurrentSchemaVersion());
  std::vector<std::string> expected;
  for (int i = 0; i < 23; ++i) {
    const std::string id = absl::StrCat("model-", i);
    ZQ_ASSERT_OK(store->PutModel(MakeModel(id, "acme")));
    expected.insert(expected.begin(), id);  // newest first
    if (i % 4 == 0)
      ZQ_ASSERT_OK(
          store->PutModel(MakeModel(absl::StrCat("other-", i), "initech")));
  }
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Model got, store->GetModel("model-7"));
  EXPECT_EQ(got.SerializeAsString(),
            MakeModel("model-7", "acme").SerializeAsString());
  EXPECT_EQ(store->GetModel("nope").status().code(),
            absl::StatusCode::kNotFound);

  std::vector<std::string> ids;
  int pages = 0;
  AllModelPages(*store, "acme", 5, &ids, &pages);
  EXPECT_EQ(ids, expected);  // no duplicates, no gaps, newest first
  EXPECT_EQ(pages, 5);

  // A page size that divides the count exactly ends without an empty page.
  ids.clear();
  AllModelPages(*store, "initech", 3, &ids, &pages);
  EXPECT_EQ(ids.size(), 6u);
  EXPECT_EQ(pages, 2);

  ids.clear();
  AllModelPages(*store, "nobody", 5, &ids, &pages);
  EXPECT_TRUE(ids.empty());
  EXPECT_EQ(pages, 1);

  // Replacing a record keeps its place in the order.
  v1::Model updated = MakeModel("model-3", "acme", v1::MODEL_INVALID);
  updated.set_state_reason("forward failed");
  ZQ_ASSERT_OK(store->PutModel(updated));
  ZQ_ASSERT_OK_AND_ASSIGN(got, store->GetModel("model-3"));
  EXPECT_EQ(got.state(), v1::MODEL_INVALID);
  EXPECT_EQ(got.state_reason(), "forward failed");
  ids.clear();
  AllModelPages(*store, "acme", 7, &ids, &pages);
  EXPECT_EQ(ids, expected);

  // Rows added between pages appear on no later page: they are newer.
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> first,
                          store->ListModels("acme", 10, ""));
  ZQ_ASSERT_OK(store->PutModel(MakeModel("model-late", "acme")));
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> second,
                          store->ListModels("acme", 10, first.next_page_token));
  EXPECT_EQ(Ids(second.items), std::vector<std::string>(expected.begin() + 10,
                                                        expected.begin() + 20));
}

TEST_P(JobStoreTest, PageSizeDefaultsAndCap) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (int i = 0; i < 520; ++i) {
    ZQ_ASSERT_OK(store->PutModel(MakeModel(absl::StrCat("m", i), "acme")));
  }
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> page,
                          store->ListModels("acme", 0, ""));
  EXPECT_EQ(page.items.size(), 50u);
  EXPECT_FALSE(page.next_page_token.empty());
  ZQ_ASSERT_OK_AND_ASSIGN(page, store->ListModels("acme", -3, ""));
  EXPECT_EQ(page.items.size(), 50u);
  ZQ_ASSERT_OK_AND_ASSIGN(page, store->ListModels("acme", 100000, ""));
  EXPECT_EQ(page.items.size(), 500u);
  ZQ_ASSERT_OK_AND_ASSIGN(page,
                          store->ListModels("acme", 500, page.next_page_token));
  EXPECT_EQ(page.items.size(), 20u);
  EXPECT_TRUE(page.next_page_token.empty());
}

TEST_P(JobStoreTest, MalformedPageTokens) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (int i = 0; i < 4; ++i) {
    ZQ_ASSERT_OK(store->PutModel(MakeModel(absl::StrCat("m", i), "acme")));
    ZQ_ASSERT_OK(
        store->CreateJob(MakeJob(absl::StrCat("j", i), "acme", "m0")).status());
  }
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> models,
                          store->ListModels("acme", 2, ""));
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Job> jobs,
                          store->ListJobs(ForTenant("acme"), 2, ""));
  ASSERT_FALSE(models.next_page_token.empty());
  ASSERT_FALSE(jobs.next_page_token.empty());
  for (const std::string& token :
       {std::string("garbage"), std::string("m"), std::string("m-1"),
        std::string("m0"), std::string("m 3"), std::string("m3x"),
        std::string("m99999999999999999999"), jobs.next_page_token}) {
    EXPECT_EQ(store->ListModels("acme", 2, token).status().code(),
              absl::StatusCode::kInvalidArgument)
        << token;
  }
  for (const std::string& token :
       {std::string("garbage"), std::string("j"), std::string("j+2"),
        models.next_page_token}) {
    EXPECT_EQ(store->ListJobs(ForTenant("acme"), 2, token).status().code(),
              absl::StatusCode::kInvalidArgument)
        << token;
  }
}

TEST_P(JobStoreTest, ModelsInStateCountAndDelete) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string sha = Sha256Hex("shared bytes");
  ZQ_ASSERT_OK(
      store->PutModel(MakeModel("a1", "acme", v1::MODEL_INSPECTING, sha)));
  ZQ_ASSERT_OK(
      store->PutModel(MakeModel("b1", "initech", v1::MODEL_READY, sha)));
  ZQ_ASSERT_OK(store->PutModel(MakeModel("a2", "acme", v1::MODEL_READY)));
  ZQ_ASSERT_OK(
      store->PutModel(MakeModel("b2", "initech", v1::MODEL_INSPECTING, sha)));

  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Model> inspecting,
                          store->ModelsInState(v1::MODEL_INSPECTING));
  EXPECT_EQ(Ids(inspecting),
            (std::vector<std::string>{"a1", "b2"}));  // oldest first
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Model> invalid,
                          store->ModelsInState(v1::MODEL_INVALID));
  EXPECT_TRUE(invalid.empty());

  ZQ_ASSERT_OK_AND_ASSIGN(int64_t count, store->CountBlobRefs(sha));
  EXPECT_EQ(count, 3);
  ZQ_ASSERT_OK_AND_ASSIGN(count,
                          store->CountBlobRefs(Sha256Hex("nothing")));
  EXPECT_EQ(count, 0);

  // Jobs and their events outlive their model.
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("job", "acme", "a1")).status());
  ZQ_ASSERT_OK(store->UpdateJob(MakeJob("job", "acme", "a1", v1::JOB_SUCCEEDED),
                                {MakeEvent(1), MakeEvent(2)}));
  ZQ_ASSERT_OK(store->DeleteModel("a1"));
  EXPECT_EQ(store->GetModel("a1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->DeleteModel("a1").code(), absl::StatusCode::kNotFound);
  ZQ_ASSERT_OK_AND_ASSIGN(count, store->CountBlobRefs(sha));
  EXPECT_EQ(count, 2);
  ZQ_ASSERT_OK_AND_ASSIGN(inspecting,
                          store->ModelsInState(v1::MODEL_INSPECTING));
  EXPECT_EQ(Ids(inspecting), (std::vector<std::string>{"b2"}));
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job job, store->GetJob("job"));
  EXPECT_EQ(job.state(), v1::JOB_SUCCEEDED);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("job", 0));
  EXPECT_EQ(events.size(), 2u);

  // A re-put model id after deletion is a new, newest row.
  ZQ_ASSERT_OK(store->PutModel(MakeModel("a1", "acme")));
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> page,
                          store->ListModels("acme", 10, ""));
  EXPECT_EQ(Ids(page.items), (std::vector<std::string>{"a1", "a2"}));
}

TEST_P(JobStoreTest, CreateJobIsIdempotentPerTenantAndRequestId) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK_AND_ASSIGN(
      CreateJobResult first,
      store->CreateJob(MakeJob("j1", "acme", "m1", v1::JOB_QUEUED, "req")));
  EXPECT_TRUE(first.created);
  EXPECT_EQ(first.job.id(), "j1");

  // A retry with a new server-made id gets the first job back, untouched.
  v1::Job retry = MakeJob("j2", "acme", "m1", v1::JOB_QUEUED, "req");
  retry.set_priority(50);
  ZQ_ASSERT_OK_AND_ASSIGN(CreateJobResult second, store->CreateJob(retry));
  EXPECT_FALSE(second.created);
  EXPECT_EQ(second.job.id(), "j1");
  EXPECT_EQ(second.job.priority(), 1);
  EXPECT_EQ(store->GetJob("j2").status().code(), absl::StatusCode::kNotFound);

  // The same request id from another tenant is another job.
  ZQ_ASSERT_OK_AND_ASSIGN(
      CreateJobResult other,
      store->CreateJob(MakeJob("j3", "initech", "m9", v1::JOB_QUEUED, "req")));
  EXPECT_TRUE(other.created);
  EXPECT_EQ(other.job.id(), "j3");

  // The retry sees the job as it is now, not as it was created.
  ZQ_ASSERT_OK(
      store->UpdateJob(MakeJob("j1", "acme", "m1", v1::JOB_RUNNING, "req")));
  ZQ_ASSERT_OK_AND_ASSIGN(second, store->CreateJob(retry));
  EXPECT_FALSE(second.created);
  EXPECT_EQ(second.job.state(), v1::JOB_RUNNING);

  // No request id: never deduplicated.
  ZQ_ASSERT_OK_AND_ASSIGN(CreateJobResult a,
                          store->CreateJob(MakeJob("j4", "acme", "m1")));
  ZQ_ASSERT_OK_AND_ASSIGN(CreateJobResult b,
                          store->CreateJob(MakeJob("j5", "acme", "m1")));
  EXPECT_TRUE(a.created);
  EXPECT_TRUE(b.created);

  EXPECT_EQ(store->CreateJob(MakeJob("j4", "acme", "m1")).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store->CreateJob(v1::Job()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(JobStoreTest, UpdateJobAndListEvents) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m1")).status());
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j1", 0));
  EXPECT_TRUE(events.empty());

  v1::Job running = MakeJob("j1", "acme", "m1", v1::JOB_RUNNING);
  running.set_stage(v1::STAGE_DISTILL);
  running.set_last_seq(3);
  ZQ_ASSERT_OK(
      store->UpdateJob(running, {MakeEvent(1), MakeEvent(2), MakeEvent(3)}));
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job got, store->GetJob("j1"));
  EXPECT_EQ(got.SerializeAsString(), running.SerializeAsString());

  // Events come back in seq order whatever order they were written in.
  ZQ_ASSERT_OK(store->UpdateJob(running, {MakeEvent(10), MakeEvent(5)}));
  ZQ_ASSERT_OK(store->UpdateJob(running));  // record only
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("j1", 0));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{1, 2, 3, 5, 10}));
  EXPECT_EQ(events[1].message(), "event 2");
  EXPECT_EQ(events[1].SerializeAsString(), MakeEvent(2).SerializeAsString());
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("j1", 2));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{3, 5, 10}));
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("j1", 0, 2));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{1, 2}));
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("j1", 3, 1));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{5}));
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("j1", 10));
  EXPECT_TRUE(events.empty());
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("other", 0));
  EXPECT_TRUE(events.empty());

  EXPECT_EQ(
      store->UpdateJob(MakeJob("ghost", "acme", "m1"), {MakeEvent(1)}).code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(store->GetJob("ghost").status().code(),
            absl::StatusCode::kNotFound);
  ZQ_ASSERT_OK_AND_ASSIGN(events, store->ListEvents("ghost", 0));
  EXPECT_TRUE(events.empty());
}

TEST_P(JobStoreTest, DuplicateSeqIsAlreadyExistsAndAppliesNothing) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m1")).status());
  const v1::Job running = MakeJob("j1", "acme", "m1", v1::JOB_RUNNING);
  ZQ_ASSERT_OK(store->UpdateJob(running, {MakeEvent(1), MakeEvent(2)}));

  v1::Job finished = MakeJob("j1", "acme", "m1", v1::JOB_SUCCEEDED);
  finished.set_step(99);
  absl::Status status = store->UpdateJob(
      finished, {MakeEvent(3), MakeEvent(2, "again"), MakeEvent(4)});
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists) << status;
  EXPECT_NE(status.message().find("seq 2"), absl::string_view::npos) << status;
  // Within one call, too.
  status = store->UpdateJob(finished, {MakeEvent(7), MakeEvent(7)});
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists) << status;

  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job got, store->GetJob("j1"));
  EXPECT_EQ(got.SerializeAsString(), running.SerializeAsString());
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j1", 0));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(events[1].message(), "event 2");
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Job> active,
                          store->JobsInStates({v1::JOB_RUNNING}));
  EXPECT_EQ(Ids(active), std::vector<std::string>{"j1"});

  // The store is still usable after the rolled back transaction.
  ZQ_ASSERT_OK(store->UpdateJob(finished, {MakeEvent(3)}));
  ZQ_ASSERT_OK_AND_ASSIGN(got, store->GetJob("j1"));
  EXPECT_EQ(got.state(), v1::JOB_SUCCEEDED);
}

TEST_P(JobStoreTest, ListJobsFiltersAndPages) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const v1::JobState states[] = {v1::JOB_QUEUED, v1::JOB_RUNNING,
                                 v1::JOB_SUCCEEDED};
  struct Row {
    std::string id, model;
    v1::JobState state;
  };
  std::vector<Row> rows;  // creation order
  for (int i = 0; i < 30; ++i) {
    Row row{absl::StrCat("job-", i), i % 2 == 0 ? "m-even" : "m-odd",
            states[i % 3]};
    ZQ_ASSERT_OK(
        store->CreateJob(MakeJob(row.id, "acme", row.model, v1::JOB_QUEUED))
            .status());
    ZQ_ASSERT_OK(
        store->UpdateJob(MakeJob(row.id, "acme", row.model, row.state)));
    rows.push_back(row);
    ZQ_ASSERT_OK(store
                     ->CreateJob(MakeJob(absl::StrCat("other-", i), "initech",
                                         row.model, row.state))
                     .status());
  }
  auto expect = [&](v1::JobState state, const std::string& model) {
    std::vector<std::string> ids;
    for (auto it = rows.rbegin(); it != rows.rend(); ++it) {
      if (state != v1::JOB_STATE_UNSPECIFIED && it->state != state) continue;
      if (!model.empty() && it->model != model) continue;
      ids.push_back(it->id);
    }
    return ids;
  };
  for (v1::JobState state :
       {v1::JOB_STATE_UNSPECIFIED, v1::JOB_QUEUED, v1::JOB_RUNNING,
        v1::JOB_SUCCEEDED, v1::JOB_FAILED}) {
    for (const std::string& model :
         {std::string(), std::string("m-even"), std::string("m-odd"),
          std::string("m-none")}) {
      for (int page_size : {1, 4, 7, 100}) {
        JobFilter filter;
        filter.tenant = "acme";
        filter.state = state;
        filter.model_id = model;
        std::vector<std::string> ids;
        AllJobPages(*store, filter, page_size, &ids);
        EXPECT_EQ(ids, expect(state, model))
            << "state " << state << " model " << model << " page " << page_size;
      }
    }
  }
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Job> none,
                          store->ListJobs(ForTenant("nobody"), 10, ""));
  EXPECT_TRUE(none.items.empty());
  EXPECT_TRUE(none.next_page_token.empty());
}

TEST_P(JobStoreTest, JobsInStatesAndActiveCounts) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(
      store->CreateJob(MakeJob("q1", "acme", "m1", v1::JOB_QUEUED)).status());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("r1", "initech", "m1", v1::JOB_RUNNING))
                   .status());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("s1", "acme", "m1", v1::JOB_SUCCEEDED))
                   .status());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("q2", "initech", "m2", v1::JOB_QUEUED))
                   .status());
  ZQ_ASSERT_OK(
      store->CreateJob(MakeJob("f1", "acme", "m2", v1::JOB_FAILED)).status());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("c1", "acme", "m2", v1::JOB_CANCELLED))
                   .status());

  ZQ_ASSERT_OK_AND_ASSIGN(
      std::vector<v1::Job> jobs,
      store->JobsInStates({v1::JOB_QUEUED, v1::JOB_RUNNING}));
  EXPECT_EQ(Ids(jobs),
            (std::vector<std::string>{"q1", "r1", "q2"}));  // oldest first
  ZQ_ASSERT_OK_AND_ASSIGN(jobs, store->JobsInStates({v1::JOB_CANCELLED}));
  EXPECT_EQ(Ids(jobs), std::vector<std::string>{"c1"});
  ZQ_ASSERT_OK_AND_ASSIGN(jobs, store->JobsInStates({}));
  EXPECT_TRUE(jobs.empty());

  ZQ_ASSERT_OK_AND_ASSIGN(int64_t active, store->CountActiveJobsForModel("m1"));
  EXPECT_EQ(active, 2);
  ZQ_ASSERT_OK_AND_ASSIGN(active, store->CountActiveJobsForModel("m2"));
  EXPECT_EQ(active, 1);
  ZQ_ASSERT_OK(
      store->UpdateJob(MakeJob("q2", "initech", "m2", v1::JOB_CANCELLED)));
  ZQ_ASSERT_OK_AND_ASSIGN(active, store->CountActiveJobsForModel("m2"));
  EXPECT_EQ(active, 0);
  ZQ_ASSERT_OK_AND_ASSIGN(active, store->CountActiveJobsForModel("m-none"));
  EXPECT_EQ(active, 0);
}

// ---------------------------------------------------------------- recovery

TEST_P(JobStoreTest, ReopenFindsEverything) {
  std::string token;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < 6; ++i) {
      ZQ_ASSERT_OK(store->PutModel(MakeModel(absl::StrCat("m", i), "acme")));
    }
    ZQ_ASSERT_OK(
        store->CreateJob(MakeJob("j1", "acme", "m1", v1::JOB_QUEUED, "req"))
            .status());
    ZQ_ASSERT_OK(
        store->UpdateJob(MakeJob("j1", "acme", "m1", v1::JOB_RUNNING, "req"),
                         {MakeEvent(1), MakeEvent(2)}));
    ZQ_ASSERT_OK(store->CreateJob(MakeJob("j2", "acme", "m2")).status());
    ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> page,
                            store->ListModels("acme", 4, ""));
    token = page.next_page_token;
  }
  EXPECT_EQ(db_->StoredSchemaVersion(), db_->CurrentSchemaVersion());

  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Model model, store->GetModel("m3"));
  EXPECT_EQ(model.SerializeAsString(),
            MakeModel("m3", "acme").SerializeAsString());
  // A page token survives a restart.
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> rest,
                          store->ListModels("acme", 4, token));
  EXPECT_EQ(Ids(rest.items), (std::vector<std::string>{"m1", "m0"}));
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job job, store->GetJob("j1"));
  EXPECT_EQ(job.state(), v1::JOB_RUNNING);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j1", 0));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{1, 2}));
  ZQ_ASSERT_OK_AND_ASSIGN(
      std::vector<v1::Job> pending,
      store->JobsInStates({v1::JOB_QUEUED, v1::JOB_RUNNING}));
  EXPECT_EQ(Ids(pending), (std::vector<std::string>{"j1", "j2"}));
  // The request id index survived too.
  ZQ_ASSERT_OK_AND_ASSIGN(
      CreateJobResult retry,
      store->CreateJob(MakeJob("j9", "acme", "m1", v1::JOB_QUEUED, "req")));
  EXPECT_FALSE(retry.created);
  EXPECT_EQ(retry.job.id(), "j1");
  // New rows after the restart are newer than the old ones.
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m-new", "acme")));
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> first,
                          store->ListModels("acme", 2, ""));
  EXPECT_EQ(Ids(first.items), (std::vector<std::string>{"m-new", "m5"}));
}

TEST_P(JobStoreTest, NewerSchemaIsRefused) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
  }
  const int64_t newer = db_->CurrentSchemaVersion() + 1;
  ZQ_ASSERT_OK(db_->SetStoredSchemaVersion(newer));
  absl::StatusOr<std::unique_ptr<JobStore>> store = db_->Open();
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition)
      << store.status();
  EXPECT_NE(store.status().message().find("newer"), absl::string_view::npos)
      << store.status();
  // Left as the newer server wrote it.
  EXPECT_EQ(db_->StoredSchemaVersion(), newer);
}

// A SUCCEEDED job with the given artifacts (name -> sha) of 100 bytes each,
// ended at `end_unix`.
v1::Job SucceededJob(const std::string& id, const std::string& tenant,
                     const std::vector<std::pair<std::string, std::string>>&
                         artifacts,
                     int64_t end_unix = 1000) {
  v1::Job job = MakeJob(id, tenant, "m", v1::JOB_SUCCEEDED);
  for (const auto& [name, sha] : artifacts) {
    v1::Artifact* a = job.mutable_result()->add_artifacts();
    a->set_name(name);
    a->set_sha256(sha);
    a->set_size_bytes(100);
  }
  job.mutable_end_time()->set_seconds(end_unix);
  return job;
}

TEST_P(JobStoreTest, BlobRefsCountWhatIsReallyStored) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string model_sha = Sha256Hex("model bytes");
  const std::string a = Sha256Hex("artifact a");
  const std::string b = Sha256Hex("artifact b");
  // acme: one model (1234 bytes) and two jobs; j2's second artifact is the
  // model's own bytes (a downloaded export uploaded again, say), and j1 and
  // j2 share artifact a.
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme", v1::MODEL_READY, model_sha)));
  for (const std::string& id : {"j1", "j2", "j3"}) {
    ZQ_ASSERT_OK(store->CreateJob(MakeJob(id, "acme", "m")).status());
  }
  ZQ_ASSERT_OK(store->UpdateJob(SucceededJob("j1", "acme", {{"x", a}}, 30),
                                {MakeEvent(1)}));
  ZQ_ASSERT_OK(store->UpdateJob(
      SucceededJob("j2", "acme", {{"x", a}, {"y", b}}, 10)));
  // A running job holds nothing yet and has not ended.
  ZQ_ASSERT_OK(store->UpdateJob(MakeJob("j3", "acme", "m", v1::JOB_RUNNING)));
  // initech holds artifact a too.
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("k1", "initech", "m")).status());
  ZQ_ASSERT_OK(store->UpdateJob(SucceededJob("k1", "initech", {{"x", a}}, 20)));

  ZQ_ASSERT_OK_AND_ASSIGN(int64_t refs, store->CountBlobRefs(a));
  EXPECT_EQ(refs, 3);
  ZQ_ASSERT_OK_AND_ASSIGN(refs, store->CountBlobRefs(model_sha));
  EXPECT_EQ(refs, 1);
  // Distinct blobs: 1234 + 100 (a) + 100 (b), not 1234 + 3 * 100.
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t bytes, store->StoredBytes("acme"));
  EXPECT_EQ(bytes, 1434);
  ZQ_ASSERT_OK_AND_ASSIGN(bytes, store->StoredBytes("nobody"));
  EXPECT_EQ(bytes, 0);
  ZQ_ASSERT_OK_AND_ASSIGN(auto by_tenant, store->StoredBytesByTenant());
  EXPECT_EQ(by_tenant, (std::vector<std::pair<std::string, int64_t>>{
                           {"acme", 1434}, {"initech", 100}}));
  ZQ_ASSERT_OK_AND_ASSIGN(bool holds, store->TenantHoldsBlob("initech", a));
  EXPECT_TRUE(holds);
  ZQ_ASSERT_OK_AND_ASSIGN(holds, store->TenantHoldsBlob("initech", b));
  EXPECT_FALSE(holds);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<Holding> largest,
                          store->LargestHoldings("acme", 2));
  ASSERT_EQ(largest.size(), 2u);
  EXPECT_EQ(largest[0].owner, "m");
  EXPECT_TRUE(largest[0].is_model);
  EXPECT_EQ(largest[0].bytes, 1234);
  EXPECT_EQ(largest[1].owner, "j2");
  EXPECT_FALSE(largest[1].is_model);
  EXPECT_EQ(largest[1].bytes, 200);

  // Ended jobs, oldest end first; the running one is not among them.
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Job> ended,
                          store->JobsEndedBefore(25, 0));
  EXPECT_EQ(Ids(ended), (std::vector<std::string>{"j2", "k1"}));
  ZQ_ASSERT_OK_AND_ASSIGN(ended, store->JobsEndedBefore(1000, 2));
  EXPECT_EQ(Ids(ended), (std::vector<std::string>{"j2", "k1"}));
  ZQ_ASSERT_OK_AND_ASSIGN(ended, store->JobsEndedBefore(1000, 0));
  EXPECT_EQ(Ids(ended), (std::vector<std::string>{"j2", "k1", "j1"}));

  // Deleting a job takes its events and references, nothing else.
  ZQ_ASSERT_OK(store->DeleteJob("j1"));
  EXPECT_EQ(store->GetJob("j1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->DeleteJob("j1").code(), absl::StatusCode::kNotFound);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j1", 0));
  EXPECT_TRUE(events.empty());
  ZQ_ASSERT_OK_AND_ASSIGN(refs, store->CountBlobRefs(a));
  EXPECT_EQ(refs, 2);
  ZQ_ASSERT_OK_AND_ASSIGN(bytes, store->StoredBytes("acme"));
  EXPECT_EQ(bytes, 1434);  // j2 still holds a
  ZQ_ASSERT_OK(store->DeleteJob("j2"));
  ZQ_ASSERT_OK_AND_ASSIGN(bytes, store->StoredBytes("acme"));
  EXPECT_EQ(bytes, 1234);
  ZQ_ASSERT_OK(store->DeleteModel("m"));
  ZQ_ASSERT_OK_AND_ASSIGN(bytes, store->StoredBytes("acme"));
  EXPECT_EQ(bytes, 0);
  ZQ_ASSERT_OK_AND_ASSIGN(refs, store->CountBlobRefs(a));
  EXPECT_EQ(refs, 1);  // initech's
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job running, store->GetJob("j3"));
  EXPECT_EQ(running.state(), v1::JOB_RUNNING);
}

// What version 3 added to an SQLite file (a database taken back to version
// 2 drops it).
constexpr char kDropVersion3[] =
    "DROP INDEX jobs_queue; DROP INDEX jobs_running_by_owner; "
    "ALTER TABLE jobs DROP COLUMN priority; "
    "ALTER TABLE jobs DROP COLUMN device; "
    "ALTER TABLE jobs DROP COLUMN attempt; "
    "ALTER TABLE jobs DROP COLUMN cancel_requested; "
    "ALTER TABLE jobs DROP COLUMN owner; "
    "ALTER TABLE jobs DROP COLUMN lease_until; "
    "ALTER TABLE jobs DROP COLUMN not_before; ";

TEST(JobStoreRecovery, Version1DatabaseGetsItsBlobRefsOnMigration) {
  ScratchDir dir;
  const std::string path = dir.Sub("zeroq.db");
  const std::string a = Sha256Hex("artifact a");
  {
    auto store = OpenSqliteStore(path);
    ASSERT_NE(store, nullptr);
    ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
    ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m")).status());
    ZQ_ASSERT_OK(store->UpdateJob(SucceededJob("j1", "acme", {{"x", a}}, 50)));
    ZQ_ASSERT_OK(store->CreateJob(MakeJob("j2", "acme", "m")).status());
  }
  {
    // Back to what a version 1 server wrote.
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    const std::string sql = absl::StrCat(
        kDropVersion3,
        "DROP TABLE blob_refs; DROP INDEX jobs_by_end; "
        "ALTER TABLE jobs DROP COLUMN end_unix; PRAGMA user_version = 1;");
    char* error = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error),
              SQLITE_OK)
        << (error ? error : "");
    sqlite3_free(error);
    sqlite3_close(db);
  }
  EXPECT_EQ(ReadUserVersion(path), 1);
  auto store = OpenSqliteStore(path);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(ReadUserVersion(path), SqliteJobStore::kSchemaVersion);
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t bytes, store->StoredBytes("acme"));
  EXPECT_EQ(bytes, 1234 + 100);
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t refs, store->CountBlobRefs(a));
  EXPECT_EQ(refs, 1);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Job> ended,
                          store->JobsEndedBefore(51, 0));
  EXPECT_EQ(Ids(ended), (std::vector<std::string>{"j1"}));
}

TEST(JobStoreRecovery, NotADatabaseIsAnError) {
  ScratchDir dir;
  WriteFile(dir.Sub("zeroq.db"), std::string(8192, 'x'));
  EXPECT_FALSE(SqliteJobStore::Open(dir.Sub("zeroq.db")).ok());
  EXPECT_FALSE(SqliteJobStore::Open(dir.Sub("no/such/dir/zeroq.db")).ok());
}

TEST_P(JobStoreTest, ConcurrentWritersAllLand) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(
      store->CreateJob(MakeJob("shared", "acme", "m1", v1::JOB_RUNNING))
          .status());
  constexpr int kThreads = 8;
  constexpr int kUpdates = 40;
  std::vector<std::thread> threads;
  std::vector<absl::Status> errors(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Each thread also owns a job of its own, to mix the rows touched.
      const std::string own = absl::StrCat("own-", t);
      absl::Status status =
          store->CreateJob(MakeJob(own, "acme", "m1")).status();
      for (int i = 0; status.ok() && i < kUpdates; ++i) {
        const int64_t seq = t * 1000 + 2 * i + 1;
        v1::Job job = MakeJob("shared", "acme", "m1", v1::JOB_RUNNING);
        job.set_last_seq(seq + 1);
        status = store->UpdateJob(job, {MakeEvent(seq), MakeEvent(seq + 1)});
        if (status.ok())
          status =
              store->UpdateJob(MakeJob(own, "acme", "m1"), {MakeEvent(i + 1)});
        if (status.ok())
          status = store->ListEvents("shared", seq - 1, 2).status();
      }
      errors[t] = status;
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const absl::Status& status : errors) EXPECT_TRUE(status.ok()) << status;
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("shared", 0));
  ASSERT_EQ(events.size(), static_cast<size_t>(kThreads * kUpdates * 2));
  std::vector<int64_t> expected;
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < 2 * kUpdates; ++i) expected.push_back(t * 1000 + i + 1);
  }
  EXPECT_EQ(Seqs(events), expected);
  for (int t = 0; t < kThreads; ++t) {
    ZQ_ASSERT_OK_AND_ASSIGN(events,
                            store->ListEvents(absl::StrCat("own-", t), 0));
    EXPECT_EQ(events.size(), static_cast<size_t>(kUpdates));
  }
}

TEST_P(JobStoreTest, ConcurrentRetriesCreateOneJob) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // The same request arriving at once on several threads (replicas, later):
  // one job, and every caller gets it.
  constexpr int kThreads = 8;
  std::vector<absl::StatusOr<CreateJobResult>> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      results[t] = store->CreateJob(MakeJob(absl::StrCat("j", t), "acme", "m",
                                            v1::JOB_QUEUED, "same-request"));
    });
  }
  for (std::thread& thread : threads) thread.join();
  int created = 0;
  std::set<std::string> ids;
  for (const auto& result : results) {
    ASSERT_TRUE(result.ok()) << result.status();
    created += result->created ? 1 : 0;
    ids.insert(result->job.id());
  }
  EXPECT_EQ(created, 1);
  EXPECT_EQ(ids.size(), 1u);
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Job> page,
                          store->ListJobs(ForTenant("acme"), 100, ""));
  EXPECT_EQ(Ids(page.items), std::vector<std::string>(ids.begin(), ids.end()));
}

TEST_P(JobStoreTest, ErrorsCarryTheSameCodesAndMessages) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto expect = [](const absl::Status& status, absl::StatusCode code,
                   absl::string_view message) {
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_EQ(status.message(), message) << status;
  };
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
  ZQ_ASSERT_OK(
      store->CreateJob(MakeJob("j1", "acme", "m", v1::JOB_QUEUED, "req-1"))
          .status());
  ZQ_ASSERT_OK(
      store->CreateJob(MakeJob("j2", "acme", "m", v1::JOB_QUEUED, "req-2"))
          .status());
  const v1::Job j1 = MakeJob("j1", "acme", "m", v1::JOB_RUNNING, "req-1");
  ZQ_ASSERT_OK(store->UpdateJob(j1, {MakeEvent(1)}));

  expect(store->GetModel("nope").status(), absl::StatusCode::kNotFound,
         "model nope not found");
  expect(store->DeleteModel("nope"), absl::StatusCode::kNotFound,
         "model nope not found");
  expect(store->GetJob("nope").status(), absl::StatusCode::kNotFound,
         "job nope not found");
  expect(store->DeleteJob("nope"), absl::StatusCode::kNotFound,
         "job nope not found");
  expect(store->UpdateJob(MakeJob("nope", "acme", "m")),
         absl::StatusCode::kNotFound, "job nope not found");
  expect(store->CreateJob(MakeJob("j1", "acme", "m")).status(),
         absl::StatusCode::kAlreadyExists, "job j1 already exists");
  expect(store->UpdateJob(j1, {MakeEvent(1)}),
         absl::StatusCode::kAlreadyExists,
         "job j1 already has an event with seq 1");
  // Moving a job onto another job's request id.
  expect(store->UpdateJob(
             MakeJob("j2", "acme", "m", v1::JOB_RUNNING, "req-1")),
         absl::StatusCode::kAlreadyExists,
         "job j2: tenant acme already has another job with request id req-1");
  expect(store->ListModels("acme", 10, "j5").status(),
         absl::StatusCode::kInvalidArgument, "malformed page token \"j5\"");
  expect(store->ListJobs(ForTenant("acme"), 10, "m5").status(),
         absl::StatusCode::kInvalidArgument, "malformed page token \"m5\"");
  expect(store->PutModel(v1::Model()), absl::StatusCode::kInvalidArgument,
         "PutModel: model id is empty");
  expect(store->CreateJob(v1::Job()).status(),
         absl::StatusCode::kInvalidArgument, "CreateJob: job id is empty");
  // Nothing of the failed calls stuck.
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job j2, store->GetJob("j2"));
  EXPECT_EQ(j2.request_id(), "req-2");
  EXPECT_EQ(j2.state(), v1::JOB_QUEUED);
}

TEST_P(JobStoreTest, EmptyRecordsRoundTrip) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m1")).status());
  // An event with every field at its default serializes to no bytes at all.
  ZQ_ASSERT_OK(store->UpdateJob(MakeJob("j1", "acme", "m1", v1::JOB_RUNNING),
                                {v1::JobEvent(), MakeEvent(1)}));
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j1", -1));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(events[0].SerializeAsString(), "");
}

TEST_P(JobStoreTest, LimitsOfZeroAndBelow) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
  for (const char* id : {"j1", "j2", "j3"}) {
    ZQ_ASSERT_OK(store->CreateJob(MakeJob(id, "acme", "m")).status());
    ZQ_ASSERT_OK(
        store->UpdateJob(SucceededJob(id, "acme", {{"x", Sha256Hex(id)}}, 10),
                         {MakeEvent(1), MakeEvent(2)}));
  }
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<Holding> holdings,
                          store->LargestHoldings("acme", 0));
  EXPECT_TRUE(holdings.empty());
  ZQ_ASSERT_OK_AND_ASSIGN(holdings, store->LargestHoldings("acme", -1));
  EXPECT_EQ(holdings.size(), 4u);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Job> ended,
                          store->JobsEndedBefore(11, -5));
  EXPECT_EQ(Ids(ended), (std::vector<std::string>{"j1", "j2", "j3"}));
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j2", 0, -1));
  EXPECT_EQ(Seqs(events), (std::vector<int64_t>{1, 2}));
}

// ---------------------------------------------------------------- the queue

const std::vector<v1::DeviceKind> kAllDevices = {v1::DEVICE_ANY, v1::DEVICE_CPU,
                                                 v1::DEVICE_CUDA};

ClaimOptions Claimer(const std::string& owner,
                     std::vector<v1::DeviceKind> devices = kAllDevices,
                     absl::Duration lease = absl::Seconds(30)) {
  ClaimOptions options;
  options.owner = owner;
  options.lease = lease;
  options.devices = std::move(devices);
  return options;
}

// A claim's start, as the server makes it: RUNNING, one attempt more, an
// event.
absl::Status Start(JobChange& change) {
  change.job.set_state(v1::JOB_RUNNING);
  change.job.set_attempts(change.job.attempts() + 1);
  change.events.push_back(MakeEvent(0, "started"));
  return absl::OkStatus();
}

// Back to the queue, not before `not_before`, with an event.
JobEdit Requeue(absl::Time not_before = absl::InfinitePast()) {
  return [not_before](JobChange& change) {
    change.job.set_state(v1::JOB_QUEUED);
    change.not_before = not_before;
    change.events.push_back(MakeEvent(0, "re-queued"));
    return absl::OkStatus();
  };
}

// The id of the job a claim took; "" when there was none.
absl::StatusOr<std::string> ClaimNext(JobStore& store,
                                      const ClaimOptions& options) {
  ZQ_ASSIGN_OR_RETURN(std::optional<JobWrite> claimed,
                      store.ClaimJob(options, Start));
  return claimed.has_value() ? claimed->job.id() : "";
}

std::vector<std::string> LeaseIds(std::vector<LeaseInfo> leases) {
  std::vector<std::string> ids;
  for (const LeaseInfo& l : leases) ids.push_back(l.job_id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

TEST_P(JobStoreTest, CreateJobNumbersItsEventsAndCounts) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  v1::JobEvent timed = MakeEvent(0, "timed");
  timed.mutable_time()->set_seconds(12345);
  const int64_t before = absl::ToUnixSeconds(absl::Now());
  ZQ_ASSERT_OK_AND_ASSIGN(
      CreateJobResult created,
      store->CreateJob(MakeJob("j1", "acme", "m"),
                       {MakeEvent(0, "a"), timed, MakeEvent(0, "c")}));
  EXPECT_TRUE(created.created);
  EXPECT_EQ(created.job.last_seq(), 3);
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job job, store->GetJob("j1"));
  EXPECT_EQ(job.last_seq(), 3);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents("j1", 0));
  ASSERT_EQ(Seqs(events), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(events[0].message(), "a");
  EXPECT_GE(events[0].time().seconds(), before);  // set when unset
  EXPECT_EQ(events[1].time().seconds(), 12345);   // kept
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j2", "acme", "m")).status());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j3", "initech", "m", v1::JOB_RUNNING))
                   .status());
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t count, store->CountJobs(v1::JOB_QUEUED));
  EXPECT_EQ(count, 2);
  ZQ_ASSERT_OK_AND_ASSIGN(count, store->CountJobs(v1::JOB_RUNNING));
  EXPECT_EQ(count, 1);
  ZQ_ASSERT_OK_AND_ASSIGN(count, store->CountJobs(v1::JOB_FAILED));
  EXPECT_EQ(count, 0);
  ZQ_ASSERT_OK_AND_ASSIGN(count, store->CountJobs(v1::JOB_STATE_UNSPECIFIED));
  EXPECT_EQ(count, 3);
}

TEST_P(JobStoreTest, CreateJobHonoursMaxQueued) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const char* id : {"j1", "j2"}) {
    ZQ_ASSERT_OK_AND_ASSIGN(
        CreateJobResult r,
        store->CreateJob(
            MakeJob(id, "acme", "m", v1::JOB_QUEUED, absl::StrCat("req-", id)),
            {}, 2));
    EXPECT_TRUE(r.created);
    EXPECT_FALSE(r.over_queued_limit);
  }
  ZQ_ASSERT_OK_AND_ASSIGN(CreateJobResult full,
                          store->CreateJob(MakeJob("j3", "acme", "m"), {}, 2));
  EXPECT_FALSE(full.created);
  EXPECT_TRUE(full.over_queued_limit);
  EXPECT_EQ(full.queued, 2);
  EXPECT_EQ(store->GetJob("j3").status().code(), absl::StatusCode::kNotFound);
  // A retry of a request the store has wins over the limit.
  ZQ_ASSERT_OK_AND_ASSIGN(
      CreateJobResult retry,
      store->CreateJob(MakeJob("j9", "acme", "m", v1::JOB_QUEUED, "req-j1"), {},
                       2));
  EXPECT_FALSE(retry.created);
  EXPECT_FALSE(retry.over_queued_limit);
  EXPECT_EQ(retry.job.id(), "j1");
  // Other tenants and calls without a limit are not held back.
  ZQ_ASSERT_OK_AND_ASSIGN(
      CreateJobResult other,
      store->CreateJob(MakeJob("k1", "initech", "m"), {}, 2));
  EXPECT_TRUE(other.created);
  ZQ_ASSERT_OK_AND_ASSIGN(CreateJobResult unlimited,
                          store->CreateJob(MakeJob("j4", "acme", "m")));
  EXPECT_TRUE(unlimited.created);
  // A claimed job no longer counts: the third claim takes j2 (j1 first,
  // then initech's k1, whose tenant runs nothing).
  for (int i = 0; i < 3; ++i) {
    ZQ_ASSERT_OK_AND_ASSIGN(std::string id,
                            ClaimNext(*store, Claimer("replica-a")));
    EXPECT_FALSE(id.empty());
  }
  ZQ_ASSERT_OK_AND_ASSIGN(CreateJobResult room,
                          store->CreateJob(MakeJob("j5", "acme", "m"), {}, 2));
  EXPECT_TRUE(room.created);
}

TEST_P(JobStoreTest, ClaimOrderIsPriorityThenFairnessThenAge) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto job = [](const std::string& id, const std::string& tenant, int priority,
                v1::JobState state = v1::JOB_QUEUED) {
    v1::Job j = MakeJob(id, tenant, "m", state);
    j.set_priority(priority);
    return j;
  };
  // Creation order is age order.
  for (const v1::Job& j :
       {job("a1", "a", 1), job("a2", "a", 1), job("b1", "b", 1),
        job("b2", "b", 1), job("a3", "a", 5),
        job("c-running", "c", 1, v1::JOB_RUNNING), job("c1", "c", 1)}) {
    ZQ_ASSERT_OK(store->CreateJob(j).status());
  }
  // a3: priority. b1: b runs nothing, a and c one each. a1: all run one,
  // the oldest. b2 before c1 (a runs two): both run one, b2 is older. Then
  // c1 (b runs two), then a2.
  std::vector<std::string> order;
  for (int i = 0; i < 7; ++i) {
    ZQ_ASSERT_OK_AND_ASSIGN(std::string id,
                            ClaimNext(*store, Claimer("replica-a")));
    if (id.empty()) break;
    order.push_back(id);
  }
  EXPECT_EQ(order,
            (std::vector<std::string>{"a3", "b1", "a1", "b2", "c1", "a2"}));
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job a3, store->GetJob("a3"));
  EXPECT_EQ(a3.state(), v1::JOB_RUNNING);
  EXPECT_EQ(a3.attempts(), 1);
  EXPECT_EQ(a3.last_seq(), 1);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<LeaseInfo> held,
                          store->RenewLeases("replica-a", absl::Seconds(30)));
  EXPECT_EQ(LeaseIds(held),
            (std::vector<std::string>{"a1", "a2", "a3", "b1", "b2", "c1"}));
}

TEST_P(JobStoreTest, ClaimTakesOnlyPlaceableDevicesAndDueJobs) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto job = [](const std::string& id, v1::DeviceKind device) {
    v1::Job j = MakeJob(id, "acme", "m");
    j.set_device_preference(device);
    return j;
  };
  ZQ_ASSERT_OK(store->CreateJob(job("cuda", v1::DEVICE_CUDA)).status());
  ZQ_ASSERT_OK(store->CreateJob(job("any", v1::DEVICE_ANY)).status());
  ZQ_ASSERT_OK(store->CreateJob(job("cpu", v1::DEVICE_CPU)).status());
  ZQ_ASSERT_OK_AND_ASSIGN(std::string id, ClaimNext(*store, Claimer("r", {})));
  EXPECT_EQ(id, "");
  ZQ_ASSERT_OK_AND_ASSIGN(id,
                          ClaimNext(*store, Claimer("r", {v1::DEVICE_CPU})));
  EXPECT_EQ(id, "cpu");
  ZQ_ASSERT_OK_AND_ASSIGN(id,
                          ClaimNext(*store, Claimer("r", {v1::DEVICE_CPU})));
  EXPECT_EQ(id, "");
  ZQ_ASSERT_OK_AND_ASSIGN(
      id, ClaimNext(*store, Claimer("r", {v1::DEVICE_CUDA, v1::DEVICE_ANY})));
  EXPECT_EQ(id, "cuda");
  ZQ_ASSERT_OK_AND_ASSIGN(id,
                          ClaimNext(*store, Claimer("r", {v1::DEVICE_ANY})));
  EXPECT_EQ(id, "any");

  // not_before: a re-queued job waits out its backoff; others go first.
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("later", "acme", "m")).status());
  ZQ_ASSERT_OK(
      store->EditJob("later", nullptr, Requeue(absl::Now() + absl::Hours(1)))
          .status());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("due", "acme", "m")).status());
  ZQ_ASSERT_OK(
      store->EditJob("due", nullptr, Requeue(absl::Now() - absl::Seconds(1)))
          .status());
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*store, Claimer("r")));
  EXPECT_EQ(id, "due");
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*store, Claimer("r")));
  EXPECT_EQ(id, "");
  // An edit that leaves it QUEUED without a not_before: at once.
  ZQ_ASSERT_OK(store->EditJob("later", nullptr, Requeue()).status());
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*store, Claimer("r")));
  EXPECT_EQ(id, "later");
}

TEST_P(JobStoreTest, RunningLimitCountsEveryReplica) {
  auto first = OpenStore();
  auto second = OpenStore();
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  // acme's jobs come first (priority), up to its limit of 2.
  for (int i = 0; i < 4; ++i) {
    v1::Job job = MakeJob(absl::StrCat("a", i), "acme", "m");
    job.set_priority(9);
    ZQ_ASSERT_OK(first->CreateJob(job).status());
  }
  ZQ_ASSERT_OK(first->CreateJob(MakeJob("b0", "initech", "m")).status());
  auto limited = [](const std::string& owner) {
    ClaimOptions options = Claimer(owner);
    options.running_limit = [](const std::string& tenant) {
      return tenant == "acme" ? 2 : 0;
    };
    return options;
  };
  ZQ_ASSERT_OK_AND_ASSIGN(std::string id, ClaimNext(*first, limited("r1")));
  EXPECT_EQ(id, "a0");
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*second, limited("r2")));
  EXPECT_EQ(id, "a1");
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*first, limited("r1")));
  EXPECT_EQ(id, "b0");
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*second, limited("r2")));
  EXPECT_EQ(id, "");
  // One of acme's ends: room for one more.
  ZQ_ASSERT_OK(second
                   ->EditJob("a0", nullptr,
                             [](JobChange& change) {
                               change.job.set_state(v1::JOB_SUCCEEDED);
                               return absl::OkStatus();
                             })
                   .status());
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*first, limited("r1")));
  EXPECT_EQ(id, "a2");
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*first, limited("r1")));
  EXPECT_EQ(id, "");
  // Without the limit the rest goes.
  ZQ_ASSERT_OK_AND_ASSIGN(id, ClaimNext(*second, Claimer("r2")));
  EXPECT_EQ(id, "a3");
}

TEST_P(JobStoreTest, ConcurrentClaimsTakeEachJobOnce) {
  constexpr int kReplicas = 4;
  constexpr int kJobs = 40;
  std::vector<std::unique_ptr<JobStore>> stores;
  for (int i = 0; i < kReplicas; ++i) {
    stores.push_back(OpenStore());
    ASSERT_NE(stores.back(), nullptr);
  }
  for (int i = 0; i < kJobs; ++i) {
    ZQ_ASSERT_OK(stores[0]
                     ->CreateJob(MakeJob(absl::StrCat("j", i),
                                         absl::StrCat("t", i % 3), "m"))
                     .status());
  }
  std::vector<std::vector<std::string>> claimed(kReplicas);
  std::vector<absl::Status> errors(kReplicas);
  std::vector<std::thread> threads;
  for (int r = 0; r < kReplicas; ++r) {
    threads.emplace_back([&, r] {
      while (true) {
        absl::StatusOr<std::string> id =
            ClaimNext(*stores[r], Claimer(absl::StrCat("replica-", r)));
        if (!id.ok()) {
          errors[r] = id.status();
          return;
        }
        if (id->empty()) return;
        claimed[r].push_back(*id);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::multiset<std::string> all;
  for (int r = 0; r < kReplicas; ++r) {
    EXPECT_TRUE(errors[r].ok()) << errors[r];
    all.insert(claimed[r].begin(), claimed[r].end());
  }
  EXPECT_EQ(all.size(), static_cast<size_t>(kJobs));
  EXPECT_EQ(std::set<std::string>(all.begin(), all.end()).size(),
            static_cast<size_t>(kJobs));
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t running,
                          stores[0]->CountJobs(v1::JOB_RUNNING));
  EXPECT_EQ(running, kJobs);
  for (int r = 0; r < kReplicas; ++r) {
    ZQ_ASSERT_OK_AND_ASSIGN(
        std::vector<LeaseInfo> held,
        stores[0]->RenewLeases(absl::StrCat("replica-", r), absl::Seconds(30)));
    EXPECT_EQ(held.size(), claimed[r].size());
    for (const LeaseInfo& lease : held) EXPECT_EQ(lease.attempt, 1);
  }
}

TEST_P(JobStoreTest, LostLeaseFencesTheOldOwnerOut) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m")).status());
  ZQ_ASSERT_OK_AND_ASSIGN(
      std::optional<JobWrite> first,
      store->ClaimJob(Claimer("A", kAllDevices, absl::Milliseconds(200)),
                      Start));
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->job.attempts(), 1);
  EXPECT_EQ(Seqs(first->events), (std::vector<int64_t>{1}));
  const Fence fence_a{"A", 1};
  ZQ_ASSERT_OK(store
                   ->EditJob("j1", &fence_a,
                             [](JobChange& change) {
                               change.job.set_step(5);
                               return absl::OkStatus();
                             })
                   .status());
  // Nothing expired yet.
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<JobWrite> reclaimed,
                          store->ReclaimExpired(10, Requeue()));
  EXPECT_TRUE(reclaimed.empty());

  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  std::string lost_by;
  ZQ_ASSERT_OK_AND_ASSIGN(reclaimed,
                          store->ReclaimExpired(10, [&](JobChange& change) {
                            lost_by = change.owner;
                            return Requeue()(change);
                          }));
  ASSERT_EQ(reclaimed.size(), 1u);
  EXPECT_EQ(lost_by, "A");
  EXPECT_EQ(reclaimed[0].job.state(), v1::JOB_QUEUED);
  EXPECT_EQ(Seqs(reclaimed[0].events), (std::vector<int64_t>{2}));
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<LeaseInfo> held,
                          store->RenewLeases("A", absl::Seconds(30)));
  EXPECT_TRUE(held.empty());

  ZQ_ASSERT_OK_AND_ASSIGN(std::optional<JobWrite> second,
                          store->ClaimJob(Claimer("B"), Start));
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->job.attempts(), 2);
  absl::StatusOr<JobWrite> stale =
      store->EditJob("j1", &fence_a, [](JobChange& change) {
        change.job.set_state(v1::JOB_SUCCEEDED);
        return absl::OkStatus();
      });
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(stale.status().message(),
            "the lease on job j1 was lost: held by B at attempt 2, not A at "
            "attempt 1");
  const Fence fence_b{"B", 2};
  ZQ_ASSERT_OK_AND_ASSIGN(JobWrite done,
                          store->EditJob("j1", &fence_b, [](JobChange& change) {
                            change.job.set_state(v1::JOB_SUCCEEDED);
                            change.events.push_back(MakeEvent(0, "done"));
                            return absl::OkStatus();
                          }));
  EXPECT_EQ(done.job.last_seq(), 4);
  // Ended: nobody holds it, and a fence finds nobody.
  ZQ_ASSERT_OK_AND_ASSIGN(held, store->RenewLeases("B", absl::Seconds(30)));
  EXPECT_TRUE(held.empty());
  stale = store->EditJob("j1", &fence_b, Requeue());
  EXPECT_EQ(stale.status().message(),
            "the lease on job j1 was lost: held by nobody at attempt 2, not B "
            "at attempt 2");
}

TEST_P(JobStoreTest, RenewLeasesReturnsHeldJobsAndCancels) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const char* id : {"j1", "j2", "j3"}) {
    ZQ_ASSERT_OK(store->CreateJob(MakeJob(id, "acme", "m")).status());
  }
  const ClaimOptions short_a =
      Claimer("A", kAllDevices, absl::Milliseconds(300));
  ZQ_ASSERT_OK(store->ClaimJob(short_a, Start).status());       // j1
  ZQ_ASSERT_OK(store->ClaimJob(short_a, Start).status());       // j2
  ZQ_ASSERT_OK(store->ClaimJob(Claimer("B"), Start).status());  // j3
  // An unfenced edit (CancelJob on any replica) marks j2.
  ZQ_ASSERT_OK(store
                   ->EditJob("j2", nullptr,
                             [](JobChange& change) {
                               EXPECT_EQ(change.owner, "A");
                               change.job.set_cancel_requested(true);
                               return absl::OkStatus();
                             })
                   .status());
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<LeaseInfo> held,
                          store->RenewLeases("A", absl::Seconds(30)));
  std::sort(held.begin(), held.end(),
            [](const LeaseInfo& x, const LeaseInfo& y) {
              return x.job_id < y.job_id;
            });
  ASSERT_EQ(held.size(), 2u);
  EXPECT_EQ(held[0].job_id, "j1");
  EXPECT_EQ(held[0].attempt, 1);
  EXPECT_FALSE(held[0].cancel_requested);
  EXPECT_EQ(held[1].job_id, "j2");
  EXPECT_TRUE(held[1].cancel_requested);
  ZQ_ASSERT_OK_AND_ASSIGN(held, store->RenewLeases("B", absl::Seconds(30)));
  EXPECT_EQ(LeaseIds(held), (std::vector<std::string>{"j3"}));
  EXPECT_FALSE(held[0].cancel_requested);
  ZQ_ASSERT_OK_AND_ASSIGN(held, store->RenewLeases("C", absl::Seconds(30)));
  EXPECT_TRUE(held.empty());
  // Renewed past the claim's 300 ms: nothing to reclaim.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<JobWrite> reclaimed,
                          store->ReclaimExpired(0, Requeue()));
  EXPECT_TRUE(reclaimed.empty());
}

TEST_P(JobStoreTest, ReclaimOwnedTakesBackOneReplicasJobs) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const char* id : {"j1", "j2", "j3"}) {
    ZQ_ASSERT_OK(store->CreateJob(MakeJob(id, "acme", "m")).status());
  }
  ZQ_ASSERT_OK(store->ClaimJob(Claimer("A"), Start).status());
  ZQ_ASSERT_OK(store->ClaimJob(Claimer("B"), Start).status());
  ZQ_ASSERT_OK(store->ClaimJob(Claimer("A"), Start).status());
  // A reclaim must not leave the job RUNNING; nothing of it stays.
  absl::StatusOr<std::vector<JobWrite>> bad =
      store->ReclaimOwned("A", [](JobChange& change) {
        change.events.push_back(MakeEvent(0, "still running"));
        return absl::OkStatus();
      });
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInternal) << bad.status();
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job j1, store->GetJob("j1"));
  EXPECT_EQ(j1.last_seq(), 1);

  std::vector<std::string> owners;
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<JobWrite> reclaimed,
                          store->ReclaimOwned("A", [&](JobChange& change) {
                            owners.push_back(change.owner);
                            change.job.set_state(v1::JOB_FAILED);
                            return absl::OkStatus();
                          }));
  std::vector<std::string> ids;
  for (const JobWrite& w : reclaimed) ids.push_back(w.job.id());
  EXPECT_EQ(ids, (std::vector<std::string>{"j1", "j3"}));
  EXPECT_EQ(owners, (std::vector<std::string>{"A", "A"}));
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<LeaseInfo> held,
                          store->RenewLeases("A", absl::Seconds(30)));
  EXPECT_TRUE(held.empty());
  ZQ_ASSERT_OK_AND_ASSIGN(held, store->RenewLeases("B", absl::Seconds(30)));
  EXPECT_EQ(LeaseIds(held), (std::vector<std::string>{"j2"}));
  ZQ_ASSERT_OK_AND_ASSIGN(reclaimed, store->ReclaimOwned("A", Requeue()));
  EXPECT_TRUE(reclaimed.empty());
}

TEST_P(JobStoreTest, EditJobNumbersEventsAcrossStores) {
  auto first = OpenStore();
  auto second = OpenStore();
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  ZQ_ASSERT_OK(
      first->CreateJob(MakeJob("j1", "acme", "m"), {MakeEvent(0), MakeEvent(0)})
          .status());
  auto add = [](int n) -> JobEdit {
    return [n](JobChange& change) {
      for (int i = 0; i < n; ++i) change.events.push_back(MakeEvent(0, "x"));
      return absl::OkStatus();
    };
  };
  ZQ_ASSERT_OK_AND_ASSIGN(JobWrite written,
                          first->EditJob("j1", nullptr, add(2)));
  EXPECT_EQ(Seqs(written.events), (std::vector<int64_t>{3, 4}));
  ZQ_ASSERT_OK_AND_ASSIGN(written, second->EditJob("j1", nullptr, add(1)));
  EXPECT_EQ(Seqs(written.events), (std::vector<int64_t>{5}));
  EXPECT_EQ(written.job.last_seq(), 5);
  // At once from both: the row lock orders them.
  constexpr int kEdits = 20;
  std::vector<absl::Status> errors(2);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      JobStore& store = t == 0 ? *first : *second;
      for (int i = 0; i < kEdits && errors[t].ok(); ++i) {
        errors[t] = store.EditJob("j1", nullptr, add(1)).status();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& e : errors) EXPECT_TRUE(e.ok()) << e;
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          first->ListEvents("j1", 0));
  std::vector<int64_t> expected;
  for (int i = 1; i <= 5 + 2 * kEdits; ++i) expected.push_back(i);
  EXPECT_EQ(Seqs(events), expected);
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Job job, second->GetJob("j1"));
  EXPECT_EQ(job.last_seq(), 5 + 2 * kEdits);

  // An edit's error rolls it back and is returned.
  absl::StatusOr<JobWrite> refused =
      first->EditJob("j1", nullptr, [](JobChange& change) {
        change.job.set_state(v1::JOB_FAILED);
        change.events.push_back(MakeEvent(0));
        return absl::FailedPreconditionError("no");
      });
  EXPECT_EQ(refused.status(), absl::FailedPreconditionError("no"));
  ZQ_ASSERT_OK_AND_ASSIGN(job, first->GetJob("j1"));
  EXPECT_EQ(job.state(), v1::JOB_QUEUED);
  EXPECT_EQ(job.last_seq(), 5 + 2 * kEdits);
  absl::StatusOr<JobWrite> ghost = first->EditJob("ghost", nullptr, add(1));
  EXPECT_EQ(ghost.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ghost.status().message(), "job ghost not found");
}

TEST_P(JobStoreTest, AtMostOneListener) {
  struct Quiet : StoreListener {
    void OnJobEvents(const std::string&) override {}
    void OnJobQueued() override {}
    void OnCancelRequested(const std::string&) override {}
    void OnListening(bool) override {}
  } listener;
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->Listen(&listener));
  EXPECT_EQ(store->Listen(&listener).code(),
            absl::StatusCode::kFailedPrecondition);
  // Listen(nullptr) lets go of it; another may then listen.
  ZQ_ASSERT_OK(store->Listen(nullptr));
  ZQ_ASSERT_OK(store->Listen(&listener));
  store.reset();  // before the listener goes
}

// Every row `sql` returns, columns joined by '|' and rows by ';' (NULL as
// "").
std::string SqliteRows(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  std::string out;
  if (sqlite3_open(path.c_str(), &db) == SQLITE_OK) {
    sqlite3_exec(
        db, sql.c_str(),
        [](void* arg, int columns, char** values, char**) {
          std::string* out = static_cast<std::string*>(arg);
          if (!out->empty()) *out += ';';
          for (int i = 0; i < columns; ++i) {
            if (i > 0) *out += '|';
            if (values[i] != nullptr) *out += values[i];
          }
          return 0;
        },
        &out, nullptr);
  }
  sqlite3_close(db);
  return out;
}

// A queued job with queue fields set, and one a version 2 server left
// RUNNING (with a cancel asked).
std::vector<v1::Job> Version2Jobs() {
  v1::Job queued = MakeJob("q", "acme", "m");
  queued.set_priority(7);
  queued.set_device_preference(v1::DEVICE_CUDA);
  queued.set_attempts(2);
  v1::Job running = MakeJob("r", "acme", "m", v1::JOB_RUNNING);
  running.set_attempts(1);
  running.set_cancel_requested(true);
  return {queued, running};
}

TEST(JobStoreRecovery, Version2DatabaseGetsItsQueueColumnsOnMigration) {
  ScratchDir dir;
  const std::string path = dir.Sub("zeroq.db");
  {
    auto store = OpenSqliteStore(path);
    ASSERT_NE(store, nullptr);
    for (const v1::Job& job : Version2Jobs()) {
      ZQ_ASSERT_OK(store->CreateJob(job).status());
    }
  }
  {
    // Back to what a version 2 server wrote.
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    const std::string sql =
        absl::StrCat(kDropVersion3, "PRAGMA user_version = 2;");
    char* error = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error),
              SQLITE_OK)
        << (error ? error : "");
    sqlite3_free(error);
    sqlite3_close(db);
  }
  auto store = OpenSqliteStore(path);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(ReadUserVersion(path), SqliteJobStore::kSchemaVersion);
  // The RUNNING job has nobody's lease, run out: reclaimed like a dead
  // replica's.
  EXPECT_EQ(SqliteRows(path,
                       "SELECT id, priority, device, attempt, "
                       "cancel_requested, owner IS NULL, lease_until, "
                       "not_before FROM jobs ORDER BY id"),
            "q|7|2|2|0|1||0;r|1|0|1|1|1|0|0");
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<JobWrite> reclaimed,
                          store->ReclaimExpired(10, Requeue()));
  ASSERT_EQ(reclaimed.size(), 1u);
  EXPECT_EQ(reclaimed[0].job.id(), "r");
  ZQ_ASSERT_OK_AND_ASSIGN(std::optional<JobWrite> claimed,
                          store->ClaimJob(Claimer("A"), Start));
  ASSERT_TRUE(claimed.has_value());
  EXPECT_EQ(claimed->job.id(), "q");  // priority 7
  EXPECT_EQ(claimed->job.attempts(), 3);
}

INSTANTIATE_TEST_SUITE_P(Sqlite, JobStoreTest,
                         testing::Values(Backend::kSqlite));
INSTANTIATE_TEST_SUITE_P(Postgres, JobStoreTest,
                         testing::Values(Backend::kPostgres));

// ---------------------------------------------------------------- SQLite only

TEST(JobStoreRecovery, SqliteFileIsInWalModeAtTheCurrentVersion) {
  ScratchDir dir;
  const std::string path = dir.Sub("zeroq.db");
  {
    auto store = OpenSqliteStore(path);
    ASSERT_NE(store, nullptr);
    ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
  }
  EXPECT_EQ(ReadUserVersion(path), SqliteJobStore::kSchemaVersion);
  EXPECT_EQ(ReadJournalMode(path), "wal");
  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<SqliteJobStore> store,
                          SqliteJobStore::Open(path));
  EXPECT_EQ(store->schema_version(), SqliteJobStore::kSchemaVersion);
}

// ---------------------------------------------------------------- PostgreSQL
// only

TEST(PostgresUri, PasswordsAreRedacted) {
  EXPECT_EQ(
      RedactPostgresUri(
          "postgresql://zeroq:s3cret@db.internal:5432/zeroq?sslmode=require"),
      "postgresql://zeroq:***@db.internal:5432/zeroq?sslmode=require");
  EXPECT_EQ(RedactPostgresUri("postgres://zeroq@db/zeroq"),
            "postgres://zeroq@db/zeroq");
  EXPECT_EQ(RedactPostgresUri(
                "postgresql:///zeroq?host=/run/pg&password=s3cret&user=zeroq"),
            "postgresql:///zeroq?host=/run/pg&password=***&user=zeroq");
  // libpq ends the user part at the path's '/', so an unencoded '@' can
  // only be the password's.
  EXPECT_EQ(RedactPostgresUri("postgresql://u:p@ss?w@rd@db/zeroq"),
            "postgresql://u:***@db/zeroq");
  EXPECT_EQ(RedactPostgresUri("postgresql://u:a?b@db"),
            "postgresql://u:***@db");
  EXPECT_EQ(RedactPostgresUri("postgresql://u:x@db/d?password=y&password=z"),
            "postgresql://u:***@db/d?password=***&password=***");
  EXPECT_EQ(RedactPostgresUri("postgresql://db:5432/zeroq"),
            "postgresql://db:5432/zeroq");
  EXPECT_EQ(RedactPostgresUri("sqlite:/var/lib/zeroq.db"),
            "sqlite:/var/lib/zeroq.db");
  EXPECT_TRUE(IsPostgresUri("postgresql://db/zeroq"));
  EXPECT_TRUE(IsPostgresUri("postgres:///zeroq?host=/run/pg"));
  EXPECT_FALSE(IsPostgresUri("sqlite:/var/lib/zeroq.db"));
  EXPECT_FALSE(IsPostgresUri("host=db dbname=zeroq"));
  EXPECT_FALSE(IsPostgresUri("mysql://db/zeroq"));
}

class PostgresJobStoreTest : public testing::Test {
 protected:
  void SetUp() override {
    ZQ_ASSERT_OK_AND_ASSIGN(db_, PostgresDatabase::Create());
  }

  // Through the interface, as the server uses it.
  std::unique_ptr<JobStore> OpenStore(const std::string& uri = "") {
    auto store = PostgresJobStore::Open(uri.empty() ? db_->uri() : uri);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  // Ends every connection to the test's database (as a server restart
  // would) and waits until they are gone.
  void TerminateConnections() {
    const std::string others =
        absl::StrCat("FROM pg_stat_activity WHERE datname = '", db_->name(),
                     "' AND pid <> pg_backend_pid()");
    ZQ_ASSERT_OK(
        db_->ServerSql(
               absl::StrCat("SELECT pg_terminate_backend(pid) ", others))
            .status());
    for (int i = 0; i < 500; ++i) {
      ZQ_ASSERT_OK_AND_ASSIGN(
          std::string left,
          db_->ServerSql(absl::StrCat("SELECT COUNT(*) ", others)));
      if (left == "0") return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL() << "connections to " << db_->name() << " did not end";
  }

  std::unique_ptr<PostgresDatabase> db_;
};

TEST_F(PostgresJobStoreTest, MigratesAnEmptyDatabase) {
  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<PostgresJobStore> store,
                          PostgresJobStore::Open(db_->uri()));
  EXPECT_EQ(store->schema_version(), PostgresJobStore::kSchemaVersion);
  EXPECT_EQ(db_->StoredSchemaVersion(), PostgresJobStore::kSchemaVersion);
  ZQ_ASSERT_OK_AND_ASSIGN(
      std::string tables,
      db_->Sql("SELECT string_agg(table_name, ',' ORDER BY table_name) FROM "
               "information_schema.tables WHERE table_schema = "
               "current_schema()"));
  EXPECT_EQ(tables, "blob_refs,events,jobs,models,zeroq_schema_version");
  // Opening a migrated database changes nothing.
  store.reset();
  ASSERT_NE(OpenStore(), nullptr);
  ZQ_ASSERT_OK_AND_ASSIGN(
      std::string rows, db_->Sql("SELECT COUNT(*) FROM zeroq_schema_version"));
  EXPECT_EQ(rows, "1");
  EXPECT_EQ(db_->StoredSchemaVersion(), PostgresJobStore::kSchemaVersion);
}

TEST_F(PostgresJobStoreTest, ReplicasStartingTogetherMigrateOnce) {
  // Without the migration lock, all would find version 0 and all but one
  // would fail to create the tables.
  constexpr int kReplicas = 6;
  std::vector<absl::Status> results(kReplicas);
  std::vector<std::thread> threads;
  for (int i = 0; i < kReplicas; ++i) {
    threads.emplace_back([&, i] {
      absl::StatusOr<std::unique_ptr<PostgresJobStore>> store =
          PostgresJobStore::Open(db_->uri());
      results[i] = store.status();
      if (store.ok()) {
        results[i] =
            (*store)->PutModel(MakeModel(absl::StrCat("m", i), "acme"));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& status : results) EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(db_->StoredSchemaVersion(), PostgresJobStore::kSchemaVersion);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> page,
                          store->ListModels("acme", 100, ""));
  EXPECT_EQ(page.items.size(), static_cast<size_t>(kReplicas));
}

// What version 3 added to a PostgreSQL database.
constexpr char kDropPostgresVersion3[] =
    "DROP INDEX jobs_queue; DROP INDEX jobs_running_by_owner; ALTER TABLE "
    "jobs DROP COLUMN priority, DROP COLUMN device, DROP COLUMN attempt, "
    "DROP COLUMN cancel_requested, DROP COLUMN owner, DROP COLUMN "
    "lease_until, DROP COLUMN not_before; ";

TEST_F(PostgresJobStoreTest, Version1DatabaseGetsItsBlobRefsOnMigration) {
  const std::string a = Sha256Hex("artifact a");
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
    ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m")).status());
    ZQ_ASSERT_OK(store->UpdateJob(SucceededJob("j1", "acme", {{"x", a}}, 50)));
    ZQ_ASSERT_OK(store->CreateJob(MakeJob("j2", "acme", "m")).status());
  }
  // Back to what version 1 made.
  ZQ_ASSERT_OK(db_->Sql(absl::StrCat(kDropPostgresVersion3,
                                     "DROP TABLE blob_refs; DROP INDEX "
                                     "jobs_by_end; ALTER TABLE jobs DROP "
                                     "COLUMN end_unix; UPDATE "
                                     "zeroq_schema_version SET version = 1"))
                   .status());
  EXPECT_EQ(db_->StoredSchemaVersion(), 1);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(db_->StoredSchemaVersion(), PostgresJobStore::kSchemaVersion);
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t bytes, store->StoredBytes("acme"));
  EXPECT_EQ(bytes, 1234 + 100);
  ZQ_ASSERT_OK_AND_ASSIGN(int64_t refs, store->CountBlobRefs(a));
  EXPECT_EQ(refs, 1);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::Job> ended,
                          store->JobsEndedBefore(51, 0));
  EXPECT_EQ(Ids(ended), (std::vector<std::string>{"j1"}));
}

TEST_F(PostgresJobStoreTest, Version2DatabaseGetsItsQueueColumnsOnMigration) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    for (const v1::Job& job : Version2Jobs()) {
      ZQ_ASSERT_OK(store->CreateJob(job).status());
    }
  }
  // Back to what version 2 made.
  ZQ_ASSERT_OK(db_->Sql(absl::StrCat(kDropPostgresVersion3,
                                     "UPDATE zeroq_schema_version SET "
                                     "version = 2"))
                   .status());
  EXPECT_EQ(db_->StoredSchemaVersion(), 2);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(db_->StoredSchemaVersion(), PostgresJobStore::kSchemaVersion);
  ZQ_ASSERT_OK_AND_ASSIGN(
      std::string rows,
      db_->Sql("SELECT string_agg(concat_ws('|', id, priority, device, "
               "attempt, cancel_requested, owner IS NULL, "
               "COALESCE(EXTRACT(EPOCH FROM lease_until)::BIGINT::TEXT, ''), "
               "not_before), ';' ORDER BY id) FROM jobs"));
  EXPECT_EQ(rows, "q|7|2|2|f|t||0;r|1|0|1|t|t|0|0");
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<JobWrite> reclaimed,
                          store->ReclaimExpired(10, Requeue()));
  ASSERT_EQ(reclaimed.size(), 1u);
  EXPECT_EQ(reclaimed[0].job.id(), "r");
  ZQ_ASSERT_OK_AND_ASSIGN(std::optional<JobWrite> claimed,
                          store->ClaimJob(Claimer("A"), Start));
  ASSERT_TRUE(claimed.has_value());
  EXPECT_EQ(claimed->job.id(), "q");
  EXPECT_EQ(claimed->job.attempts(), 3);
}

// What a listener heard, as lines ("queued", "events j1", "listening", ...).
class RecordingListener : public StoreListener {
 public:
  void OnJobEvents(const std::string& job_id) override {
    Add(absl::StrCat("events ", job_id));
  }
  void OnJobQueued() override { Add("queued"); }
  void OnCancelRequested(const std::string& job_id) override {
    Add(absl::StrCat("cancel ", job_id));
  }
  void OnListening(bool listening) override {
    Add(listening ? "listening" : "not listening");
  }

  // Whether `line` was heard `times` times within `timeout`.
  bool WaitFor(const std::string& line, int times = 1,
               absl::Duration timeout = absl::Seconds(2)) {
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        if (std::count(heard_.begin(), heard_.end(), line) >= times)
          return true;
      }
      if (absl::Now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

 private:
  void Add(std::string line) {
    absl::MutexLock lock(&mu_);
    heard_.push_back(std::move(line));
  }

  absl::Mutex mu_;
  std::vector<std::string> heard_;
};

TEST_F(PostgresJobStoreTest, ListenHearsOtherReplicasWrites) {
  RecordingListener listener;  // outlives the store
  auto listening = OpenStore();
  auto writer = OpenStore();
  ASSERT_NE(listening, nullptr);
  ASSERT_NE(writer, nullptr);
  ZQ_ASSERT_OK(listening->Listen(&listener));
  EXPECT_TRUE(listener.WaitFor("listening"));
  EXPECT_EQ(listening->Listen(&listener).code(),
            absl::StatusCode::kFailedPrecondition);

  ZQ_ASSERT_OK(writer->CreateJob(MakeJob("j1", "acme", "m")).status());
  EXPECT_TRUE(listener.WaitFor("queued"));
  ZQ_ASSERT_OK(writer->ClaimJob(Claimer("B"), Start).status());
  EXPECT_TRUE(listener.WaitFor("events j1"));
  ZQ_ASSERT_OK(writer
                   ->EditJob("j1", nullptr,
                             [](JobChange& change) {
                               change.job.set_cancel_requested(true);
                               return absl::OkStatus();
                             })
                   .status());
  EXPECT_TRUE(listener.WaitFor("cancel j1"));

  // A lost connection is said, and so is listening again.
  ZQ_ASSERT_OK(
      db_->ServerSql(absl::StrCat("SELECT pg_terminate_backend(pid) FROM "
                                  "pg_stat_activity WHERE datname = '",
                                  db_->name(), "' AND pid <> pg_backend_pid()"))
          .status());
  EXPECT_TRUE(listener.WaitFor("not listening"));
  EXPECT_TRUE(listener.WaitFor("listening", 2, absl::Seconds(5)));
  ZQ_ASSERT_OK(writer->CreateJob(MakeJob("j2", "acme", "m")).status());
  EXPECT_TRUE(listener.WaitFor("queued", 2));
}

TEST_F(PostgresJobStoreTest, LostConnectionsAreReplacedOnTheNextCall) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
  // Several pooled connections, all of which the "restart" breaks.
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) EXPECT_TRUE(store->GetModel("m").ok());
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_NO_FATAL_FAILURE(TerminateConnections());
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Model model, store->GetModel("m"));
  EXPECT_EQ(model.id(), "m");
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m2", "acme")));
  ASSERT_NO_FATAL_FAILURE(TerminateConnections());
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j1", "acme", "m")).status());
  ZQ_ASSERT_OK(store->UpdateJob(MakeJob("j1", "acme", "m", v1::JOB_RUNNING),
                                {MakeEvent(1)}));
}

TEST_F(PostgresJobStoreTest, UnreachableDatabaseIsUnavailableUntilBack) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
  ZQ_ASSERT_OK(db_->ServerSql(absl::StrCat("ALTER DATABASE ", db_->name(),
                                           " ALLOW_CONNECTIONS false"))
                   .status());
  ASSERT_NO_FATAL_FAILURE(TerminateConnections());
  absl::StatusOr<v1::Model> got = store->GetModel("m");
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable)
      << got.status();
  absl::Status put = store->PutModel(MakeModel("m2", "acme"));
  EXPECT_EQ(put.code(), absl::StatusCode::kUnavailable) << put;
  EXPECT_EQ(store->ListEvents("j", 0).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(PostgresJobStore::Open(db_->uri()).status().code(),
            absl::StatusCode::kUnavailable);

  ZQ_ASSERT_OK(db_->ServerSql(absl::StrCat("ALTER DATABASE ", db_->name(),
                                           " ALLOW_CONNECTIONS true"))
                   .status());
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Model model, store->GetModel("m"));
  EXPECT_EQ(model.id(), "m");
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m2", "acme")));
}

TEST_F(PostgresJobStoreTest, OpenErrorsNameTheProblemAndNoPassword) {
  absl::StatusOr<std::unique_ptr<PostgresJobStore>> store =
      PostgresJobStore::Open("mysql://u:hunter2@db/zeroq");
  EXPECT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument)
      << store.status();
  EXPECT_EQ(store.status().message().find("hunter2"), absl::string_view::npos)
      << store.status();

  store = PostgresJobStore::Open(
      "postgresql://u:hunter2@/zeroq?no_such_option=1&password=hunter2");
  EXPECT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument)
      << store.status();
  EXPECT_EQ(store.status().message().find("hunter2"), absl::string_view::npos)
      << store.status();

  ScratchDir dir;  // no server's socket in it
  store = PostgresJobStore::Open(absl::StrCat(
      "postgresql://u:hunter2@/zeroq?host=", dir.path(), "&password=hunter2"));
  EXPECT_EQ(store.status().code(), absl::StatusCode::kUnavailable)
      << store.status();
  EXPECT_EQ(store.status().message().find("hunter2"), absl::string_view::npos)
      << store.status();
  EXPECT_NE(store.status().message().find("u:***@"), absl::string_view::npos)
      << store.status();
}

TEST_F(PostgresJobStoreTest, TextPostgresCannotHoldIsNeverAKey) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m", "acme")));
  ZQ_ASSERT_OK(store->CreateJob(MakeJob("j", "acme", "m")).status());
  // Truncated at the NUL, these would be "m" and "j".
  const std::string nul_model("m\0x", 3);
  const std::string nul_job("j\0x", 3);
  EXPECT_EQ(store->GetModel(nul_model).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store->GetJob(nul_job).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store->GetJob("j\xff").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store->DeleteJob(nul_job).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->UpdateJob(MakeJob(nul_job, "acme", "m")).code(),
            absl::StatusCode::kNotFound);
  ZQ_ASSERT_OK_AND_ASSIGN(std::vector<v1::JobEvent> events,
                          store->ListEvents(nul_job, 0));
  EXPECT_TRUE(events.empty());
  ZQ_ASSERT_OK_AND_ASSIGN(Page<v1::Model> page,
                          store->ListModels(std::string("acme\0", 5), 10, ""));
  EXPECT_TRUE(page.items.empty());
  EXPECT_EQ(store->PutModel(MakeModel("m\xc3", "acme")).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      store->CreateJob(MakeJob("j2", "acme", "m", v1::JOB_QUEUED, nul_job))
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  // Valid UTF-8 beyond ASCII is text like any other.
  ZQ_ASSERT_OK(store->PutModel(MakeModel("m-\xc3\xa9\xe2\x82\xac", "acme")));
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Model model,
                          store->GetModel("m-\xc3\xa9\xe2\x82\xac"));
  EXPECT_EQ(model.tenant(), "acme");
  ZQ_ASSERT_OK_AND_ASSIGN(v1::Model plain, store->GetModel("m"));
  EXPECT_EQ(plain.id(), "m");
}

TEST_F(PostgresJobStoreTest, TablesGoToTheSchemaTheUriNames) {
  ZQ_ASSERT_OK(db_->Sql("CREATE SCHEMA other").status());
  auto in_public = OpenStore();
  auto in_other = OpenStore(db_->uri() + "&options=-csearch_path%3Dother");
  ASSERT_NE(in_public, nullptr);
  ASSERT_NE(in_other, nullptr);
  ZQ_ASSERT_OK(in_public->PutModel(MakeModel("m", "acme")));
  EXPECT_EQ(in_other->GetModel("m").status().code(),
            absl::StatusCode::kNotFound);
  ZQ_ASSERT_OK_AND_ASSIGN(
      std::string tables,
      db_->Sql("SELECT COUNT(*) FROM information_schema.tables WHERE "
               "table_schema = 'other'"));
  EXPECT_EQ(tables, "5");
}

}  // namespace
}  // namespace zeroq::server
