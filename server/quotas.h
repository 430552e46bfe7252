// quotas.h: per-tenant quotas (tenants.h's Quotas) checked against the job
// store, the zeroq_stored_bytes gauge, and the removal of blobs that nothing
// uses any more.
//
//   TenantQuotas quotas(&tenants, store, blobs, metrics);
//   ZQ_RETURN_IF_ERROR(quotas.RefreshAll());               // at start
//   ZQ_RETURN_IF_ERROR(quotas.CheckUpload("acme", metadata));  // then upload
//   ZQ_RETURN_IF_ERROR(quotas.CheckSubmit("acme"));          // then a job
//   ZQ_RETURN_IF_ERROR(store->DeleteModel(id));
//   ZQ_RETURN_IF_ERROR(quotas.RemoveBlobIfUnused(model.sha256()));
//   quotas.RefreshStoredBytes("acme");
//
// A quota that is absent or 0 is unlimited; without a TenantRegistry there
// are none. What a tenant stores is what the store's blob references say (the
// distinct blobs of its models and succeeded jobs' artifacts), so bytes the
// tenant already holds cost nothing again. The error texts are part of the
// API (clients and tests read them): RESOURCE_EXHAUSTED, naming the quota,
// the tenant and the limit, and for stored_bytes the tenant's largest models
// and jobs, which it can delete.
//
// Thread-safe. The counts the checks read may change right after them (other
// threads, other replicas on one store): quotas are enforced at these points,
// not as a hard ceiling.
#ifndef ZEROQ_SERVER_QUOTAS_H_
#define ZEROQ_SERVER_QUOTAS_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "server/blob_store.h"
#include "server/job_store.h"
#include "server/metrics.h"
#include "server/tenants.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

class TenantQuotas {
 public:
  // tenants, metrics: may be nullptr (no quotas / no metrics). Everything
  // must outlive this object.
  TenantQuotas(const TenantRegistry* tenants, JobStore* store,
               BlobStore* blobs, Metrics* metrics);
  TenantQuotas(const TenantQuotas&) = delete;
  TenantQuotas& operator=(const TenantQuotas&) = delete;

  // The tenant's quotas; nullptr when it has none (no registry, or a tenant
  // the registry does not know).
  const Quotas* Of(const std::string& tenant) const;
  // RUNNING jobs at once; 0: no limit.
  int RunningLimit(const std::string& tenant) const;
  // QUEUED jobs at once; 0: no limit.
  int QueuedLimit(const std::string& tenant) const;

  // Before an upload's bytes are received: RESOURCE_EXHAUSTED when the model
  // is over the tenant's model_bytes, or would take it over stored_bytes.
  // Bytes the tenant already holds (as a model or an artifact) store nothing
  // new and pass stored_bytes.
  absl::Status CheckUpload(const std::string& tenant,
                           const v1::ModelMetadata& metadata);
  // Before a new job: RESOURCE_EXHAUSTED when the tenant is at or over
  // stored_bytes (a job's results would add more). A retry of a request
  // already accepted is not a new job: the caller skips this for it.
  absl::Status CheckSubmit(const std::string& tenant);
  // The RESOURCE_EXHAUSTED status for a tenant that has `queued` queued jobs
  // against its queued_jobs quota (the caller counts them).
  absl::Status QueuedLimitError(const std::string& tenant,
                                int64_t queued) const;

  // Re-reads the tenant's stored bytes into the gauge and returns them (0,
  // with a logged warning, when the store fails: callers use the value for
  // messages and gauges, and a quota check that cannot read passes).
  int64_t RefreshStoredBytes(const std::string& tenant);
  // Sets the gauge for every tenant that holds anything (at start).
  absl::Status RefreshAll();
  // "; the largest: model m-1 (10 bytes), job j-2 (5 bytes)" (at most three),
  // or "" when the tenant holds nothing or the store fails.
  std::string LargestHoldings(const std::string& tenant);

  // Deletes the blob when no model or artifact (of any tenant) refers to it
  // any more, counting zeroq_blobs_removed_total. OK for an empty hash or a
  // blob already gone. Takes blob_mutex().
  absl::Status RemoveBlobIfUnused(const std::string& sha256);
  // Held while counting a blob's references and deleting it. Whoever records
  // a new reference to a blob it has just stored (a model after an upload, a
  // job's artifacts) holds it from checking that the blob still exists until
  // the reference is stored, so that a removal in this process never runs
  // between the two.
  absl::Mutex& blob_mutex() ABSL_LOCK_RETURNED(blob_mu_) { return blob_mu_; }

 private:
  const TenantRegistry* const tenants_;
  JobStore* const store_;
  BlobStore* const blobs_;
  Metrics* const metrics_;
  absl::Mutex blob_mu_;
  // Serialises reading a tenant's bytes and setting the gauge, so that an
  // older reading never overwrites a newer one.
  absl::Mutex gauge_mu_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_QUOTAS_H_
