#include "server/blob_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "server/sha256.h"

namespace zeroq::server {
namespace {

// Writes go to disk in blocks of this size: large enough that the syscall
// cost vanishes next to hashing, small enough to keep per-upload memory low.
constexpr size_t kBufferBytes = 1 << 20;

absl::Status ErrnoError(int err, absl::string_view op, absl::string_view path) {
  std::string message = absl::StrCat(op, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(message);
  return absl::InternalError(message);
}

absl::Status WriteAll(int fd, const char* data, size_t size,
                      const std::string& path) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "write", path);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// A rename or a new entry is only durable once its directory is synced.
absl::Status SyncDirectory(const std::string& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, "open", dir);
  const int rc = fsync(fd);
  const int err = errno;
  close(fd);
  if (rc != 0) return ErrnoError(err, "fsync", dir);
  return absl::OkStatus();
}

// mkdir that tolerates an existing directory; `created` says whether this call
// made it (the parent then needs a sync for the new entry to be durable).
absl::Status MakeDirectory(const std::string& dir, bool* created = nullptr) {
  if (created != nullptr) *created = false;
  if (mkdir(dir.c_str(), 0755) == 0) {
    if (created != nullptr) *created = true;
    return absl::OkStatus();
  }
  const int err = errno;
  struct stat st;
  if (err == EEXIST && stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return absl::OkStatus();
  }
  return ErrnoError(err == EEXIST ? ENOTDIR : err, "mkdir", dir);
}

absl::Status MakeDirectories(const std::string& dir) {
  for (size_t pos = dir.find('/', 1); pos != std::string::npos;
       pos = dir.find('/', pos + 1)) {
    ZQ_RETURN_IF_ERROR(MakeDirectory(dir.substr(0, pos)));
  }
  return MakeDirectory(dir);
}

std::string BlobDir(const std::string& root, absl::string_view sha256) {
  return absl::StrCat(root, "/", sha256.substr(0, 2));
}

std::string BlobPath(const std::string& root, absl::string_view sha256) {
  return absl::StrCat(root, "/", sha256.substr(0, 2), "/", sha256);
}

bool IsLowerHex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

std::string TempDir(const std::string& root) { return root + "/tmp"; }

class FileBlobWriter : public BlobWriter {
 public:
  FileBlobWriter(std::string root, std::string temp_path, int fd)
      : root_(std::move(root)), temp_path_(std::move(temp_path)), fd_(fd) {}

  ~FileBlobWriter() override { Discard(); }

  FileBlobWriter(const FileBlobWriter&) = delete;
  FileBlobWriter& operator=(const FileBlobWriter&) = delete;

  absl::Status Append(absl::string_view bytes) override {
    if (finished_)
      return absl::FailedPreconditionError("blob writer: Append after Commit");
    if (!status_.ok()) return status_;
    hash_.Update(bytes);
    bytes_written_ += static_cast<int64_t>(bytes.size());
    while (!bytes.empty()) {
      // A whole block with nothing pending goes straight to the file: the
      // common case of 1 MiB upload chunks costs no copy.
      if (buffered_ == 0 && bytes.size() >= kBufferBytes) {
        return Fail(WriteAll(fd_, bytes.data(), bytes.size(), temp_path_));
      }
      if (buffer_ == nullptr) buffer_ = std::make_unique<char[]>(kBufferBytes);
      const size_t n = std::min(kBufferBytes - buffered_, bytes.size());
      std::memcpy(buffer_.get() + buffered_, bytes.data(), n);
      buffered_ += n;
      bytes.remove_prefix(n);
      if (buffered_ == kBufferBytes) ZQ_RETURN_IF_ERROR(Flush());
    }
    return absl::OkStatus();
  }

  int64_t bytes_written() const override { return bytes_written_; }

  absl::StatusOr<BlobInfo> Commit(int64_t expected_size,
                                  absl::string_view expected_sha256) override {
    if (finished_)
      return absl::FailedPreconditionError("blob writer: Commit called twice");
    finished_ = true;
    absl::StatusOr<BlobInfo> info = Publish(expected_size, expected_sha256);
    // Whatever failed, the temp file must not outlive the writer's caller.
    if (!info.ok()) Discard();
    return info;
  }

 private:
  absl::Status Fail(absl::Status status) {
    if (!status.ok() && status_.ok()) status_ = status;
    return status;
  }

