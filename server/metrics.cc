#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/interceptor.h"
#include "grpcpp/support/status.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace zeroq::server {
namespace {

// Bucket upper bounds, in seconds. Queue waits and job runs span from an
// instant cache hit to a multi-hour distillation; stages are shorter; RPCs are
// mostly sub-millisecond metadata calls, with uploads and downloads of large
// models in the tail.
const prometheus::Histogram::BucketBoundaries& JobBuckets() {
  static const auto* const kBuckets =
      new prometheus::Histogram::BucketBoundaries{
          0.01, 0.05, 0.1, 0.5, 1,   2,    5,    10,
          30,   60,   120, 300, 600, 1800, 3600, 14400};
  return *kBuckets;
}

const prometheus::Histogram::BucketBoundaries& StageBuckets() {
  static const auto* const kBuckets =
      new prometheus::Histogram::BucketBoundaries{
          0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1,    2,   5,
          10,    30,    60,   120,  300, 600, 1800, 3600};
  return *kBuckets;
}

const prometheus::Histogram::BucketBoundaries& RpcBuckets() {
  static const auto* const kBuckets =
      new prometheus::Histogram::BucketBoundaries{
          0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};
  return *kBuckets;
}

// Label values created up front so that dashboards see zeros rather than
// missing series before the first event.
constexpr std::array<const char*, 3> kJobResults = {"succeeded", "failed",
                                                    "cancelled"};
constexpr std::array<const char*, 7> kStages = {
    "inspect",   "distill",     "sensitivity", "pareto",
    "calibrate", "reconstruct", "export"};

// grpc::StatusCode spans 0 (OK) .. 16 (UNAUTHENTICATED).
constexpr int kNumCodes = 17;

absl::string_view CodeName(int code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
  }
  return "UNKNOWN";
}

bool IsGeneric(grpc::ServerContextBase* context) {
  return dynamic_cast<grpc::GenericCallbackServerContext*>(context) !=
             nullptr ||
         dynamic_cast<grpc::GenericServerContext*>(context) != nullptr;
}

// "" (a call to no registered method) -> "unknown".
// "/zeroq.v1.ZeroQ/GetJob" -> "GetJob"; another service keeps its short
// service name so that its methods cannot collide with ours:
// "/grpc.health.v1.Health/Check" -> "Health/Check".
std::string ShortMethod(absl::string_view full) {
  constexpr absl::string_view kOwnService = "zeroq.v1.ZeroQ";
  if (full.empty()) return "unknown";
  if (full.front() == '/') full.remove_prefix(1);
  const size_t slash = full.rfind('/');
  if (slash == absl::string_view::npos) return std::string(full);
  absl::string_view service = full.substr(0, slash);
  absl::string_view method = full.substr(slash + 1);
  if (service == kOwnService) return std::string(method);
  const size_t dot = service.rfind('.');
  if (dot != absl::string_view::npos) service.remove_prefix(dot + 1);
  return absl::StrCat(service, "/", method);
}

}  // namespace

struct Metrics::Impl {
  // The series of one RPC method. Counters per code are filled on first use;
  // Family::Add is idempotent, so two threads racing to fill a slot store the
  // same pointer.
  struct RpcSeries {
    std::string method;
    prometheus::Histogram* duration = nullptr;
    std::array<std::atomic<prometheus::Counter*>, kNumCodes> by_code{};
  };

  // Defined below; members so that they may name this private type.
  class Interceptor;
  class InterceptorFactory;

  Impl();
  RpcSeries& SeriesFor(absl::string_view full_method);
  void RecordRpc(RpcSeries& series, int code, double seconds);

  // Declared first so that it is destroyed last: the families live in it and
  // the exposer reads it.
  std::shared_ptr<prometheus::Registry> registry;

