// service.h: the zeroq.v1.ZeroQ gRPC service on the callback API.
//
//   Api api(manager.get(), ApiOptions{...});
//   ZeroQService service(&api, ServiceOptions{});
//   grpc::ServerBuilder builder;
//   builder.RegisterService(&service);
//   auto server = builder.BuildAndStart();
//   ...
//   api.Shutdown();              // ends WatchJob streams with UNAVAILABLE
//   server->Shutdown();
//
// Handlers only translate: the bearer key and the request in, one Api call
// (server/api.h, shared with the HTTP API), the response and the status out
// (one conversion, ToGrpcStatus). Streams hold no thread: an upload is a read
// reactor, a watch a write reactor woken by its job's EventLog, a download a
// write reactor reading the blob a chunk at a time. Thread-safe.
#ifndef ZEROQ_SERVER_SERVICE_H_
#define ZEROQ_SERVER_SERVICE_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/api.h"
#include "zeroq/v1/zeroq.grpc.pb.h"

namespace zeroq::server {

struct ServiceOptions {
  int download_chunk_bytes = 1 << 20;
};

class ZeroQService final : public v1::ZeroQ::CallbackService {
 public:
  // `api` must outlive the service.
  ZeroQService(Api* api, ServiceOptions options);
  ~ZeroQService() override;

  grpc::ServerReadReactor<v1::UploadModelRequest>* UploadModel(
      grpc::CallbackServerContext* context, v1::Model* response) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* context,
                                     const v1::GetModelRequest* request,
                                     v1::Model* response) override;
  grpc::ServerUnaryReactor* ListModels(
      grpc::CallbackServerContext* context,
      const v1::ListModelsRequest* request,
      v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteModel(
      grpc::CallbackServerContext* context,
      const v1::DeleteModelRequest* request,
      v1::DeleteModelResponse* response) override;
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request,
                                   v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context,
      const v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const v1::DeleteJobRequest* request,
                                      v1::DeleteJobResponse* response) override;
  grpc::ServerWriteReactor<v1::ArtifactChunk>* DownloadArtifact(
      grpc::CallbackServerContext* context,
      const v1::DownloadArtifactRequest* request) override;

 private:
  // The caller's tenant from its bearer key; UNAUTHENTICATED without one.
  absl::StatusOr<std::string> TenantOf(grpc::CallbackServerContext* context);
  template <typename Response, typename Call>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context,
                                  Response* response, Call call);

  Api* const api_;
  const ServiceOptions options_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_SERVICE_H_
