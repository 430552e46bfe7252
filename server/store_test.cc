// Tests of the server's storage: Sha256, FileBlobStore and SqliteJobStore.
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"
#include "server/blob_store.h"
#include "server/job_store.h"
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

// Through the interface, as the server uses it (its default arguments live
// there).
std::unique_ptr<JobStore> OpenStore(const std::string& path) {
  auto store = SqliteJobStore::Open(path);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

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

TEST(JobStore, PutGetListModelsAcrossPages) {
  ScratchDir dir;
  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<SqliteJobStore> sqlite,
                          SqliteJobStore::Open(dir.Sub("zeroq.db")));
  EXPECT_EQ(sqlite->schema_version(), SqliteJobStore::kSchemaVersion);
  std::unique_ptr<JobStore> store = std::move(sqlite);
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

TEST(JobStore, PageSizeDefaultsAndCap) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, MalformedPageTokens) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, ModelsInStateCountAndDelete) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, CreateJobIsIdempotentPerTenantAndRequestId) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, UpdateJobAndListEvents) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, DuplicateSeqIsAlreadyExistsAndAppliesNothing) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, ListJobsFiltersAndPages) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStore, JobsInStatesAndActiveCounts) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStoreRecovery, ReopenFindsEverything) {
  ScratchDir dir;
  const std::string path = dir.Sub("zeroq.db");
  std::string token;
  {
    auto store = OpenStore(path);
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
  EXPECT_EQ(ReadUserVersion(path), SqliteJobStore::kSchemaVersion);
  EXPECT_EQ(ReadJournalMode(path), "wal");

  ZQ_ASSERT_OK_AND_ASSIGN(std::unique_ptr<SqliteJobStore> sqlite,
                          SqliteJobStore::Open(path));
  EXPECT_EQ(sqlite->schema_version(), SqliteJobStore::kSchemaVersion);
  std::unique_ptr<JobStore> store = std::move(sqlite);
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

TEST(JobStoreRecovery, NewerSchemaIsRefused) {
  ScratchDir dir;
  const std::string path = dir.Sub("zeroq.db");
  {
    auto store = OpenStore(path);
    ASSERT_NE(store, nullptr);
  }
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    const std::string sql = absl::StrCat("PRAGMA user_version = ",
                                         SqliteJobStore::kSchemaVersion + 1);
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  absl::StatusOr<std::unique_ptr<SqliteJobStore>> store =
      SqliteJobStore::Open(path);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition)
      << store.status();
  EXPECT_EQ(ReadUserVersion(path), SqliteJobStore::kSchemaVersion + 1);
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

TEST(JobStore, BlobRefsCountWhatIsReallyStored) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

TEST(JobStoreRecovery, Version1DatabaseGetsItsBlobRefsOnMigration) {
  ScratchDir dir;
  const std::string path = dir.Sub("zeroq.db");
  const std::string a = Sha256Hex("artifact a");
  {
    auto store = OpenStore(path);
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
    const char* sql =
        "DROP TABLE blob_refs; DROP INDEX jobs_by_end; "
        "ALTER TABLE jobs DROP COLUMN end_unix; PRAGMA user_version = 1;";
    char* error = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql, nullptr, nullptr, &error), SQLITE_OK)
        << (error ? error : "");
    sqlite3_free(error);
    sqlite3_close(db);
  }
  EXPECT_EQ(ReadUserVersion(path), 1);
  auto store = OpenStore(path);
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

TEST(JobStoreRecovery, ConcurrentWritersAllLand) {
  ScratchDir dir;
  auto store = OpenStore(dir.Sub("zeroq.db"));
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

}  // namespace
}  // namespace zeroq::server
