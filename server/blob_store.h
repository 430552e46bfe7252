// blob_store.h: content-addressed storage of immutable byte blobs (uploaded
// models, job artifacts), named by the lowercase hex SHA-256 of their bytes.
//
//   ZQ_ASSIGN_OR_RETURN(auto store,
//   FileBlobStore::Create("/var/lib/zeroq/blobs")); ZQ_ASSIGN_OR_RETURN(auto
//   writer, store->NewWriter()); ZQ_RETURN_IF_ERROR(writer->Append(chunk)); //
//   repeatedly ZQ_ASSIGN_OR_RETURN(BlobInfo info, writer->Commit(expected_size,
//   sha)); std::string path = store->Path(info.sha256);         // read it from
//   here
//
// A blob becomes visible only when Commit succeeds: the bytes go to a temp
// file, are fsynced and renamed into place, so a crash never leaves a partial
// blob under its final name. A writer destroyed without Commit removes its
// temp file. Putting bytes that are already stored is cheap and succeeds.
// Thread-safe: writers are independent; the store may be shared.
#ifndef ZEROQ_SERVER_BLOB_STORE_H_
#define ZEROQ_SERVER_BLOB_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace zeroq::server {

// A committed blob, as List finds it.
struct BlobEntry {
  std::string sha256;
  int64_t size_bytes = 0;
  absl::Time modified;  // when it was last committed
};

struct BlobInfo {
  std::string sha256;  // lowercase hex
  int64_t size_bytes = 0;
};

class BlobWriter {
 public:
  virtual ~BlobWriter() = default;
  virtual absl::Status Append(absl::string_view bytes) = 0;
  virtual int64_t bytes_written() const = 0;
  // Verifies and publishes the blob. DATA_LOSS when the byte count differs
  // from `expected_size` (when >= 0) or the hash from `expected_sha256` (when
  // not empty); the temp file is removed and nothing is published.
  // REQUIRES: called at most once.
  virtual absl::StatusOr<BlobInfo> Commit(
      int64_t expected_size = -1, absl::string_view expected_sha256 = "") = 0;
};

class BlobStore {
 public:
  virtual ~BlobStore() = default;
  virtual absl::StatusOr<std::unique_ptr<BlobWriter>> NewWriter() = 0;
  // Copies a finished local file in (e.g. a worker's artifact).
  virtual absl::StatusOr<BlobInfo> PutFile(const std::string& path) = 0;
  virtual bool Exists(absl::string_view sha256) = 0;
  // NOT_FOUND when absent.
  virtual absl::StatusOr<int64_t> Size(absl::string_view sha256) = 0;
  // A local path to read the blob from. REQUIRES: IsSha256Hex(sha256).
  virtual std::string Path(absl::string_view sha256) = 0;
  // OK when absent.
  virtual absl::Status Delete(absl::string_view sha256) = 0;
  // Removes temp files of writes that never committed (a previous run that
  // died mid-upload) and were last written more than `older_than` ago;
  // returns how many. Call at start, before any writer of this process;
  // with other processes writing to the same folder, pass an age no live
  // upload reaches between two writes.
  virtual absl::StatusOr<int> RemoveTemporaries(
      absl::Duration older_than = absl::ZeroDuration()) = 0;
  // Every committed blob (a commit of bytes already stored publishes them
  // again, so `modified` is the newest commit).
  virtual std::vector<BlobEntry> List() = 0;
  // Total bytes of committed blobs.
  virtual int64_t StoredBytes() = 0;
};

// Blobs at ROOT/ab/abcdef... (first two hex digits as a folder), temp files
// under ROOT/tmp/.
class FileBlobStore : public BlobStore {
 public:
  static absl::StatusOr<std::unique_ptr<FileBlobStore>> Create(
      const std::string& root);
  ~FileBlobStore() override;

  absl::StatusOr<std::unique_ptr<BlobWriter>> NewWriter() override;
  absl::StatusOr<BlobInfo> PutFile(const std::string& path) override;
  bool Exists(absl::string_view sha256) override;
  absl::StatusOr<int64_t> Size(absl::string_view sha256) override;
  std::string Path(absl::string_view sha256) override;
  absl::Status Delete(absl::string_view sha256) override;
  absl::StatusOr<int> RemoveTemporaries(
      absl::Duration older_than = absl::ZeroDuration()) override;
  std::vector<BlobEntry> List() override;
  int64_t StoredBytes() override;

 private:
  explicit FileBlobStore(std::string root);
  std::string root_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_BLOB_STORE_H_
