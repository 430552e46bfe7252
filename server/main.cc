// zeroq-server: the ZeroQ quantization service.
//
//   zeroq-server --data_dir=/var/lib/zeroq --listen=127.0.0.1:50051
//   zeroq-server --data_dir=/var/lib/zeroq --store=postgresql://zeroq@db/zeroq
//
// Flags are parsed here into the option structs of the layers below; see
// --help. SIGTERM or SIGINT stops it gracefully: health turns NOT_SERVING,
// watch streams end with UNAVAILABLE, new work is refused with UNAVAILABLE,
// running jobs get --shutdown_grace to finish and are otherwise stopped and
// re-queued for the next start; the exit status is 0.
#include <signal.h>
#include <unistd.h>

#include <climits>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/blob_store.h"
#include "server/device_pool.h"
#include "server/http_server.h"
#include "server/job_manager.h"
#include "server/job_store.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/pg_job_store.h"
#include "server/service.h"
#include "server/sha256.h"
#include "server/tenants.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "address:port to serve on (port 0: any free port)");
ABSL_FLAG(std::string, port_file, "",
          "write the bound port here once serving (for scripts and tests)");
ABSL_FLAG(std::string, data_dir, "zeroq-data",
          "blobs, job folders and the default job store (zeroq.db)");
ABSL_FLAG(std::string, store, "",
          "the job store: sqlite:PATH, or a PostgreSQL URI "
          "(postgresql://USER@HOST:PORT/DB?..., postgres://...; a password in "
          "it is never logged) (default: sqlite:DATA_DIR/zeroq.db)");
ABSL_FLAG(std::string, replica_id, "",
          "this server's name in the job store, unique among the replicas "
          "sharing it (its running jobs' folders are DATA_DIR/replicas/NAME) "
          "(default: the host name)");
ABSL_FLAG(absl::Duration, lease_duration, absl::Seconds(10),
          "lease on each running job, renewed every tenth of it; when a "
          "replica stops renewing, another re-queues its jobs after this");
ABSL_FLAG(std::string, worker, "",
          "the zeroq-worker executable (default: beside this program, else the "
          "build's)");
ABSL_FLAG(std::string, devices, "auto",
          "\"auto\" (CUDA devices found, plus the CPU) or a list: "
          "cpu:SLOTS,cuda:INDEX:SLOTS[:MEMORY_FRACTION] (the slots of a CUDA "
          "device share that fraction of its memory, default 1)");
ABSL_FLAG(int, cpu_slots, 1, "with --devices=auto: concurrent jobs on the CPU");
ABSL_FLAG(int, cuda_slots, 1,
          "with --devices=auto: concurrent jobs per CUDA device");
ABSL_FLAG(int, threads_per_job, 0,
          "intra-op threads of a job that sets none (0: cores / CPU slots)");
ABSL_FLAG(int, max_attempts, 3,
          "worker starts per job when its worker crashes (a signal, an exit "
          "without a result); retried after 1 s, 2 s, 4 s...");
ABSL_FLAG(int, max_server_restarts, 10,
          "server crashes or restarts a job may live through (they do not "
          "count against --max_attempts)");
ABSL_FLAG(absl::Duration, job_retention, absl::ZeroDuration(),
          "delete finished jobs (and their artifacts) this long after they "
          "ended, e.g. 720h, and blobs nothing uses (0: keep everything)");
ABSL_FLAG(absl::Duration, job_time_limit, absl::Hours(4),
          "default time limit of a job");
ABSL_FLAG(absl::Duration, kill_grace, absl::Seconds(1),
          "SIGTERM to SIGKILL for a stopped worker");
ABSL_FLAG(absl::Duration, heartbeat_interval, absl::Seconds(10),
          "heartbeat on quiet watch streams");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "time running jobs get to finish at shutdown");
ABSL_FLAG(int64_t, max_model_mb, 2048, "largest model upload, MiB");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "address:port of the Prometheus /metrics endpoint (empty: none)");
ABSL_FLAG(std::string, http_listen, "127.0.0.1:8080",
          "address:port of the HTTP/JSON API, its event streams and the "
          "dashboard (port 0: any free port; empty: none); TLS as --tls_*");
ABSL_FLAG(std::string, http_port_file, "",
          "write the bound HTTP port here once serving");
ABSL_FLAG(int, http_threads, 2, "I/O threads of the HTTP API");
ABSL_FLAG(std::string, tenants_file, "",
          "tenants, API key hashes and quotas (JSON, see README); empty: one "
          "open tenant");
