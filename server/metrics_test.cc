#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/notification.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

// The value of one series ("name{labels}") in the text format; NaN when the
// series is absent.
double Value(const std::string& text, absl::string_view series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, series) || !absl::ConsumePrefix(&line, " "))
      continue;
    double value;
    if (absl::SimpleAtod(line, &value)) return value;
  }
  return std::nan("");
}

std::unique_ptr<Metrics> MustCreate(const std::string& listen) {
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create(listen);
  EXPECT_TRUE(metrics.ok()) << metrics.status();
  return metrics.ok() ? *std::move(metrics) : nullptr;
}

// A blocking HTTP/1.0 GET of `path` on 127.0.0.1:`port`: the whole response,
// headers included, or "" on any socket error.
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval timeout{10, 0};  // a hung server fails the test instead of hanging
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request =
        absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if (send(fd, request.data(), request.size(), 0) ==
        static_cast<ssize_t>(request.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) response.append(buf, n);
    }
  }
  close(fd);
  return response;
}

// Calls a unary method with raw request bytes and returns its status.
grpc::Status CallRaw(grpc::GenericStub& stub, const std::string& method,
                     const std::string& request_bytes) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(10));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  return status;
}

// A gRPC server whose only real service is gRPC's default health service
// (no generated code needed here; it answers OK for service "" and NOT_FOUND
// for an unknown one), with the metrics interceptors installed. The callback
// generic service makes it a callback-API server like ZeroQ's, which also
// gives gRPC the frequently polled queue it insists on.
class HealthServer {
 public:
  static constexpr char kCheck[] = "/grpc.health.v1.Health/Check";
  // HealthCheckRequest{service = 1: string}: "" encodes to no bytes, "nope"
  // to tag 0x0a, length 4, the bytes.
  static std::string Request(const std::string& service) {
    if (service.empty()) return "";
    return absl::StrCat(std::string(1, '\x0a'),
                        std::string(1, static_cast<char>(service.size())),
                        service);
  }

  explicit HealthServer(Metrics& metrics) {
    // The switch is process-wide and read by BuildAndStart; turn it off
    // again so other tests' servers are unaffected.
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port_);
    builder.RegisterCallbackGenericService(&generic_);
    builder.experimental().SetInterceptorCreators(metrics.RpcInterceptors());
    server_ = builder.BuildAndStart();
    grpc::EnableDefaultHealthCheckService(false);
    if (server_ != nullptr) {
      stub_ = std::make_unique<grpc::GenericStub>(
          grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                              grpc::InsecureChannelCredentials()));
    }
  }
  ~HealthServer() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::seconds(5));
    server_->Wait();
  }

  bool ok() const { return server_ != nullptr && port_ > 0; }
  grpc::StatusCode Check(const std::string& service) {
    return CallRaw(*stub_, kCheck, Request(service)).error_code();
  }
  grpc::StatusCode Call(const std::string& method) {
    return CallRaw(*stub_, method, "").error_code();
  }

 private:
  grpc::CallbackGenericService generic_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::GenericStub> stub_;
};

void CallEveryMethod(Metrics& m) {
  m.JobSubmitted("acme");
  m.JobFinished("succeeded", 3);
  m.JobStarted(0.2);
  m.StageFinished("distill", 42);
  m.SetQueueDepth(4);
  m.SetDevice("cuda:0", 1, 1, 2);
  m.WorkerCrashed();
  m.WorkerRestarted();
  m.SetStoreUp(false);
  m.LeaseLost();
  m.InspectionFinished(true);
  m.Uploaded("acme", 100);
  m.SetStoredBytes("acme", 1000);
  m.SetWatchStreams(3);
}

