// tenants.h: who may call the service, and how much each tenant may use.
//
//   ZQ_ASSIGN_OR_RETURN(TenantRegistry tenants,
//   TenantRegistry::LoadFile(path)); ZQ_ASSIGN_OR_RETURN(const Tenant* t,
//   tenants.Authenticate("Bearer s3cret"));
//
// The tenants file is JSON:
//
//   {"tenants": [
//     {"name": "acme",
//      "api_key_sha256": ["<64 hex digits: sha256 of the key>"],
//      "quotas": {"running_jobs": 2, "queued_jobs": 20,
//                 "stored_bytes": 10737418240, "model_bytes": 1073741824}}
//   ]}
//
// Keys are stored only as their SHA-256 (`printf %s KEY | sha256sum`, or
// `zeroq-server --hash_api_key=KEY`); a client sends the key itself as
// "authorization: Bearer KEY". A quota that is absent or 0 is unlimited.
// Without a file the registry is open: one tenant, "default", no keys, no
// quotas (for a one-machine start on loopback). Immutable once loaded;
// thread-safe.
#ifndef ZEROQ_SERVER_TENANTS_H_
#define ZEROQ_SERVER_TENANTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace zeroq::server {

struct Quotas {
  int64_t running_jobs = 0;  // RUNNING at once
  int64_t queued_jobs = 0;   // QUEUED at once
  int64_t stored_bytes = 0;  // models and artifacts held
  int64_t model_bytes = 0;   // largest single upload
};

struct Tenant {
  std::string name;
  Quotas quotas;
};

class TenantRegistry {
 public:
  static constexpr char kOpenTenant[] = "default";

  // One open tenant, "default", with no keys and no quotas.
  static TenantRegistry Open();
  // INVALID_ARGUMENT (naming the entry) for a malformed file, NOT_FOUND for
  // a missing one.
  static absl::StatusOr<TenantRegistry> LoadFile(const std::string& path);
  static absl::StatusOr<TenantRegistry> Parse(absl::string_view json);

  bool open() const { return open_; }
  // The caller's tenant from the "authorization" metadata value (absent:
  // nullopt). UNAUTHENTICATED without a valid bearer key, unless open.
  absl::StatusOr<const Tenant*> Authenticate(
      std::optional<absl::string_view> authorization) const;
  // nullptr when unknown.
  const Tenant* Find(absl::string_view name) const;
  std::vector<std::string> names() const;

 private:
  bool open_ = false;
  std::vector<Tenant> tenants_;
  absl::flat_hash_map<std::string, size_t> by_key_hash_;  // sha256 hex -> index
  absl::flat_hash_map<std::string, size_t> by_name_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_TENANTS_H_