ABSL_FLAG(bool, insecure_open, false,
          "allow --listen on a non-loopback address without --tenants_file");
ABSL_FLAG(std::string, tls_cert, "",
          "server certificate chain (PEM); enables TLS");
ABSL_FLAG(std::string, tls_key, "", "server private key (PEM)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "CA (PEM) that client certificates must chain to; when set, clients "
          "without a valid certificate are refused");
ABSL_FLAG(std::string, log_format, "text",
          "text or json (one JSON object per line)");
ABSL_FLAG(std::string, hash_api_key, "",
          "print the SHA-256 of this API key (for a tenants file) and exit");

namespace {

namespace zs = ::zeroq::server;

std::string DefaultWorker() {
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = 0;
    std::filesystem::path beside =
        std::filesystem::path(self).parent_path() / "zeroq-worker";
    if (access(beside.c_str(), X_OK) == 0) return beside.string();
  }
#ifdef ZEROQ_DEFAULT_WORKER
  return ZEROQ_DEFAULT_WORKER;
#else
  return "zeroq-worker";
#endif
}

// --store: "sqlite:PATH" or a libpq URI. `description` says which store,
// without a password, for the log.
absl::StatusOr<std::unique_ptr<zs::JobStore>> OpenJobStore(
    const std::string& spec, std::string* description) {
  if (absl::StartsWith(spec, "sqlite:")) {
    const std::string path = spec.substr(7);
    if (path.empty()) {
      return absl::InvalidArgumentError("--store=sqlite:PATH needs a path");
    }
    *description = absl::StrCat("SQLite ", path);
    ZQ_ASSIGN_OR_RETURN(std::unique_ptr<zs::SqliteJobStore> store,
                        zs::SqliteJobStore::Open(path));
    return std::unique_ptr<zs::JobStore>(std::move(store));
  }
  if (zs::IsPostgresUri(spec)) {
    *description = absl::StrCat("PostgreSQL ", zs::RedactPostgresUri(spec));
    ZQ_ASSIGN_OR_RETURN(std::unique_ptr<zs::PostgresJobStore> store,
                        zs::PostgresJobStore::Open(spec));
    return std::unique_ptr<zs::JobStore>(std::move(store));
  }
  // Redacted: a mistyped scheme may still carry a password.
  return absl::InvalidArgumentError(absl::StrCat(
      "--store must be sqlite:PATH or a PostgreSQL URI (postgresql://... or "
      "postgres://...), not \"",
      zs::RedactPostgresUri(spec), "\""));
}

// Writes `port` to `path` (nothing when empty) through a rename, so that a
// reader never sees a half-written number.
void WritePortFile(const std::string& path, int port) {
  if (path.empty()) return;
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << port << "\n";
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
}