  prometheus::Family<prometheus::Counter>& jobs_submitted;
  prometheus::Family<prometheus::Counter>& jobs_finished;
  prometheus::Family<prometheus::Gauge>& queue_depth_family;
  prometheus::Family<prometheus::Histogram>& queue_wait_family;
  prometheus::Family<prometheus::Histogram>& job_duration;
  prometheus::Family<prometheus::Histogram>& stage_duration;
  prometheus::Family<prometheus::Gauge>& running_jobs;
  prometheus::Family<prometheus::Gauge>& busy_slots;
  prometheus::Family<prometheus::Gauge>& slots;
  prometheus::Family<prometheus::Counter>& worker_crashes_family;
  prometheus::Family<prometheus::Counter>& worker_restarts_family;
  prometheus::Family<prometheus::Counter>& inspections;
  prometheus::Family<prometheus::Counter>& jobs_deleted;
  prometheus::Family<prometheus::Gauge>& sse_streams_family;
  prometheus::Family<prometheus::Counter>& http_requests;
  prometheus::Family<prometheus::Histogram>& http_duration;
  prometheus::Family<prometheus::Counter>& blobs_removed_family;
  prometheus::Family<prometheus::Counter>& uploaded_bytes;
  prometheus::Family<prometheus::Gauge>& stored_bytes;
  prometheus::Family<prometheus::Gauge>& watch_streams_family;
  prometheus::Family<prometheus::Counter>& rpcs;
  prometheus::Family<prometheus::Histogram>& rpc_duration;
  prometheus::Family<prometheus::Gauge>& store_up_family;
  prometheus::Family<prometheus::Counter>& leases_lost_family;

  // The unlabelled series, created once.
  prometheus::Gauge& queue_depth;
  prometheus::Histogram& queue_wait;
  prometheus::Counter& worker_crashes;
  prometheus::Counter& worker_restarts;
  prometheus::Gauge& watch_streams;
  prometheus::Counter& blobs_removed;
  prometheus::Gauge& sse_streams;
  prometheus::Gauge& store_up;
  prometheus::Counter& leases_lost;

  absl::Mutex rpc_mu;
  // Keyed by the full method name gRPC reports; a handful of entries.
  absl::flat_hash_map<std::string, std::unique_ptr<RpcSeries>> rpc_series
      ABSL_GUARDED_BY(rpc_mu);

  // Last, so that it stops serving before anything it reads goes away.
  std::unique_ptr<prometheus::Exposer> exposer;
};

