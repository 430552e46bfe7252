#include "server/sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace zeroq::server {
namespace {

// EVP calls only fail on allocation failure or a broken OpenSSL install; a
// hasher that silently produced a wrong digest would be worse than stopping.
void CheckOpenssl(int ok, const char* what) {
  if (ok == 1) return;
  std::fprintf(stderr, "zeroq: OpenSSL %s failed\n", what);
  std::abort();
}

// In OpenSSL 3, EVP_sha256() resolves the provider's implementation on every
// EVP_DigestInit_ex; fetching it once keeps that lookup out of small hashes.
const EVP_MD* Sha256Md() {
  static const EVP_MD* const md = [] {
    EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    return fetched != nullptr ? static_cast<const EVP_MD*>(fetched)
                              : EVP_sha256();
  }();
  return md;
}

constexpr size_t kFileBufferBytes = 1 << 20;

}  // namespace

struct Sha256::State {
  EVP_MD_CTX* ctx = nullptr;
  bool finished = false;
};

Sha256::Sha256() : state_(std::make_unique<State>()) {
  state_->ctx = EVP_MD_CTX_new();
  CheckOpenssl(state_->ctx != nullptr ? 1 : 0, "EVP_MD_CTX_new");
  CheckOpenssl(EVP_DigestInit_ex(state_->ctx, Sha256Md(), nullptr),
               "EVP_DigestInit_ex");
}

Sha256::~Sha256() { EVP_MD_CTX_free(state_->ctx); }

void Sha256::Update(absl::string_view bytes) {
  if (bytes.empty()) return;
  CheckOpenssl(EVP_DigestUpdate(state_->ctx, bytes.data(), bytes.size()),
               "EVP_DigestUpdate");
}

std::string Sha256::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  CheckOpenssl(state_->finished ? 0 : 1, "HexDigest called twice; Sha256");
  CheckOpenssl(EVP_DigestFinal_ex(state_->ctx, digest, &length),
               "EVP_DigestFinal_ex");
  state_->finished = true;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex(2 * length, '0');
  for (unsigned int i = 0; i < length; ++i) {
    hex[2 * i] = kHex[digest[i] >> 4];
    hex[2 * i + 1] = kHex[digest[i] & 0xf];
  }
  return hex;
}

std::string Sha256Hex(absl::string_view bytes) {
  Sha256 hash;
  hash.Update(bytes);
  return hash.HexDigest();
}

absl::StatusOr<std::string> Sha256File(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    std::string message = absl::StrCat("open ", path, ": ", std::strerror(err));
    if (err == ENOENT) return absl::NotFoundError(message);
    return absl::InternalError(message);
  }
  Sha256 hash;
  std::vector<char> buffer(kFileBufferBytes);
  while (true) {
    const ssize_t n = read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      close(fd);
      return absl::InternalError(
          absl::StrCat("read ", path, ": ", std::strerror(err)));
    }
    if (n == 0) break;
    hash.Update(absl::string_view(buffer.data(), static_cast<size_t>(n)));
  }
  close(fd);
  return hash.HexDigest();
}

bool IsSha256Hex(absl::string_view text) {
  if (text.size() != 64) return false;
  for (char c : text) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace zeroq::server