int Fail(const absl::Status& s) {
  zs::LogError({}, absl::StrCat("zeroq-server: ", s.message()));
  return 1;
}

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(
        absl::StrCat("--", flag, ": cannot read ", path));
  return std::string((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
}

bool IsLoopback(const std::string& listen) {
  for (const char* prefix : {"127.", "localhost:", "[::1]:", "unix:"}) {
    if (absl::StartsWith(listen, prefix)) return true;
  }
  return false;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials() {
  const std::string cert = absl::GetFlag(FLAGS_tls_cert);
  const std::string key = absl::GetFlag(FLAGS_tls_key);
  const std::string client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  }
  if (cert.empty()) {
    if (!client_ca.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ZQ_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem(cert, "tls_cert"));
  ZQ_ASSIGN_OR_RETURN(pair.private_key, ReadPem(key, "tls_key"));
  ssl.pem_key_cert_pairs.push_back(pair);
  if (!client_ca.empty()) {
    ZQ_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                        ReadPem(client_ca, "tls_client_ca"));
    ssl.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "zeroq-server: the ZeroQ quantization service.\n"
      "  zeroq-server --data_dir=DIR [--listen=127.0.0.1:50051]");
  absl::ParseCommandLine(argc, argv);
  if (!absl::GetFlag(FLAGS_hash_api_key).empty()) {
    std::cout << zs::Sha256Hex(absl::GetFlag(FLAGS_hash_api_key)) << std::endl;
    return 0;
  }
  if (absl::GetFlag(FLAGS_log_format) == "json") {
    zs::SetLogFormat(zs::LogFormat::kJson);
  } else if (absl::GetFlag(FLAGS_log_format) != "text") {
    return Fail(
        absl::InvalidArgumentError("--log_format must be text or json"));
  }

  // Block the stop signals in every thread; this one waits for them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  namespace fs = std::filesystem;
  const std::string listen = absl::GetFlag(FLAGS_listen);
  zs::TenantRegistry tenants = zs::TenantRegistry::Open();
  if (!absl::GetFlag(FLAGS_tenants_file).empty()) {
    auto loaded =
        zs::TenantRegistry::LoadFile(absl::GetFlag(FLAGS_tenants_file));
    if (!loaded.ok()) return Fail(loaded.status());
    tenants = *std::move(loaded);
  } else if (!absl::GetFlag(FLAGS_insecure_open) &&
             (!IsLoopback(listen) ||
              (!absl::GetFlag(FLAGS_http_listen).empty() &&
               !IsLoopback(absl::GetFlag(FLAGS_http_listen))))) {
    return Fail(absl::FailedPreconditionError(absl::StrCat(
        "refusing to listen on ",
        IsLoopback(listen) ? absl::GetFlag(FLAGS_http_listen) : listen,
        " without --tenants_file: anyone who can reach it could use the "
        "service. "
        "Give a tenants file, listen on 127.0.0.1, or pass --insecure_open")));
  }
  auto credentials = Credentials();
  if (!credentials.ok()) return Fail(credentials.status());

  // Absolute: every path handed to a worker (and so in any message it
  // reports) then starts with it, which is what keeps them from tenants.
  const std::string data_dir =
      fs::absolute(absl::GetFlag(FLAGS_data_dir)).lexically_normal().string();
  std::error_code ec;
  fs::create_directories(data_dir, ec);
  if (ec) {
    return Fail(absl::InternalError(
        absl::StrCat("creating ", data_dir, ": ", ec.message())));
  }
  std::string store_spec = absl::GetFlag(FLAGS_store);
  if (store_spec.empty()) {
    store_spec = "sqlite:" + (fs::path(data_dir) / "zeroq.db").string();
  }
  std::string store_text;
  auto store = OpenJobStore(store_spec, &store_text);
  if (!store.ok()) return Fail(store.status());
  auto blobs =
      zs::FileBlobStore::Create((fs::path(data_dir) / "blobs").string());
  if (!blobs.ok()) return Fail(blobs.status());
  auto pool = zs::DevicePool::Parse(absl::GetFlag(FLAGS_devices),
                                    absl::GetFlag(FLAGS_cpu_slots),
                                    absl::GetFlag(FLAGS_cuda_slots));
  if (!pool.ok()) return Fail(pool.status());
  if (!pool->Has(zeroq::v1::DEVICE_CUDA) &&
      (absl::GetFlag(FLAGS_devices) == "auto" || absl::GetFlag(FLAGS_devices).empty())) {
    zs::LogInfo({}, "no CUDA device found (no /dev/nvidiaN): serving the CPU only");
  }
  auto metrics = zs::Metrics::Create(absl::GetFlag(FLAGS_metrics_listen));
  if (!metrics.ok()) return Fail(metrics.status());

  zs::ManagerOptions options;
  options.data_dir = data_dir;
  options.replica_id = absl::GetFlag(FLAGS_replica_id);
  if (options.replica_id.empty()) {
    char host[256] = {0};
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == 0) {
      return Fail(absl::FailedPreconditionError(
          "cannot read the host name; give --replica_id"));
    }
    options.replica_id = host;
  }
  options.single_replica = !zs::IsPostgresUri(store_spec);
  options.lease = absl::GetFlag(FLAGS_lease_duration);
  // Health follows the store: a replica that cannot reach it claims
  // nothing and says so, so that a balancer sends work elsewhere. Set once
  // the gRPC server exists.
  absl::Mutex health_mu;
  grpc::HealthCheckServiceInterface* health_service = nullptr;
  bool draining = false;
  options.on_store_reachable = [&](bool reachable) {
    absl::MutexLock lock(&health_mu);
    if (health_service == nullptr || draining) return;
    health_service->SetServingStatus(reachable);
    health_service->SetServingStatus(zeroq::v1::ZeroQ::service_full_name(),
                                     reachable);
  };
  options.worker_path = absl::GetFlag(FLAGS_worker).empty()
                            ? DefaultWorker()
                            : absl::GetFlag(FLAGS_worker);
  int cpu_slots = 0;
  for (const auto& d : pool->devices()) {
    if (d.kind == zeroq::v1::DEVICE_CPU) cpu_slots += d.slots;
  }
  int cores =
      static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.cpu_threads_per_job =
      absl::GetFlag(FLAGS_threads_per_job) > 0
          ? absl::GetFlag(FLAGS_threads_per_job)
          : std::max(1, cores / std::max(1, cpu_slots));
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  options.max_server_restarts = absl::GetFlag(FLAGS_max_server_restarts);
  options.default_time_limit = absl::GetFlag(FLAGS_job_time_limit);
  options.kill_grace = absl::GetFlag(FLAGS_kill_grace);
  options.job_retention = absl::GetFlag(FLAGS_job_retention);
  if (options.job_retention < absl::ZeroDuration()) {
    return Fail(absl::InvalidArgumentError("--job_retention must be >= 0"));
  }
  options.max_model_bytes = absl::GetFlag(FLAGS_max_model_mb) << 20;
  options.tenants = &tenants;
  options.metrics = metrics->get();
  std::string pool_text = pool->Describe();
  auto manager = zs::JobManager::Create(options, store->get(), blobs->get(),
                                        *std::move(pool));
  if (!manager.ok()) return Fail(manager.status());
  if (absl::Status s = (*manager)->Start(); !s.ok()) return Fail(s);

  zs::ApiOptions api_options;
  api_options.heartbeat_interval = absl::GetFlag(FLAGS_heartbeat_interval);
  api_options.tenants = &tenants;
  api_options.metrics = metrics->get();
  zs::Api api(manager->get(), api_options);
  zs::ZeroQService service(&api, zs::ServiceOptions{});
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, *credentials, &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(4 << 20);
  builder.experimental().SetInterceptorCreators((*metrics)->RpcInterceptors());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(
        absl::UnavailableError(absl::StrCat("cannot listen on ", listen)));
  }
  std::unique_ptr<zs::HttpServer> http;
  if (!absl::GetFlag(FLAGS_http_listen).empty()) {
    zs::HttpOptions http_options;
    http_options.listen = absl::GetFlag(FLAGS_http_listen);
    http_options.threads = absl::GetFlag(FLAGS_http_threads);
    http_options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
    http_options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
    http_options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
    auto started = zs::HttpServer::Start(&api, http_options);
    if (!started.ok()) return Fail(started.status());
    http = *std::move(started);
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  {
    absl::MutexLock lock(&health_mu);
    health_service = health;
    const bool serving = (*manager)->store_reachable();
    health->SetServingStatus(serving);
    health->SetServingStatus(zeroq::v1::ZeroQ::service_full_name(), serving);
  }
  zs::LogInfo(
      {}, absl::StrCat(
              "replica ", options.replica_id, " serving on port ", port,
              absl::GetFlag(FLAGS_tls_cert).empty() ? "" : " (TLS)", ", store ",
              store_text, ", data in ", data_dir, ", devices ", pool_text, ", ",
              options.cpu_threads_per_job, " threads per CPU job, ",
              tenants.open() ? std::string("one open tenant")
                             : absl::StrCat(tenants.names().size(), " tenants"),
              ", HTTP on ",
              http ? absl::StrCat("port ", http->port()) : std::string("none"),
              ", metrics on ",
              (*metrics)->port() > 0 ? absl::StrCat("port ", (*metrics)->port())
                                     : "none",
              ", worker ", options.worker_path));
  // The HTTP port first: a reader waiting for the gRPC port file finds both.
  if (http) WritePortFile(absl::GetFlag(FLAGS_http_port_file), http->port());
  WritePortFile(absl::GetFlag(FLAGS_port_file), port);

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  zs::LogInfo({}, absl::StrCat("signal ", signal_number, ": draining"));
  // New work is refused before health says NOT_SERVING: a client that sees
  // NOT_SERVING and submits anyway must get UNAVAILABLE, not a job.
  api.Shutdown();
  {
    absl::MutexLock lock(&health_mu);
    draining = true;
    health->SetServingStatus(false);
  }
  (*manager)->Stop(absl::GetFlag(FLAGS_shutdown_grace));
  // Watch streams have ended and jobs are settled; what is left are calls in
  // flight (unary ones take milliseconds; an upload or download is cut and
  // the client resumes it elsewhere). gRPC waits for the whole deadline
  // whenever a client channel is merely connected, so keep it short.
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(500));
  if (http) http->Stop();
  zs::LogInfo({}, "stopped");
  return 0;
}