  absl::Status Flush() {
    if (buffered_ == 0) return absl::OkStatus();
    const size_t n = buffered_;
    buffered_ = 0;
    return Fail(WriteAll(fd_, buffer_.get(), n, temp_path_));
  }

  absl::StatusOr<BlobInfo> Publish(int64_t expected_size,
                                   absl::string_view expected_sha256) {
    ZQ_RETURN_IF_ERROR(status_);
    ZQ_RETURN_IF_ERROR(Flush());
    BlobInfo info;
    info.sha256 = hash_.HexDigest();
    info.size_bytes = bytes_written_;
    if (expected_size >= 0 && expected_size != info.size_bytes) {
      return absl::DataLossError(
          absl::StrCat("blob size mismatch: expected ", expected_size,
                       " bytes, received ", info.size_bytes));
    }
    if (!expected_sha256.empty() &&
        !absl::EqualsIgnoreCase(expected_sha256, info.sha256)) {
      return absl::DataLossError(
          absl::StrCat("blob SHA-256 mismatch: expected ", expected_sha256,
                       ", received bytes hash to ", info.sha256));
    }
    if (fsync(fd_) != 0) return ErrnoError(errno, "fsync", temp_path_);
    const int rc = close(fd_);
    fd_ = -1;
    if (rc != 0) return ErrnoError(errno, "close", temp_path_);

    const std::string final_path = BlobPath(root_, info.sha256);
    // Same name means same bytes: the stored copy stands, ours goes. Its time
    // is renewed (a sweep of unreferenced blobs spares recent commits, which
    // the caller is about to refer to); if it vanished meanwhile, ours is put
    // in its place below.
    if (utimensat(AT_FDCWD, final_path.c_str(), nullptr, 0) == 0) {
      Discard();
      return info;
    }
    const std::string dir = BlobDir(root_, info.sha256);
    bool dir_created = false;
    ZQ_RETURN_IF_ERROR(MakeDirectory(dir, &dir_created));
    // rename replaces atomically, so a concurrent writer of the same bytes
    // racing us past the stat above is harmless.
    if (rename(temp_path_.c_str(), final_path.c_str()) != 0) {
      return ErrnoError(errno, absl::StrCat("rename ", temp_path_, " to"),
                        final_path);
    }
    temp_path_.clear();
    ZQ_RETURN_IF_ERROR(SyncDirectory(dir));
    if (dir_created) ZQ_RETURN_IF_ERROR(SyncDirectory(root_));
    return info;
  }

  void Discard() {
    if (fd_ >= 0) {
      close(fd_);
      fd_ = -1;
    }
    if (!temp_path_.empty()) {
      unlink(temp_path_.c_str());
      temp_path_.clear();
    }
  }

  const std::string root_;
  std::string temp_path_;  // empty once renamed or removed
  int fd_;
  Sha256 hash_;
  std::unique_ptr<char[]> buffer_;  // allocated on the first small append
  size_t buffered_ = 0;
  int64_t bytes_written_ = 0;
  bool finished_ = false;
  absl::Status status_;  // the first write error; the writer is dead after it
};

}  // namespace

FileBlobStore::FileBlobStore(std::string root) : root_(std::move(root)) {}

FileBlobStore::~FileBlobStore() = default;

absl::StatusOr<std::unique_ptr<FileBlobStore>> FileBlobStore::Create(
    const std::string& root) {
  if (root.empty())
    return absl::InvalidArgumentError("blob store root is empty");
  std::string clean = root;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  ZQ_RETURN_IF_ERROR(MakeDirectories(clean));
  ZQ_RETURN_IF_ERROR(MakeDirectory(TempDir(clean)));
  return std::unique_ptr<FileBlobStore>(new FileBlobStore(std::move(clean)));
}

absl::StatusOr<std::unique_ptr<BlobWriter>> FileBlobStore::NewWriter() {
  // pid + counter names are unique within this process; O_EXCL settles any
  // clash with another process sharing the directory.
  static std::atomic<uint64_t> counter{0};
  const std::string dir = TempDir(root_);
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string path =
        absl::StrCat(dir, "/", getpid(), "-", counter.fetch_add(1), ".part");
    const int fd =
        open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
      return std::unique_ptr<BlobWriter>(
          new FileBlobWriter(root_, std::move(path), fd));
    }
    if (errno != EEXIST) return ErrnoError(errno, "create", path);
  }
  return absl::InternalError(absl::StrCat("no free temp file name in ", dir));
}

