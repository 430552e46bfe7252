#include "server/quotas.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "server/log.h"

namespace zeroq::server {

namespace {

// Quotas are int64 in the file; limits on job counts are compared with ints.
int ClampToInt(int64_t v) {
  return static_cast<int>(
      std::clamp<int64_t>(v, 0, std::numeric_limits<int>::max()));
}

}  // namespace

TenantQuotas::TenantQuotas(const TenantRegistry* tenants, JobStore* store,
                           BlobStore* blobs, Metrics* metrics)
    : tenants_(tenants), store_(store), blobs_(blobs), metrics_(metrics) {}

const Quotas* TenantQuotas::Of(const std::string& tenant) const {
  if (tenants_ == nullptr) return nullptr;
  const Tenant* t = tenants_->Find(tenant);
  return t == nullptr ? nullptr : &t->quotas;
}

int TenantQuotas::RunningLimit(const std::string& tenant) const {
  const Quotas* quotas = Of(tenant);
  return quotas == nullptr ? 0 : ClampToInt(quotas->running_jobs);
}

int TenantQuotas::QueuedLimit(const std::string& tenant) const {
  const Quotas* quotas = Of(tenant);
  return quotas == nullptr ? 0 : ClampToInt(quotas->queued_jobs);
}

absl::Status TenantQuotas::CheckUpload(const std::string& tenant,
                                       const v1::ModelMetadata& metadata) {
  const int64_t size_bytes = metadata.size_bytes();
  const Quotas* quotas = Of(tenant);
  if (quotas == nullptr) return absl::OkStatus();
  if (quotas->model_bytes > 0 && size_bytes > quotas->model_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota model_bytes: the model is ", size_bytes, " bytes, tenant ",
        tenant, "'s limit is ", quotas->model_bytes, " bytes per model"));
  }
  if (quotas->stored_bytes <= 0) return absl::OkStatus();
  ZQ_ASSIGN_OR_RETURN(bool held_already,
                      store_->TenantHoldsBlob(tenant, metadata.sha256()));
  if (held_already) return absl::OkStatus();  // deduplicated: nothing new
  const int64_t held = RefreshStoredBytes(tenant);
  if (held + size_bytes > quotas->stored_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota stored_bytes: tenant ", tenant, " holds ", held, " bytes; ",
        size_bytes, " more would pass its limit of ", quotas->stored_bytes,
        " bytes. Delete jobs or models you no longer need",
        LargestHoldings(tenant)));
  }
  return absl::OkStatus();
}

absl::Status TenantQuotas::CheckSubmit(const std::string& tenant) {
  const Quotas* quotas = Of(tenant);
  if (quotas == nullptr || quotas->stored_bytes <= 0) return absl::OkStatus();
  // A job's results are stored bytes too: at the limit, free some first.
  const int64_t held = RefreshStoredBytes(tenant);
  if (held >= quotas->stored_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota stored_bytes: tenant ", tenant, " holds ", held,
        " bytes, its limit is ", quotas->stored_bytes,
        ", and a job's results would add more. Delete jobs or models you "
        "no longer need",
        LargestHoldings(tenant)));
  }
  return absl::OkStatus();
}

absl::Status TenantQuotas::QueuedLimitError(const std::string& tenant,
                                            int64_t queued) const {
  return absl::ResourceExhaustedError(absl::StrCat(
      "quota queued_jobs: tenant ", tenant, " already has ", queued,
      " queued jobs, the limit is ", QueuedLimit(tenant),
      "; wait for some to start or cancel them"));
}

int64_t TenantQuotas::RefreshStoredBytes(const std::string& tenant) {
  absl::MutexLock lock(&gauge_mu_);
  absl::StatusOr<int64_t> bytes = store_->StoredBytes(tenant);
  if (!bytes.ok()) {
    LogWarning({tenant, "", ""}, absl::StrCat("reading stored bytes: ",
                                              bytes.status().message()));
    return 0;
  }
  if (metrics_ != nullptr) metrics_->SetStoredBytes(tenant, *bytes);
  return *bytes;
}

absl::Status TenantQuotas::RefreshAll() {
  absl::MutexLock lock(&gauge_mu_);
  ZQ_ASSIGN_OR_RETURN(auto held, store_->StoredBytesByTenant());
  if (metrics_ != nullptr) {
    for (const auto& [tenant, bytes] : held)
      metrics_->SetStoredBytes(tenant, bytes);
  }
  return absl::OkStatus();
}

std::string TenantQuotas::LargestHoldings(const std::string& tenant) {
  absl::StatusOr<std::vector<Holding>> largest =
      store_->LargestHoldings(tenant, 3);
  if (!largest.ok() || largest->empty()) return "";
  std::vector<std::string> parts;
  for (const Holding& h : *largest) {
    parts.push_back(absl::StrCat(h.is_model ? "model " : "job ", h.owner, " (",
                                 h.bytes, " bytes)"));
  }
  return absl::StrCat("; the largest: ", absl::StrJoin(parts, ", "));
}

absl::Status TenantQuotas::RemoveBlobIfUnused(const std::string& sha256) {
  if (sha256.empty()) return absl::OkStatus();
  absl::MutexLock lock(&blob_mu_);
  ZQ_ASSIGN_OR_RETURN(int64_t users, store_->CountBlobRefs(sha256));
  if (users > 0 || !blobs_->Exists(sha256)) return absl::OkStatus();
  ZQ_RETURN_IF_ERROR(blobs_->Delete(sha256));
  if (metrics_ != nullptr) metrics_->BlobRemoved();
  return absl::OkStatus();
}

}  // namespace zeroq::server
