#include "server/api.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace zeroq::server {

Api::Api(JobManager* manager, ApiOptions options)
    : manager_(manager),
      options_(std::move(options)),
      hub_(options_.heartbeat_interval, options_.metrics) {}

absl::StatusOr<std::string> Api::Authenticate(
    std::optional<absl::string_view> authorization) const {
  if (options_.tenants == nullptr)
    return std::string(TenantRegistry::kOpenTenant);
  ZQ_ASSIGN_OR_RETURN(const Tenant* tenant,
                      options_.tenants->Authenticate(authorization));
  return tenant->name;
}

void Api::Shutdown() { hub_.Shutdown(); }

bool Api::shut_down() { return hub_.shut_down(); }

absl::Status Api::RefuseWhenStopping(absl::string_view what) {
  if (!hub_.shut_down()) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("the server is shutting down; ", what, " again shortly"));
}

// ---------------------------------------------------------------- models

absl::StatusOr<std::unique_ptr<UploadAssembler>> Api::StartUpload(
    const std::string& tenant) {
  ZQ_RETURN_IF_ERROR(RefuseWhenStopping("upload"));
  JobManager* manager = manager_;
  return std::make_unique<UploadAssembler>(
      manager->blobs(), manager->options().max_model_bytes,
      [manager, tenant](const v1::ModelMetadata& m) {
        return manager->CheckUploadQuota(tenant, m);
      });
}

absl::StatusOr<v1::Model> Api::FinishUpload(const std::string& tenant,
                                            UploadAssembler& upload) {
  ZQ_ASSIGN_OR_RETURN(UploadAssembler::Result r, upload.Finish());
  if (options_.metrics) options_.metrics->Uploaded(tenant, r.blob.size_bytes);
  return manager_->RegisterModel(tenant, r.metadata, r.blob);
}

absl::StatusOr<v1::Model> Api::GetModel(const std::string& tenant,
                                        const v1::GetModelRequest& request) {
  return manager_->GetModel(tenant, request.model_id());
}

absl::StatusOr<v1::ListModelsResponse> Api::ListModels(
    const std::string& tenant, const v1::ListModelsRequest& request) {
  ZQ_ASSIGN_OR_RETURN(
      Page<v1::Model> page,
      manager_->ListModels(tenant, request.page_size(), request.page_token()));
  v1::ListModelsResponse response;
  for (v1::Model& m : page.items) *response.add_models() = std::move(m);
  response.set_next_page_token(page.next_page_token);
  return response;
}

absl::Status Api::DeleteModel(const std::string& tenant,
                              const v1::DeleteModelRequest& request) {
  return manager_->DeleteModel(tenant, request.model_id());
}

// ---------------------------------------------------------------- jobs

absl::StatusOr<v1::Job> Api::SubmitJob(const std::string& tenant,
                                       const v1::SubmitJobRequest& request) {
  ZQ_RETURN_IF_ERROR(RefuseWhenStopping("submit"));
  return manager_->SubmitJob(tenant, request);
}

absl::StatusOr<v1::Job> Api::GetJob(const std::string& tenant,
                                    const v1::GetJobRequest& request) {
  return manager_->GetJob(tenant, request.job_id());
}

absl::StatusOr<v1::ListJobsResponse> Api::ListJobs(
    const std::string& tenant, const v1::ListJobsRequest& request) {
  if (!v1::JobView_IsValid(request.view())) {
    return absl::InvalidArgumentError(
        absl::StrCat("view: ", request.view(), " is not a JobView"));
  }
  ZQ_ASSIGN_OR_RETURN(
      Page<v1::Job> page,
      manager_->ListJobs(tenant, request.state(), request.model_id(),
                         request.page_size(), request.page_token()));
  v1::ListJobsResponse response;
  const bool full = request.view() == v1::JOB_VIEW_FULL;
  for (v1::Job& j : page.items) {
    if (!full) {
      v1::JobResult* r = j.mutable_result();
      r->clear_layers();
      r->clear_activations();
      r->clear_frontier();
      r->mutable_chosen()->clear_bits();
    }
    *response.add_jobs() = std::move(j);
  }
  response.set_next_page_token(page.next_page_token);
  return response;
}

absl::StatusOr<v1::Job> Api::CancelJob(const std::string& tenant,
                                       const v1::CancelJobRequest& request) {
  return manager_->CancelJob(tenant, request.job_id());
}

absl::StatusOr<v1::DeleteJobResponse> Api::DeleteJob(
    const std::string& tenant, const v1::DeleteJobRequest& request) {
  ZQ_ASSIGN_OR_RETURN(int64_t freed,
                      manager_->DeleteJob(tenant, request.job_id()));
  v1::DeleteJobResponse response;
  response.set_freed_bytes(freed);
  return response;
}

// ---------------------------------------------------------------- streams

absl::StatusOr<std::shared_ptr<WatchStream>> Api::Watch(
    const std::string& tenant, const v1::WatchJobRequest& request,
    WatchSink* sink, WatchTransport transport) {
  ZQ_RETURN_IF_ERROR(RefuseWhenStopping("watch"));
  if (request.after_seq() < 0)
    return absl::InvalidArgumentError("after_seq: must be >= 0");
  ZQ_ASSIGN_OR_RETURN(std::shared_ptr<EventLog> log,
                      manager_->Watch(tenant, request.job_id()));
  auto stream =
      std::make_shared<WatchStream>(std::move(log), request.after_seq(), sink);
  if (!hub_.Add(stream, transport)) {
    return absl::UnavailableError(
        "the server is shutting down; watch again shortly");
  }
  return stream;
}

absl::StatusOr<ArtifactRef> Api::OpenArtifact(
    const std::string& tenant, const v1::DownloadArtifactRequest& request) {
  ZQ_RETURN_IF_ERROR(RefuseWhenStopping("download"));
  ZQ_ASSIGN_OR_RETURN(
      ArtifactRef ref,
      manager_->GetArtifact(tenant, request.job_id(), request.artifact()));
  if (request.offset() < 0 || request.offset() > ref.size_bytes) {
    return absl::OutOfRangeError(absl::StrCat(
        "offset: ", request.offset(), " is outside 0..", ref.size_bytes));
  }
  return ref;
}

}  // namespace zeroq::server