TEST(Metrics, EveryFamilyIsExposedWithItsType) {
  std::unique_ptr<Metrics> m = MustCreate("");
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->port(), 0);
  CallEveryMethod(*m);
  // The RPC families have no series, and so are not rendered, until the
  // first RPC.
  HealthServer server(*m);
  ASSERT_TRUE(server.ok());
  EXPECT_EQ(server.Check(""), grpc::StatusCode::OK);
  const std::string text = m->Scrape();
  const std::vector<std::pair<std::string, std::string>> families = {
      {"zeroq_jobs_submitted_total", "counter"},
      {"zeroq_jobs_finished_total", "counter"},
      {"zeroq_queue_depth", "gauge"},
      {"zeroq_queue_wait_seconds", "histogram"},
      {"zeroq_job_duration_seconds", "histogram"},
      {"zeroq_stage_duration_seconds", "histogram"},
      {"zeroq_running_jobs", "gauge"},
      {"zeroq_busy_slots", "gauge"},
      {"zeroq_slots", "gauge"},
      {"zeroq_worker_crashes_total", "counter"},
      {"zeroq_worker_restarts_total", "counter"},
      {"zeroq_store_up", "gauge"},
      {"zeroq_leases_lost_total", "counter"},
      {"zeroq_inspections_total", "counter"},
      {"zeroq_uploaded_bytes_total", "counter"},
      {"zeroq_stored_bytes", "gauge"},
      {"zeroq_watch_streams", "gauge"},
      {"zeroq_rpcs_total", "counter"},
      {"zeroq_rpc_duration_seconds", "histogram"},
  };
  for (const auto& [name, type] : families) {
    EXPECT_TRUE(absl::StrContains(
        text, absl::StrCat("\n# TYPE ", name, " ", type, "\n")))
        << name << " " << type << " missing from:\n"
        << text;
    EXPECT_TRUE(absl::StrContains(text, absl::StrCat("# HELP ", name, " ")))
        << name;
  }
}

