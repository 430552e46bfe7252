// http_server.h: the HTTP/JSON API and the dashboard, beside the gRPC port.
//
//   ZQ_ASSIGN_OR_RETURN(auto http, HttpServer::Start(&api, HttpOptions{...}));
//   ... http->port() ...
//   api.Shutdown();   // event streams end, with where to resume
//   http->Stop();
//
// The same resources and messages as the gRPC API, in protobuf's canonical
// JSON mapping, on routes in the google.api.http style:
//   GET    /v1/models                     ListModels (query: page_size, ...)
//   POST   /v1/models                     UploadModel: the raw bytes as the
//          body; name, input_shape ("1,28,28") and sha256 in the query or in
//          X-Model-Name, X-Input-Shape, X-Content-SHA256 headers
//   GET    /v1/models/{id}                GetModel
//   DELETE /v1/models/{id}                DeleteModel
//   GET    /v1/jobs                       ListJobs (state, model_id, view,
//                                         page_size, page_token)
//   POST   /v1/jobs                       SubmitJob (a SubmitJobRequest body)
//   GET    /v1/jobs/{id}                  GetJob
//   DELETE /v1/jobs/{id}                  DeleteJob
//   POST   /v1/jobs/{id}:cancel           CancelJob
//   GET    /v1/jobs/{id}/events           WatchJob as Server-Sent Events
//   GET    /v1/jobs/{id}/artifacts/{name} DownloadArtifact, with Range
//   GET    /                              the dashboard (and /dashboard/...)
// Every /v1 call takes "Authorization: Bearer KEY" like the gRPC API; gRPC
// codes map to HTTP statuses the standard way (google.rpc.Code's), and an
// error's body is {"error": {"code": 404, "status": "NOT_FOUND",
// "message": "..."}}.
//
// Event streams: "id: SEQ", "event: TYPE" (state, progress, sensitivity,
// pareto, message), "data: JOBEVENT-JSON"; replay after Last-Event-ID (or
// ?after_seq=), then live events, ": heartbeat" comments when quiet, and at
// the end "event: end" with the job's final state (or "event: error" with
// UNAVAILABLE and where to resume when the server stops). The stream is the
// gRPC one's (server/watch.h), so both transports behave alike.
//
// Boost.Beast on Asio: a maintained HTTP implementation (Debian's Boost
// 1.74, headers only), asynchronous, so an open event stream holds no thread:
// a few I/O threads serve every connection. Thread-safe.
#ifndef ZEROQ_SERVER_HTTP_SERVER_H_
#define ZEROQ_SERVER_HTTP_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/api.h"

namespace zeroq::server {

struct HttpOptions {
  std::string listen = "127.0.0.1:8080";  // host:port; port 0: any free one
  int threads = 2;                         // I/O threads
  // TLS: PEM files; empty: plain HTTP. With a client CA, client certificates
  // signed by it are required.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  int download_chunk_bytes = 1 << 20;
};

class HttpServer {
 public:
  // Binds and starts serving. UNAVAILABLE when the address cannot be bound,
  // INVALID_ARGUMENT for a malformed one or unreadable TLS files.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(Api* api,
                                                           HttpOptions options);
  ~HttpServer();  // Stop()

  int port() const;
  // Stops accepting, lets responses in flight finish for a moment, then
  // closes every connection. Call after Api::Shutdown (which has ended the
  // event streams with where to resume). Idempotent.
  void Stop();

 public:
  struct Impl;  // the listener, the I/O threads, the TLS context

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The HTTP status of a gRPC/absl code (google.rpc.Code's mapping).
int HttpStatusOf(absl::StatusCode code);

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_HTTP_SERVER_H_
