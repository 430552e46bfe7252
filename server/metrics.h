// metrics.h: the server's Prometheus metrics, in one place (prometheus-cpp).
//
//   ZQ_ASSIGN_OR_RETURN(auto metrics, Metrics::Create("127.0.0.1:9464"));
//   metrics->JobSubmitted("acme");
//   builder.experimental().SetInterceptorCreators(metrics->RpcInterceptors());
//   // curl http://127.0.0.1:9464/metrics
//
// One object owns the registry and every family; label values are few and
// fixed (tenants, devices, stages, results, methods, codes), and series are
// created on first use and cached by the families. Names follow the
// Prometheus guide: base units, `_total` counters, `_seconds`, `_bytes`.
//
//   zeroq_jobs_submitted_total{tenant}     counter
//   zeroq_jobs_finished_total{result}      counter   succeeded|failed|cancelled
//   zeroq_jobs_deleted_total{reason}       counter   request|retention
//   zeroq_blobs_removed_total              counter   blobs no model or job uses
//   zeroq_queue_depth                      gauge     QUEUED jobs
//   zeroq_queue_wait_seconds               histogram submit (or re-queue)
//                                                    -> RUNNING
//   zeroq_job_duration_seconds{result}     histogram RUNNING -> finished
//   zeroq_stage_duration_seconds{stage}    histogram inspect|distill|
//                                                    sensitivity|pareto|
//                                                    calibrate|reconstruct|
//                                                    export
//   zeroq_running_jobs{device}             gauge     device: cpu, cuda:0, ...
//   zeroq_busy_slots{device}, zeroq_slots{device}    gauges
//   zeroq_worker_crashes_total             counter   workers ended by a signal
//                                                    or without a result
//   zeroq_worker_restarts_total            counter   jobs re-queued after a
//                                                    server restart
//   zeroq_inspections_total{result}        counter   ready|invalid
//   zeroq_uploaded_bytes_total{tenant}     counter   bytes of committed uploads
//   zeroq_stored_bytes{tenant}             gauge     distinct blobs of the
//                                                    tenant's models and
//                                                    artifacts
//   zeroq_watch_streams                    gauge     open WatchJob streams
//   zeroq_sse_streams                      gauge     open HTTP event streams
//   zeroq_http_requests_total{route,code}  counter   route: "GET /v1/jobs/{id}",
//                                                    ...; code: HTTP status
//   zeroq_http_request_duration_seconds{route} histogram
//   zeroq_rpcs_total{method,code}          counter   method: "UploadModel",
//                                                    ..., "Health/Check",
//                                                    "unknown"; code: "OK",
//                                                    "NOT_FOUND", ...
//   zeroq_rpc_duration_seconds{method}     histogram
//
// Thread-safe.
#ifndef ZEROQ_SERVER_METRICS_H_
#define ZEROQ_SERVER_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/support/server_interceptor.h"

namespace zeroq::server {

class Metrics {
 public:
  // Serves /metrics on `listen` ("host:port"); an empty address serves
  // nothing (the registry still counts; Scrape() reads it). INTERNAL/
  // UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(
      const std::string& listen);
  ~Metrics();

  // The text exposition format of everything, as /metrics serves it.
  std::string Scrape() const;
  // The bound port of the HTTP endpoint (0 when none).
  int port() const;

  // Creates a server interceptor factory that counts every RPC by method and
  // status code and times it. The factories reference this object: it must
  // outlive the server.
  std::vector<
      std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
  RpcInterceptors();

  void JobSubmitted(const std::string& tenant);
  // result: "succeeded", "failed" or "cancelled"; seconds RUNNING -> end.
  void JobFinished(const std::string& result, double seconds);
  void JobStarted(double queue_wait_seconds);
  void StageFinished(const std::string& stage,
                     double seconds);  // stage lower case
  void SetQueueDepth(int64_t queued);
  // Per device (DeviceInfo::name): running jobs, busy and total slots.
  void SetDevice(const std::string& device, int64_t running, int64_t busy,
                 int64_t slots);
  void WorkerCrashed();
  void WorkerRestarted();
  // Whether the job store answers (zeroq_store_up).
  void SetStoreUp(bool up);
  // A running job's worker was stopped because its lease was lost.
  void LeaseLost();
  void InspectionFinished(bool ready);
  void Uploaded(const std::string& tenant, int64_t bytes);
  void SetStoredBytes(const std::string& tenant, int64_t bytes);
  void SetWatchStreams(int64_t open);
  void SetSseStreams(int64_t open);
  // One HTTP request answered: its route pattern ("GET /v1/jobs/{id}"), its
  // status and how long it took (an event stream: until it ended).
  void HttpRequest(const std::string& route, int status, double seconds);
  // reason: "request" (DeleteJob) or "retention" (--job_retention).
  void JobDeleted(const std::string& reason);
  void BlobRemoved();

 private:
  struct Impl;
  explicit Metrics(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_METRICS_H_
