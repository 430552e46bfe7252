// sha256.h: incremental SHA-256 (OpenSSL's libcrypto) with lowercase hex out.
//
//   Sha256 h;
//   h.Update(chunk1);
//   h.Update(chunk2);
//   std::string hex = h.HexDigest();   // 64 characters
//
// Not thread-safe: one hasher per stream of bytes.
#ifndef ZEROQ_SERVER_SHA256_H_
#define ZEROQ_SERVER_SHA256_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace zeroq::server {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(absl::string_view bytes);
  // Finishes the hash; REQUIRES: called once, after the last Update.
  std::string HexDigest();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

std::string Sha256Hex(absl::string_view bytes);
// The SHA-256 of a whole file; NOT_FOUND / INTERNAL on I/O errors.
absl::StatusOr<std::string> Sha256File(const std::string& path);
// True for 64 lowercase hex characters.
bool IsSha256Hex(absl::string_view text);

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_SHA256_H_