TEST(Metrics, CountersAndGaugesMoveByTheRightAmounts) {
  std::unique_ptr<Metrics> m = MustCreate("");
  ASSERT_NE(m, nullptr);
  // Fixed label values exist, at zero, before the first event.
  std::string text = m->Scrape();
  EXPECT_EQ(Value(text, R"(zeroq_jobs_finished_total{result="failed"})"), 0);
  EXPECT_EQ(Value(text, R"(zeroq_inspections_total{result="invalid"})"), 0);
  EXPECT_EQ(Value(text, "zeroq_worker_crashes_total"), 0);
  EXPECT_EQ(Value(text, "zeroq_queue_wait_seconds_count"), 0);
  EXPECT_EQ(Value(text, "zeroq_store_up"), 1);
  EXPECT_EQ(Value(text, "zeroq_leases_lost_total"), 0);
  EXPECT_TRUE(std::isnan(Value(text, R"(zeroq_slots{device="cpu"})")));

  m->JobSubmitted("acme");
  m->JobSubmitted("acme");
  m->JobSubmitted("beta");
  m->JobFinished("succeeded", 3);
  m->JobFinished("succeeded", 4);
  m->JobFinished("failed", 0.5);
  m->JobStarted(0.2);
  m->StageFinished("distill", 42);
  m->SetQueueDepth(4);
  m->SetQueueDepth(2);
  m->SetDevice("cuda:0", 1, 1, 2);
  m->SetDevice("cpu", 0, 0, 4);
  m->SetDevice("cuda:0", 0, 0, 2);
  m->WorkerCrashed();
  m->WorkerCrashed();
  m->WorkerRestarted();
  m->SetStoreUp(false);
  m->LeaseLost();
  m->LeaseLost();
  m->InspectionFinished(true);
  m->InspectionFinished(false);
  m->InspectionFinished(false);
  m->Uploaded("acme", 100);
  m->Uploaded("acme", 50);
  m->SetStoredBytes("acme", 1000);
  m->SetStoredBytes("acme", 800);
  m->SetWatchStreams(3);

  text = m->Scrape();
  EXPECT_EQ(Value(text, R"(zeroq_jobs_submitted_total{tenant="acme"})"), 2);
  EXPECT_EQ(Value(text, "zeroq_store_up"), 0);
  EXPECT_EQ(Value(text, "zeroq_leases_lost_total"), 2);
  EXPECT_EQ(Value(text, R"(zeroq_jobs_submitted_total{tenant="beta"})"), 1);
  EXPECT_EQ(Value(text, R"(zeroq_jobs_finished_total{result="succeeded"})"), 2);
  EXPECT_EQ(Value(text, R"(zeroq_jobs_finished_total{result="failed"})"), 1);
  EXPECT_EQ(Value(text, R"(zeroq_jobs_finished_total{result="cancelled"})"), 0);
  EXPECT_EQ(
      Value(text, R"(zeroq_job_duration_seconds_count{result="succeeded"})"),
      2);
  EXPECT_EQ(
      Value(text, R"(zeroq_job_duration_seconds_sum{result="succeeded"})"), 7);
  // Buckets are cumulative: 3 s and 4 s both fall in (2, 5].
  EXPECT_EQ(
      Value(text,
            R"(zeroq_job_duration_seconds_bucket{result="succeeded",le="2"})"),
      0);
  EXPECT_EQ(
      Value(text,
            R"(zeroq_job_duration_seconds_bucket{result="succeeded",le="5"})"),
      2);
  EXPECT_EQ(
      Value(
          text,
          R"(zeroq_job_duration_seconds_bucket{result="succeeded",le="+Inf"})"),
      2);
  EXPECT_EQ(
      Value(text,
            R"(zeroq_job_duration_seconds_bucket{result="failed",le="14400"})"),
      1);
  EXPECT_EQ(Value(text, "zeroq_queue_wait_seconds_count"), 1);
  EXPECT_DOUBLE_EQ(Value(text, "zeroq_queue_wait_seconds_sum"), 0.2);
  EXPECT_EQ(Value(text, R"(zeroq_queue_wait_seconds_bucket{le="0.1"})"), 0);
  EXPECT_EQ(Value(text, R"(zeroq_queue_wait_seconds_bucket{le="0.5"})"), 1);
  EXPECT_EQ(
      Value(text, R"(zeroq_stage_duration_seconds_count{stage="distill"})"), 1);
  EXPECT_EQ(
      Value(text, R"(zeroq_stage_duration_seconds_count{stage="export"})"), 0);
  EXPECT_EQ(
      Value(
          text,
          R"(zeroq_stage_duration_seconds_bucket{stage="distill",le="0.001"})"),
      0);
  EXPECT_EQ(Value(text, "zeroq_queue_depth"), 2);
  EXPECT_EQ(Value(text, R"(zeroq_running_jobs{device="cuda:0"})"), 0);
  EXPECT_EQ(Value(text, R"(zeroq_busy_slots{device="cuda:0"})"), 0);
  EXPECT_EQ(Value(text, R"(zeroq_slots{device="cuda:0"})"), 2);
  EXPECT_EQ(Value(text, R"(zeroq_slots{device="cpu"})"), 4);
  EXPECT_EQ(Value(text, "zeroq_worker_crashes_total"), 2);
  EXPECT_EQ(Value(text, "zeroq_worker_restarts_total"), 1);
  EXPECT_EQ(Value(text, R"(zeroq_inspections_total{result="ready"})"), 1);
  EXPECT_EQ(Value(text, R"(zeroq_inspections_total{result="invalid"})"), 2);
  EXPECT_EQ(Value(text, R"(zeroq_uploaded_bytes_total{tenant="acme"})"), 150);
  EXPECT_EQ(Value(text, R"(zeroq_stored_bytes{tenant="acme"})"), 800);
  EXPECT_EQ(Value(text, "zeroq_watch_streams"), 3);
}

