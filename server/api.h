// api.h: the service's operations, independent of the transport. The gRPC
// service (service.h) and the HTTP/JSON API (http_server.h) both only
// translate: the caller's credentials and a request message in, one call
// here, a response message or an absl::Status out.
//
//   Api api(manager.get(), ApiOptions{...});
//   ZQ_ASSIGN_OR_RETURN(std::string tenant, api.Authenticate(authorization));
//   ZQ_ASSIGN_OR_RETURN(v1::Job job, api.SubmitJob(tenant, request));
//   ...
//   api.Shutdown();   // refuses new work, ends every watch stream
//
// Everything a tenant reads passes through here with its tenant, so another
// tenant's ids are NOT_FOUND on both transports alike. Thread-safe.
#ifndef ZEROQ_SERVER_API_H_
#define ZEROQ_SERVER_API_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/job_manager.h"
#include "server/metrics.h"
#include "server/tenants.h"
#include "server/upload_assembler.h"
#include "server/watch.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

struct ApiOptions {
  // Who may call; nullptr: everyone, as the open tenant. Must outlive the API.
  const TenantRegistry* tenants = nullptr;
  Metrics* metrics = nullptr;  // nullptr: none
  absl::Duration heartbeat_interval = absl::Seconds(10);  // on quiet streams
};

class Api {
 public:
  Api(JobManager* manager, ApiOptions options);

  // The tenant of an "authorization" value ("Bearer KEY"); UNAUTHENTICATED
  // without a valid one (the open tenant when there is no tenants file).
  absl::StatusOr<std::string> Authenticate(
      std::optional<absl::string_view> authorization) const;

  // Uploads, submissions and new streams are refused with UNAVAILABLE and
  // open watch streams end with UNAVAILABLE; reads still answer. Idempotent.
  void Shutdown();
  bool shut_down();

  // ---- models
  // An upload's assembler (metadata first, then chunks); UNAVAILABLE when
  // stopping. FinishUpload commits the bytes and registers the model.
  absl::StatusOr<std::unique_ptr<UploadAssembler>> StartUpload(
      const std::string& tenant);
  absl::StatusOr<v1::Model> FinishUpload(const std::string& tenant,
                                         UploadAssembler& upload);
  absl::StatusOr<v1::Model> GetModel(const std::string& tenant,
                                     const v1::GetModelRequest& request);
  absl::StatusOr<v1::ListModelsResponse> ListModels(
      const std::string& tenant, const v1::ListModelsRequest& request);
  absl::Status DeleteModel(const std::string& tenant,
                           const v1::DeleteModelRequest& request);

  // ---- jobs
  absl::StatusOr<v1::Job> SubmitJob(const std::string& tenant,
                                    const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(const std::string& tenant,
                                 const v1::GetJobRequest& request);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(
      const std::string& tenant, const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& tenant,
                                    const v1::CancelJobRequest& request);
  absl::StatusOr<v1::DeleteJobResponse> DeleteJob(
      const std::string& tenant, const v1::DeleteJobRequest& request);

  // ---- streams
  // A watch stream of the job's events into `sink`, registered for
  // heartbeats and shutdown; the caller calls Start() on it.
  absl::StatusOr<std::shared_ptr<WatchStream>> Watch(
      const std::string& tenant, const v1::WatchJobRequest& request,
      WatchSink* sink, WatchTransport transport);
  // Where to read an artifact from, with `offset` checked against its size
  // (OUT_OF_RANGE).
  absl::StatusOr<ArtifactRef> OpenArtifact(
      const std::string& tenant, const v1::DownloadArtifactRequest& request);

  Metrics* metrics() const { return options_.metrics; }

 private:
  absl::Status RefuseWhenStopping(absl::string_view what);

  JobManager* const manager_;
  const ApiOptions options_;
  WatchHub hub_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_API_H_
