// model_registry.h: models — their registration after an upload, reads,
// deletion — and their inspection by workers.
//
//   RegistryOptions options;
//   options.work_dir = data_dir + "/jobs";
//   options.worker_path = worker_path;
//   options.redactor = &redactor;
//   ModelRegistry models(options, store, blobs, &quotas, launcher.get());
//   ZQ_RETURN_IF_ERROR(models.Start());   // re-inspects what a crash left
//   ZQ_ASSIGN_OR_RETURN(v1::Model m, models.Register("acme", metadata, blob));
//   // m.state() == MODEL_INSPECTING; READY or INVALID once a worker has
//   // loaded it and run one forward pass
//   models.Stop();
//
// A model is named by what makes it the same model: the tenant, the bytes
// and the input shape. Registering an identical upload returns the existing
// record with `deduplicated` set, whatever its state.
//
// Inspections run on the CPU, one worker per model (started through the
// Launcher, so tests need no processes), at most max_concurrent_inspections
// at once; the rest wait in a queue. A worker that succeeds makes the model
// READY with its summary; anything else makes it INVALID with a reason the
// tenant may read (redacted: no server paths). The state is in the store
// before it is visible, so a server that dies mid-inspection leaves the model
// INSPECTING, and the next Start inspects it again.
//
// Every call takes the caller's tenant: another tenant's ids are NOT_FOUND.
// Thread-safe.
#ifndef ZEROQ_SERVER_MODEL_REGISTRY_H_
#define ZEROQ_SERVER_MODEL_REGISTRY_H_

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/blob_store.h"
#include "server/job_store.h"
#include "server/launcher.h"
#include "server/metrics.h"
#include "server/quotas.h"
#include "server/redact.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

struct RegistryOptions {
  // Inspections' folders go in work_dir/inspect-<model id>; required.
  std::string work_dir;
  std::string worker_path;  // the zeroq-worker executable
  absl::Duration inspect_time_limit = absl::Minutes(5);
  absl::Duration kill_grace = absl::Seconds(1);  // SIGTERM -> SIGKILL
  int max_concurrent_inspections = 2;            // >= 1
  Metrics* metrics = nullptr;                    // may be null
  // Required: what tenants read of the reasons a model is INVALID.
  const Redactor* redactor = nullptr;
};

class ModelRegistry {
 public:
  // Everything passed in must outlive the registry.
  ModelRegistry(RegistryOptions options, JobStore* store, BlobStore* blobs,
                TenantQuotas* quotas, Launcher* launcher);
  ~ModelRegistry();  // Stop()
  ModelRegistry(const ModelRegistry&) = delete;
  ModelRegistry& operator=(const ModelRegistry&) = delete;

  // Queues the models a previous run left INSPECTING and starts the
  // inspection thread. INVALID_ARGUMENT for incomplete options;
  // FAILED_PRECONDITION when called twice or after Stop.
  absl::Status Start();
  // Stops inspecting: running inspections are cancelled (their models stay
  // INSPECTING and are inspected again at the next Start), and Register
  // refuses with UNAVAILABLE from now on. Waits for the workers to exit (at
  // most kill_grace and 10 s). Idempotent.
  void Stop();

  // After an upload's bytes are committed to the blob store: the existing
  // model for (tenant, bytes, input shape) with deduplicated set, or a new
  // one, INSPECTING, with its inspection queued (it starts once Start has
  // run). ABORTED when the blob is gone (a concurrent delete removed it).
  absl::StatusOr<v1::Model> Register(const std::string& tenant,
                                     const v1::ModelMetadata& metadata,
                                     const BlobInfo& blob);
  // NOT_FOUND for another tenant's.
  absl::StatusOr<v1::Model> Get(const std::string& tenant,
                                const std::string& id);
  // Newest first.
  absl::StatusOr<Page<v1::Model>> List(const std::string& tenant,
                                       int page_size,
                                       const std::string& page_token);
  // FAILED_PRECONDITION while it is inspected or a QUEUED or RUNNING job uses
  // it. Removes its blob when nothing else refers to it.
  absl::Status Delete(const std::string& tenant, const std::string& id);

  // Models being inspected now plus those waiting (for tests and gauges).
  int inspections_in_flight() const;

 private:
  void InspectionLoop();
  void OnInspectionExit(const std::string& model_id, WorkerOutcome outcome);
  std::string InspectDir(const std::string& model_id) const;

  const RegistryOptions options_;
  JobStore* const store_;
  BlobStore* const blobs_;
  TenantQuotas* const quotas_;
  Launcher* const launcher_;

  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  // Model ids waiting for a worker, in registration order.
  std::deque<std::string> pending_ ABSL_GUARDED_BY(mu_);
  // Inspections started (or being started: a null handle), by model id; an
  // entry counts against max_concurrent_inspections until its on_exit.
  absl::flat_hash_map<std::string, std::unique_ptr<WorkerHandle>> running_
      ABSL_GUARDED_BY(mu_);
  // Handles whose on_exit ran. A handle may wait for its callback's thread
  // when destroyed, so it never is inside one: the loop thread (or Stop)
  // destroys these, outside mu_.
  std::vector<std::unique_ptr<WorkerHandle>> finished_ ABSL_GUARDED_BY(mu_);
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_MODEL_REGISTRY_H_