Metrics::Impl::Impl()
    : registry(std::make_shared<prometheus::Registry>()),
      jobs_submitted(prometheus::BuildCounter()
                         .Name("zeroq_jobs_submitted_total")
                         .Help("Jobs accepted by SubmitJob, by tenant.")
                         .Register(*registry)),
      jobs_finished(prometheus::BuildCounter()
                        .Name("zeroq_jobs_finished_total")
                        .Help("Jobs that reached a final state, by result "
                              "(succeeded, failed, cancelled).")
                        .Register(*registry)),
      queue_depth_family(prometheus::BuildGauge()
                             .Name("zeroq_queue_depth")
                             .Help("Jobs currently QUEUED.")
                             .Register(*registry)),
      queue_wait_family(prometheus::BuildHistogram()
                            .Name("zeroq_queue_wait_seconds")
                            .Help("Seconds a job waited from submission (or "
                                  "re-queueing) until it started RUNNING.")
                            .Register(*registry)),
      job_duration(prometheus::BuildHistogram()
                       .Name("zeroq_job_duration_seconds")
                       .Help("Seconds a job spent from RUNNING to its final "
                             "state, by result.")
                       .Register(*registry)),
      stage_duration(prometheus::BuildHistogram()
                         .Name("zeroq_stage_duration_seconds")
                         .Help("Seconds a pipeline stage took inside a "
                               "worker, by stage.")
                         .Register(*registry)),
      running_jobs(prometheus::BuildGauge()
                       .Name("zeroq_running_jobs")
                       .Help("Jobs currently RUNNING, by device.")
                       .Register(*registry)),
      busy_slots(prometheus::BuildGauge()
                     .Name("zeroq_busy_slots")
                     .Help("Worker slots currently in use, by device.")
                     .Register(*registry)),
      slots(prometheus::BuildGauge()
                .Name("zeroq_slots")
                .Help("Worker slots configured, by device.")
                .Register(*registry)),
      worker_crashes_family(
          prometheus::BuildCounter()
              .Name("zeroq_worker_crashes_total")
              .Help("Worker processes that ended by a signal or without "
                    "reporting a result.")
              .Register(*registry)),
      worker_restarts_family(
          prometheus::BuildCounter()
              .Name("zeroq_worker_restarts_total")
              .Help("Jobs re-queued because the server restarted while they "
                    "ran.")
              .Register(*registry)),
      inspections(prometheus::BuildCounter()
                      .Name("zeroq_inspections_total")
                      .Help("Uploaded models inspected, by result (ready, "
                            "invalid).")
                      .Register(*registry)),
      jobs_deleted(prometheus::BuildCounter()
                       .Name("zeroq_jobs_deleted_total")
                       .Help("Finished jobs deleted, by reason (request: "
                             "DeleteJob; retention: --job_retention).")
                       .Register(*registry)),
      sse_streams_family(prometheus::BuildGauge()
                             .Name("zeroq_sse_streams")
                             .Help("HTTP event streams (GET "
                                   "/v1/jobs/{id}/events) currently open.")
                             .Register(*registry)),
      http_requests(prometheus::BuildCounter()
                        .Name("zeroq_http_requests_total")
                        .Help("HTTP API requests answered, by route and "
                              "status code.")
                        .Register(*registry)),
      http_duration(prometheus::BuildHistogram()
                        .Name("zeroq_http_request_duration_seconds")
                        .Help("Seconds from an HTTP request to the end of "
                              "its response, by route.")
                        .Register(*registry)),
      blobs_removed_family(prometheus::BuildCounter()
                               .Name("zeroq_blobs_removed_total")
                               .Help("Stored blobs removed because no model "
                                     "or job used them any more.")
                               .Register(*registry)),
      uploaded_bytes(prometheus::BuildCounter()
                         .Name("zeroq_uploaded_bytes_total")
                         .Help("Bytes of committed model uploads, by tenant.")
                         .Register(*registry)),
      stored_bytes(prometheus::BuildGauge()
                       .Name("zeroq_stored_bytes")
                       .Help("Bytes of models and artifacts a tenant holds.")
                       .Register(*registry)),
      watch_streams_family(prometheus::BuildGauge()
                               .Name("zeroq_watch_streams")
                               .Help("WatchJob streams currently open.")
                               .Register(*registry)),
      rpcs(prometheus::BuildCounter()
               .Name("zeroq_rpcs_total")
               .Help("RPCs completed, by method and status code.")
               .Register(*registry)),
      rpc_duration(prometheus::BuildHistogram()
                       .Name("zeroq_rpc_duration_seconds")
                       .Help("Seconds from the start of an RPC until its "
                             "status was sent, by method.")
                       .Register(*registry)),
      store_up_family(prometheus::BuildGauge()
                          .Name("zeroq_store_up")
                          .Help("1 while the job store answers this "
                                "replica, 0 while it does not (the replica "
                                "then claims no jobs and is NOT_SERVING).")
                          .Register(*registry)),
      leases_lost_family(
          prometheus::BuildCounter()
              .Name("zeroq_leases_lost_total")
              .Help("Running jobs whose worker this replica stopped because "
                    "its lease was lost (taken over by another replica, or "
                    "not renewable for 7/10 of the lease).")
              .Register(*registry)),
      queue_depth(queue_depth_family.Add({})),
      queue_wait(queue_wait_family.Add({}, JobBuckets())),
      worker_crashes(worker_crashes_family.Add({})),
      worker_restarts(worker_restarts_family.Add({})),
      watch_streams(watch_streams_family.Add({})),
      blobs_removed(blobs_removed_family.Add({})),
      sse_streams(sse_streams_family.Add({})),
      store_up(store_up_family.Add({})),
      leases_lost(leases_lost_family.Add({})) {
  store_up.Set(1);
  for (const char* result : kJobResults) {
    jobs_finished.Add({{"result", result}});
    job_duration.Add({{"result", result}}, JobBuckets());
  }
  for (const char* stage : kStages) {
    stage_duration.Add({{"stage", stage}}, StageBuckets());
  }
  inspections.Add({{"result", "ready"}});
  inspections.Add({{"result", "invalid"}});
  jobs_deleted.Add({{"reason", "request"}});
  jobs_deleted.Add({{"reason", "retention"}});
}

