// client.h: a small C++ client of the ZeroQ service.
//
//   ZQ_ASSIGN_OR_RETURN(auto client, Client::Connect("127.0.0.1:50051"));
//   ZQ_ASSIGN_OR_RETURN(v1::Model m, client->UploadModel("net.pt", "net", {3,
//   32, 32})); ZQ_ASSIGN_OR_RETURN(m, client->WaitForModel(m.id(),
//   absl::Minutes(2))); v1::SubmitJobRequest req; req.set_model_id(m.id());
//   req.mutable_config()->set_budget("MP4");
//   ZQ_ASSIGN_OR_RETURN(v1::Job job, client->SubmitJob(req));
//   ZQ_ASSIGN_OR_RETURN(job, client->WatchJob(job.id(), 0, [](const
//   v1::JobEvent& e) {
//     std::cout << e.message() << "\n";
//   }));
//   ZQ_RETURN_IF_ERROR(client->DownloadArtifact(job.id(), "model.zeroq.pt",
//   "out.pt"));
//
// Calls return the server's status as absl::Status (same codes and message).
// WatchJob and DownloadArtifact resume after a dropped stream. Thread-safe.
#ifndef ZEROQ_CLIENT_CLIENT_H_
#define ZEROQ_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "zeroq/v1/zeroq.grpc.pb.h"

namespace zeroq::client {

namespace v1 = ::zeroq::v1;

struct ClientOptions {
  std::string api_key;  // sent as "authorization: Bearer KEY"
  // TLS: on when tls_ca_file is set (the CA that signed the server's
  // certificate); tls_cert_file and tls_key_file add a client certificate.
  std::string tls_ca_file;
  std::string tls_cert_file, tls_key_file;
  absl::Duration rpc_timeout = absl::Seconds(60);  // unary calls
  int upload_chunk_bytes = 1 << 20;
  // Watch and download: reconnect attempts after a stream breaks
  // (UNAVAILABLE, a dropped connection), with a short backoff.
  int max_reconnects = 20;
};

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& target, ClientOptions options = {});
  // A client on an existing channel (TLS, tests).
  Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options);

  // Hashes the file, then streams metadata and chunks.
  absl::StatusOr<v1::Model> UploadModel(
      const std::string& path, const std::string& name,
      const std::vector<int64_t>& input_shape);
  // Uploads bytes with the given metadata as is (tests send wrong sizes).
  absl::StatusOr<v1::Model> UploadBytes(const v1::ModelMetadata& metadata,
                                        const std::string& bytes);
  absl::StatusOr<v1::Model> GetModel(const std::string& id);
  // Polls until the model is READY or INVALID.
  absl::StatusOr<v1::Model> WaitForModel(const std::string& id,
                                         absl::Duration timeout);
  absl::StatusOr<v1::ListModelsResponse> ListModels(
      int page_size = 0, const std::string& page_token = "");
  absl::Status DeleteModel(const std::string& id);

  absl::StatusOr<v1::Job> SubmitJob(const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(const std::string& id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(
      v1::JobState state = v1::JOB_STATE_UNSPECIFIED,
      const std::string& model_id = "", int page_size = 0,
      const std::string& page_token = "",
      v1::JobView view = v1::JOB_VIEW_SUMMARY);
  absl::StatusOr<v1::Job> CancelJob(const std::string& id);
  // Removes a finished job and its artifacts; returns the bytes freed.
  absl::StatusOr<int64_t> DeleteJob(const std::string& id);

  // Calls on_event for each event with seq > after_seq (heartbeats too) until
  // the job finishes; returns the finished job. on_event returning false
  // stops watching early (the job is then returned as it stands).
  using EventFn = std::function<bool(const v1::JobEvent&)>;
  absl::StatusOr<v1::Job> WatchJob(const std::string& id, int64_t after_seq,
                                   const EventFn& on_event);

  // Writes the artifact to `path` (via path.part, renamed when complete and
  // its SHA-256 verified). A partial path.part from an earlier try is resumed.
  absl::StatusOr<v1::Artifact> DownloadArtifact(const std::string& job_id,
                                                const std::string& artifact,
                                                const std::string& path);

  v1::ZeroQ::Stub* stub() { return stub_.get(); }
  // A context with the key and, for unary calls, the deadline.
  std::unique_ptr<grpc::ClientContext> NewContext(bool deadline = true) const;

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ZeroQ::Stub> stub_;
  ClientOptions options_;
};

absl::Status FromGrpc(const grpc::Status& status);

}  // namespace zeroq::client

#endif  // ZEROQ_CLIENT_CLIENT_H_