TEST(Metrics, ServesTheScrapeOverHttp) {
  std::unique_ptr<Metrics> m = MustCreate("127.0.0.1:0");
  ASSERT_NE(m, nullptr);
  ASSERT_GT(m->port(), 0);
  CallEveryMethod(*m);
  const std::string response = HttpGet(m->port(), "/metrics");
  ASSERT_TRUE(absl::StartsWith(response, "HTTP/1.1 200") ||
              absl::StartsWith(response, "HTTP/1.0 200"))
      << response;
  const size_t body_at = response.find("\r\n\r\n");
  ASSERT_NE(body_at, std::string::npos);
  const std::string body = response.substr(body_at + 4);
  // The endpoint adds prometheus-cpp's own exposer_* families; every line of
  // ours is served as Scrape() renders it (nothing changes in between).
  const std::string scrape = m->Scrape();
  int lines = 0;
  for (absl::string_view line :
       absl::StrSplit(scrape, '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StrContains(body, absl::StrCat(line, "\n"))) << line;
    ++lines;
  }
  EXPECT_GT(lines, 100);
  EXPECT_EQ(Value(body, R"(zeroq_jobs_submitted_total{tenant="acme"})"), 1);
}

TEST(Metrics, BusyAddressIsAnErrorNotAnException) {
  std::unique_ptr<Metrics> first = MustCreate("127.0.0.1:0");
  ASSERT_NE(first, nullptr);
  ASSERT_GT(first->port(), 0);
  const std::string taken = absl::StrCat("127.0.0.1:", first->port());
  absl::StatusOr<std::unique_ptr<Metrics>> second = Metrics::Create(taken);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(second.status().message(), taken))
      << second.status();
  // The first endpoint is unaffected.
  EXPECT_TRUE(absl::StrContains(HttpGet(first->port(), "/metrics"),
                                "zeroq_queue_depth"));
}

TEST(Metrics, InterceptorsCountRpcsByMethodAndCode) {
  std::unique_ptr<Metrics> m = MustCreate("");
  ASSERT_NE(m, nullptr);
  // Declared after the metrics: the interceptors must not outlive them.
  HealthServer server(*m);
  ASSERT_TRUE(server.ok());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(server.Check(""), grpc::StatusCode::OK);
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(server.Check("nope"), grpc::StatusCode::NOT_FOUND);
  }

  // The interceptor records before the status leaves the server, so the
  // counts are final once the client has its answers.
  const std::string text = m->Scrape();
  EXPECT_EQ(Value(text, R"(zeroq_rpcs_total{code="OK",method="Health/Check"})"),
            3)
      << text;
  EXPECT_EQ(
      Value(text,
            R"(zeroq_rpcs_total{code="NOT_FOUND",method="Health/Check"})"),
      2);
  EXPECT_EQ(
      Value(text, R"(zeroq_rpc_duration_seconds_count{method="Health/Check"})"),
      5);
  EXPECT_GT(
      Value(text, R"(zeroq_rpc_duration_seconds_sum{method="Health/Check"})"),
      0);
  EXPECT_LT(
      Value(text, R"(zeroq_rpc_duration_seconds_sum{method="Health/Check"})"),
      50);
}

TEST(Metrics, UnregisteredMethodsDoNotMultiplySeries) {
  std::unique_ptr<Metrics> m = MustCreate("");
  ASSERT_NE(m, nullptr);
  HealthServer server(*m);
  ASSERT_TRUE(server.ok());
  EXPECT_EQ(server.Call("/zeroq.v1.ZeroQ/NoSuchMethod"),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(server.Call("/other.Service/AlsoMissing"),
            grpc::StatusCode::UNIMPLEMENTED);
  // Paths nobody registered are the client's to choose: they share one
  // series instead of creating one each.
  const std::string text = m->Scrape();
  EXPECT_EQ(
      Value(text, R"(zeroq_rpcs_total{code="UNIMPLEMENTED",method="unknown"})"),
      2)
      << text;
  EXPECT_EQ(
      Value(text, R"(zeroq_rpc_duration_seconds_count{method="unknown"})"), 2);
  EXPECT_FALSE(absl::StrContains(text, "Missing")) << text;
}

}  // namespace
}  // namespace zeroq::server