Metrics::Impl::RpcSeries& Metrics::Impl::SeriesFor(
    absl::string_view full_method) {
  {
    absl::ReaderMutexLock lock(&rpc_mu);
    auto it = rpc_series.find(full_method);
    if (it != rpc_series.end()) return *it->second;
  }
  absl::MutexLock lock(&rpc_mu);
  std::unique_ptr<RpcSeries>& slot = rpc_series[full_method];
  if (slot == nullptr) {
    slot = std::make_unique<RpcSeries>();
    slot->method = ShortMethod(full_method);
    slot->duration =
        &rpc_duration.Add({{"method", slot->method}}, RpcBuckets());
  }
  return *slot;
}

void Metrics::Impl::RecordRpc(RpcSeries& series, int code, double seconds) {
  if (code < 0 || code >= kNumCodes) code = grpc::StatusCode::UNKNOWN;
  prometheus::Counter* counter =
      series.by_code[code].load(std::memory_order_acquire);
  if (counter == nullptr) {
    counter = &rpcs.Add(
        {{"method", series.method}, {"code", std::string(CodeName(code))}});
    series.by_code[code].store(counter, std::memory_order_release);
  }
  counter->Increment();
  series.duration->Observe(seconds);
}

// One per RPC: created when the call starts, records once when the status is
// handed to gRPC. PRE_SEND_STATUS is the only hook point where the server's
// status is readable (gRPC has no POST_SEND_STATUS); recording before
// Proceed() also means a client that has seen the status sees the count.
class Metrics::Impl::Interceptor : public grpc::experimental::Interceptor {
 public:
  Interceptor(Impl* impl, RpcSeries* series)
      : impl_(impl),
        series_(series),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(
      grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const std::chrono::duration<double> elapsed =
          std::chrono::steady_clock::now() - start_;
      impl_->RecordRpc(*series_, methods->GetSendStatus().error_code(),
                       elapsed.count());
    }
    methods->Proceed();
  }

 private:
  Impl* const impl_;
  RpcSeries* const series_;
  const std::chrono::steady_clock::time_point start_;
};

class Metrics::Impl::InterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit InterceptorFactory(Impl* impl) : impl_(impl) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    // A call that reached a generic service (gRPC installs one that answers
    // UNIMPLEMENTED for methods nobody registered) carries whatever path the
    // client sent; labelling by it would let any client mint series without
    // bound. Those are all counted under one method, "unknown".
    const char* method = info->method();
    if (method == nullptr || IsGeneric(info->server_context())) method = "";
    return new Interceptor(impl_, &impl_->SeriesFor(method));
  }

 private:
  Impl* const impl_;
};

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(
    const std::string& listen) {
  auto impl = std::make_unique<Impl>();
  if (!listen.empty()) {
    // prometheus-cpp reports a failed bind (and a malformed address) only by
    // throwing from the constructor; nothing may escape to the caller.
    try {
      impl->exposer = std::make_unique<prometheus::Exposer>(listen);
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on \"",
                                                 listen, "\": ", e.what()));
    } catch (...) {
      return absl::UnavailableError(
          absl::StrCat("metrics: cannot listen on \"", listen, "\""));
    }
    impl->exposer->RegisterCollectable(impl->registry);
  }
  return std::unique_ptr<Metrics>(new Metrics(std::move(impl)));
}

