#include "server/service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/status_util.h"
#include "server/upload_assembler.h"

namespace zeroq::server {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context,
                               const absl::Status& s) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

template <typename Request>
class RejectedWrite : public grpc::ServerWriteReactor<Request> {
 public:
  explicit RejectedWrite(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

// ---------------------------------------------------------------- upload

class UploadReactor : public grpc::ServerReadReactor<v1::UploadModelRequest> {
 public:
  UploadReactor(Api* api, std::string tenant,
                std::unique_ptr<UploadAssembler> upload, v1::Model* response)
      : api_(api),
        tenant_(std::move(tenant)),
        response_(response),
        upload_(std::move(upload)) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      absl::StatusOr<v1::Model> model = api_->FinishUpload(tenant_, *upload_);
      if (model.ok()) *response_ = *std::move(model);
      Finish(ToGrpcStatus(model.status()));
      return;
    }
    absl::Status s = upload_->Add(request_);
    if (!s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  Api* const api_;
  const std::string tenant_;
  v1::Model* const response_;
  v1::UploadModelRequest request_;
  const std::unique_ptr<UploadAssembler> upload_;
};

// ---------------------------------------------------------------- download

class DownloadReactor : public grpc::ServerWriteReactor<v1::ArtifactChunk> {
 public:
  DownloadReactor(ArtifactRef ref, int64_t offset, int chunk_bytes)
      : ref_(std::move(ref)), offset_(offset), chunk_bytes_(chunk_bytes) {
    fd_ = open(ref_.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      Finish(
          grpc::Status(grpc::StatusCode::DATA_LOSS,
                       absl::StrCat("the artifact's stored bytes are missing (",
                                    ref_.path, ")")));
      return;
    }
    Next();
  }
  ~DownloadReactor() override {
    if (fd_ >= 0) close(fd_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    chunk_.Clear();
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Next() {
    if (sent_first_ && offset_ >= ref_.size_bytes) {
      Finish(grpc::Status::OK);
      return;
    }
    if (!sent_first_) {
      chunk_.set_size_bytes(ref_.size_bytes);
      chunk_.set_sha256(ref_.sha256);
      sent_first_ = true;
    }
    int64_t n = std::min<int64_t>(chunk_bytes_, ref_.size_bytes - offset_);
    std::string* data = chunk_.mutable_data();
    data->resize(n);
    int64_t got = 0;
    while (got < n) {
      ssize_t r = pread(fd_, data->data() + got, n - got, offset_ + got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        Finish(grpc::Status(grpc::StatusCode::DATA_LOSS,
                            "reading the stored artifact failed"));
        return;
      }
      got += r;
    }
    chunk_.set_offset(offset_);
    offset_ += n;
    StartWrite(&chunk_);
  }

  const ArtifactRef ref_;
  int64_t offset_;
  const int chunk_bytes_;
  int fd_ = -1;
  bool sent_first_ = false;
  v1::ArtifactChunk chunk_;
};

// ---------------------------------------------------------------- watch

// A WatchJob stream: the transport side of a WatchStream (server/watch.h).
// Deletes itself in OnDone; the stream it owns may outlive it for a moment
// (a wake in flight), finished, and then never calls back.
class WatchReactor : public grpc::ServerWriteReactor<v1::JobEvent>,
                     public WatchSink {
 public:
  void Begin(std::shared_ptr<WatchStream> stream) {
    stream_ = std::move(stream);
    stream_->Start();
  }
  void Write(const v1::JobEvent& event) override { StartWrite(&event); }
  void Finish(const absl::Status& status) override {
    grpc::ServerWriteReactor<v1::JobEvent>::Finish(ToGrpcStatus(status));
  }
  void OnWriteDone(bool ok) override { stream_->WriteDone(ok); }
  void OnCancel() override { stream_->Cancel(); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<WatchStream> stream_;
};

}  // namespace

// ---------------------------------------------------------------- service

ZeroQService::ZeroQService(Api* api, ServiceOptions options)
    : api_(api), options_(std::move(options)) {}

ZeroQService::~ZeroQService() = default;

absl::StatusOr<std::string> ZeroQService::TenantOf(
    grpc::CallbackServerContext* context) {
  std::optional<absl::string_view> authorization;
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it != metadata.end())
    authorization = absl::string_view(it->second.data(), it->second.size());
  return api_->Authenticate(authorization);
}

grpc::ServerReadReactor<v1::UploadModelRequest>* ZeroQService::UploadModel(
    grpc::CallbackServerContext* context, v1::Model* response) {
  class Rejected : public grpc::ServerReadReactor<v1::UploadModelRequest> {
   public:
    explicit Rejected(const grpc::Status& s) { Finish(s); }
    void OnDone() override { delete this; }
  };
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return new Rejected(ToGrpcStatus(tenant.status()));
  absl::StatusOr<std::unique_ptr<UploadAssembler>> upload =
      api_->StartUpload(*tenant);
  if (!upload.ok()) return new Rejected(ToGrpcStatus(upload.status()));
  return new UploadReactor(api_, *tenant, *std::move(upload), response);
}

// The unary handlers: authenticate, call the API, translate.
template <typename Response, typename Call>
grpc::ServerUnaryReactor* ZeroQService::Unary(
    grpc::CallbackServerContext* context, Response* response, Call call) {
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return Done(context, tenant.status());
  auto result = call(*tenant);
  if constexpr (std::is_same_v<decltype(result), absl::Status>) {
    return Done(context, result);
  } else {
    if (result.ok()) *response = *std::move(result);
    return Done(context, result.status());
  }
}

grpc::ServerUnaryReactor* ZeroQService::GetModel(
    grpc::CallbackServerContext* context, const v1::GetModelRequest* request,
    v1::Model* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->GetModel(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::ListModels(
    grpc::CallbackServerContext* context, const v1::ListModelsRequest* request,
    v1::ListModelsResponse* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->ListModels(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::DeleteModel(
    grpc::CallbackServerContext* context, const v1::DeleteModelRequest* request,
    v1::DeleteModelResponse* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->DeleteModel(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::SubmitJob(
    grpc::CallbackServerContext* context, const v1::SubmitJobRequest* request,
    v1::Job* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->SubmitJob(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::GetJob(
    grpc::CallbackServerContext* context, const v1::GetJobRequest* request,
    v1::Job* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->GetJob(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::ListJobs(
    grpc::CallbackServerContext* context, const v1::ListJobsRequest* request,
    v1::ListJobsResponse* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->ListJobs(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::CancelJob(
    grpc::CallbackServerContext* context, const v1::CancelJobRequest* request,
    v1::Job* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->CancelJob(tenant, *request);
  });
}

grpc::ServerUnaryReactor* ZeroQService::DeleteJob(
    grpc::CallbackServerContext* context, const v1::DeleteJobRequest* request,
    v1::DeleteJobResponse* response) {
  return Unary(context, response, [&](const std::string& tenant) {
    return api_->DeleteJob(tenant, *request);
  });
}

grpc::ServerWriteReactor<v1::JobEvent>* ZeroQService::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  using Rejected = RejectedWrite<v1::JobEvent>;
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return new Rejected(ToGrpcStatus(tenant.status()));
  auto* reactor = new WatchReactor();
  absl::StatusOr<std::shared_ptr<WatchStream>> stream =
      api_->Watch(*tenant, *request, reactor, WatchTransport::kGrpc);
  if (!stream.ok()) {
    delete reactor;  // never handed to gRPC
    return new Rejected(ToGrpcStatus(stream.status()));
  }
  reactor->Begin(*std::move(stream));
  return reactor;
}

grpc::ServerWriteReactor<v1::ArtifactChunk>* ZeroQService::DownloadArtifact(
    grpc::CallbackServerContext* context,
    const v1::DownloadArtifactRequest* request) {
  using Rejected = RejectedWrite<v1::ArtifactChunk>;
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return new Rejected(ToGrpcStatus(tenant.status()));
  absl::StatusOr<ArtifactRef> ref = api_->OpenArtifact(*tenant, *request);
  if (!ref.ok()) return new Rejected(ToGrpcStatus(ref.status()));
  return new DownloadReactor(*std::move(ref), request->offset(),
                             options_.download_chunk_bytes);
}

}  // namespace zeroq::server