absl::StatusOr<BlobInfo> FileBlobStore::PutFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, "open", path);
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = NewWriter();
  if (!writer.ok()) {
    close(fd);
    return writer.status();
  }
  std::vector<char> buffer(kBufferBytes);
  absl::Status status;
  while (status.ok()) {
    const ssize_t n = read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      status = ErrnoError(errno, "read", path);
      break;
    }
    if (n == 0) break;
    status = (*writer)->Append(
        absl::string_view(buffer.data(), static_cast<size_t>(n)));
  }
  close(fd);
  ZQ_RETURN_IF_ERROR(status);
  return (*writer)->Commit();
}

bool FileBlobStore::Exists(absl::string_view sha256) {
  if (!IsSha256Hex(sha256)) return false;
  struct stat st;
  return stat(BlobPath(root_, sha256).c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

absl::StatusOr<int64_t> FileBlobStore::Size(absl::string_view sha256) {
  if (!IsSha256Hex(sha256)) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a SHA-256 hex digest: ", sha256));
  }
  const std::string path = BlobPath(root_, sha256);
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT)
      return absl::NotFoundError(absl::StrCat("no blob ", sha256));
    return ErrnoError(errno, "stat", path);
  }
  return static_cast<int64_t>(st.st_size);
}

std::string FileBlobStore::Path(absl::string_view sha256) {
  // Never let a malformed name escape the root (e.g. "../.."); this path
  // simply does not exist, so opening it fails cleanly.
  if (!IsSha256Hex(sha256)) return absl::StrCat(root_, "/invalid-blob-name");
  return BlobPath(root_, sha256);
}

absl::Status FileBlobStore::Delete(absl::string_view sha256) {
  if (!IsSha256Hex(sha256)) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a SHA-256 hex digest: ", sha256));
  }
  const std::string path = BlobPath(root_, sha256);
  if (unlink(path.c_str()) != 0 && errno != ENOENT)
    return ErrnoError(errno, "unlink", path);
  return absl::OkStatus();
}

absl::StatusOr<int> FileBlobStore::RemoveTemporaries(
    absl::Duration older_than) {
  const absl::Time cutoff = absl::Now() - older_than;
  const std::string dir = TempDir(root_);
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return ErrnoError(errno, "opendir", dir);
  std::vector<std::string> names;
  while (struct dirent* entry = readdir(d)) {
    const absl::string_view name = entry->d_name;
    if (name == "." || name == "..") continue;
    names.emplace_back(name);
  }
  closedir(d);
  int removed = 0;
  for (const std::string& name : names) {
    const std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (older_than > absl::ZeroDuration() && stat(path.c_str(), &st) == 0 &&
        absl::TimeFromTimespec(st.st_mtim) > cutoff) {
      continue;  // maybe another process's upload in progress
    }
    if (unlink(path.c_str()) == 0) {
      ++removed;
    } else if (errno != ENOENT) {
      return ErrnoError(errno, "unlink", path);
    }
  }
  return removed;
}

std::vector<BlobEntry> FileBlobStore::List() {
  // Scanning (rather than keeping an index) stays right when blobs are
  // added or removed by another process sharing the root.
  std::vector<BlobEntry> out;
  DIR* root = opendir(root_.c_str());
  if (root == nullptr) return out;
  std::vector<std::string> shards;
  while (struct dirent* entry = readdir(root)) {
    const absl::string_view name = entry->d_name;
    if (name.size() == 2 && IsLowerHex(name[0]) && IsLowerHex(name[1])) {
      shards.emplace_back(name);
    }
  }
  closedir(root);
  for (const std::string& shard : shards) {
    const std::string dir = absl::StrCat(root_, "/", shard);
    DIR* d = opendir(dir.c_str());
    if (d == nullptr) continue;
    while (struct dirent* entry = readdir(d)) {
      const absl::string_view name = entry->d_name;
      if (!IsSha256Hex(name) || !absl::StartsWith(name, shard)) continue;
      struct stat st;
      const std::string path = absl::StrCat(dir, "/", name);
      if (stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
        out.push_back({std::string(name), st.st_size,
                       absl::TimeFromTimespec(st.st_mtim)});
      }
    }
    closedir(d);
  }
  return out;
}

int64_t FileBlobStore::StoredBytes() {
  int64_t total = 0;
  for (const BlobEntry& blob : List()) total += blob.size_bytes;
  return total;
}

}  // namespace zeroq::server