Metrics::Metrics(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Metrics::~Metrics() {
  if (impl_->exposer == nullptr) return;
  // The exposer's HTTP server (civetweb) notices that it is being stopped
  // only when its accept loop wakes: after a poll of up to 2 s, or at the
  // next connection. Stopping takes a connection's time instead if we keep
  // knocking on its port (loopback) until it is gone.
  const int port = this->port();
  std::atomic<bool> stopped{false};
  std::thread knock([port, &stopped] {
    while (!stopped.load()) {
      absl::SleepFor(absl::Milliseconds(5));
      const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(static_cast<uint16_t>(port));
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
      close(fd);
    }
  });
  impl_->exposer.reset();
  stopped.store(true);
  knock.join();
}

std::string Metrics::Scrape() const {
  return prometheus::TextSerializer().Serialize(impl_->registry->Collect());
}

int Metrics::port() const {
  if (impl_->exposer == nullptr) return 0;
  const std::vector<int> ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

std::vector<
    std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
Metrics::RpcInterceptors() {
  std::vector<
      std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      factories;
  factories.push_back(std::make_unique<Impl::InterceptorFactory>(impl_.get()));
  return factories;
}

void Metrics::JobSubmitted(const std::string& tenant) {
  impl_->jobs_submitted.Add({{"tenant", tenant}}).Increment();
}

void Metrics::JobFinished(const std::string& result, double seconds) {
  impl_->jobs_finished.Add({{"result", result}}).Increment();
  impl_->job_duration.Add({{"result", result}}, JobBuckets()).Observe(seconds);
}

void Metrics::JobStarted(double queue_wait_seconds) {
  impl_->queue_wait.Observe(queue_wait_seconds);
}

void Metrics::StageFinished(const std::string& stage, double seconds) {
  impl_->stage_duration.Add({{"stage", stage}}, StageBuckets())
      .Observe(seconds);
}

void Metrics::SetQueueDepth(int64_t queued) {
  impl_->queue_depth.Set(static_cast<double>(queued));
}

void Metrics::SetDevice(const std::string& device, int64_t running,
                        int64_t busy, int64_t slots) {
  const prometheus::Labels labels = {{"device", device}};
  impl_->running_jobs.Add(labels).Set(static_cast<double>(running));
  impl_->busy_slots.Add(labels).Set(static_cast<double>(busy));
  impl_->slots.Add(labels).Set(static_cast<double>(slots));
}

void Metrics::WorkerCrashed() { impl_->worker_crashes.Increment(); }

void Metrics::WorkerRestarted() { impl_->worker_restarts.Increment(); }

void Metrics::SetStoreUp(bool up) { impl_->store_up.Set(up ? 1 : 0); }

void Metrics::LeaseLost() { impl_->leases_lost.Increment(); }

void Metrics::JobDeleted(const std::string& reason) {
  impl_->jobs_deleted.Add({{"reason", reason}}).Increment();
}

void Metrics::BlobRemoved() { impl_->blobs_removed.Increment(); }

void Metrics::SetSseStreams(int64_t open) {
  impl_->sse_streams.Set(static_cast<double>(open));
}

void Metrics::HttpRequest(const std::string& route, int status,
                          double seconds) {
  impl_->http_requests.Add({{"route", route}, {"code", std::to_string(status)}})
      .Increment();
  // Buckets of the RPC histogram: the same spread of latencies.
  impl_->http_duration.Add({{"route", route}}, RpcBuckets()).Observe(seconds);
}

void Metrics::InspectionFinished(bool ready) {
  impl_->inspections.Add({{"result", ready ? "ready" : "invalid"}}).Increment();
}

void Metrics::Uploaded(const std::string& tenant, int64_t bytes) {
  if (bytes <= 0) return;  // counters only go up
  impl_->uploaded_bytes.Add({{"tenant", tenant}})
      .Increment(static_cast<double>(bytes));
}

void Metrics::SetStoredBytes(const std::string& tenant, int64_t bytes) {
  impl_->stored_bytes.Add({{"tenant", tenant}}).Set(static_cast<double>(bytes));
}

void Metrics::SetWatchStreams(int64_t open) {
  impl_->watch_streams.Set(static_cast<double>(open));
}

}  // namespace zeroq::server
