// Operations end to end, against a real zeroq-server: tenants and API keys
// (cross-tenant access tried on every RPC), quotas, TLS with and without
// client certificates, health, reflection, metrics while jobs run, graceful
// shutdown, JSON logs, the job store on PostgreSQL (--store; on the server
// ctest starts, ZEROQ_TEST_PG_URI).
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/health_client.grpc.pb.h"
#include "grpc/reflection_client.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/sha256.h"
#include "tests/e2e_util.h"
#include "tests/pg_util.h"
#include "tests/server_process.h"

namespace zeroq {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::zeroq::v1;
using testing::Finished;
using ::testing::HasSubstr;
using testing::ModelPath;
using ::testing::Not;
using testing::QuickJob;
using testing::PgExec;
using testing::ServerProcess;
using testing::WaitFor;
using testing::WithDatabase;

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// GET http://127.0.0.1:port/path, the body.
std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (write(fd, req.data(), req.size()) < 0) return "";
  std::string out;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, n);
  close(fd);
  size_t body = out.find("\r\n\r\n");
  return body == std::string::npos ? out : out.substr(body + 4);
}

// Sum of every sample of `name` whose labels contain all of `labels`
// ("k=\"v\"" strings).
double Sample(const std::string& text, const std::string& name,
              const std::vector<std::string>& labels = {}) {
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    if (!absl::StartsWith(line, name)) continue;
    absl::string_view rest = line.substr(name.size());
    if (!rest.empty() && rest[0] != '{' && rest[0] != ' ') continue;
    bool all = true;
    for (const auto& l : labels) all = all && absl::StrContains(rest, l);
    if (!all) continue;
    double v = 0;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) sum += v;
  }
  return sum;
}

constexpr char kKeyA[] = "key-of-acme";
constexpr char kKeyB[] = "key-of-zeta";

// A tenants file: acme (quotas as given), zeta (none).
std::string WriteTenants(const std::string& dir,
                         const std::string& acme_quotas) {
  std::string path = dir + "/tenants.json";
  std::ofstream(path) << R"({"tenants": [
    {"name": "acme", "api_key_sha256": [")"
                      << server::Sha256Hex(kKeyA) << R"("], "quotas": )"
                      << acme_quotas << R"(},
    {"name": "zeta", "api_key_sha256": [")"
                      << server::Sha256Hex(kKeyB) << R"("]}]})";
  return path;
}

std::string TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "zeroq_ops_XXXXXX").string();
  return mkdtemp(tmpl.data());
}

class OpsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = TempDir(); }
  void TearDown() override {
    if (HasFailure() && server_)
      std::cerr << "---- server log\n" << server_->Log() << std::endl;
    server_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  void Start(std::vector<std::string> flags) {
    server_ = std::make_unique<ServerProcess>(std::move(flags));
    ASSERT_TRUE(server_->Start()) << server_->Log();
  }
  std::unique_ptr<client::Client> As(const std::string& key) {
    client::ClientOptions o;
    o.api_key = key;
    return server_->NewClient(o);
  }
  v1::Model Upload(client::Client* c,
                   const std::string& file = "fashion_cnn.pt") {
    return testing::UploadReady(c, file);
  }
  // On a server with one CPU slot: a long job holding the slot, and a job
  // queued behind it (quiet: nothing happens to it until the slot frees).
  // Returns false (with a test failure) if either was refused.
  bool BusyAndQuiet(client::Client* c, v1::Job* busy, v1::Job* quiet) {
    v1::Model model = Upload(c);
    absl::StatusOr<v1::Job> b = c->SubmitJob(QuickJob(model.id(), 100000));
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return false;
    WaitFor(c, b->id(), [](const v1::Job& j) { return j.state() == v1::JOB_RUNNING; });
    absl::StatusOr<v1::Job> q = c->SubmitJob(QuickJob(model.id()));
    EXPECT_TRUE(q.ok()) << q.status();
    if (!q.ok()) return false;
    *busy = *b;
    *quiet = *q;
    return true;
  }

  std::string dir_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(OpsTest, EveryRpcNeedsAValidKey) {
  Start({"--tenants_file=" + WriteTenants(dir_, "{}")});
  for (const std::string& key : {std::string(), std::string("wrong-key")}) {
    auto c = As(key);
    auto code = [](const absl::Status& s) { return s.code(); };
    const auto kUnauth = absl::StatusCode::kUnauthenticated;
    EXPECT_EQ(code(c->UploadModel(ModelPath("fashion_cnn.pt"), "x", {1, 28, 28})
                       .status()),
              kUnauth);
    EXPECT_EQ(code(c->GetModel("m-1").status()), kUnauth);
    EXPECT_EQ(code(c->ListModels().status()), kUnauth);
    EXPECT_EQ(code(c->DeleteModel("m-1")), kUnauth);
    EXPECT_EQ(code(c->SubmitJob(QuickJob("m-1")).status()), kUnauth);
    EXPECT_EQ(code(c->GetJob("j-1").status()), kUnauth);
    EXPECT_EQ(code(c->ListJobs().status()), kUnauth);
    EXPECT_EQ(code(c->CancelJob("j-1").status()), kUnauth);
    EXPECT_EQ(code(c->DeleteJob("j-1").status()), kUnauth);
    EXPECT_EQ(code(c->WatchJob("j-1", 0, nullptr).status()), kUnauth);
    EXPECT_EQ(
        code(c->DownloadArtifact("j-1", "recipe.json", dir_ + "/x").status()),
        kUnauth);
  }
}

TEST_F(OpsTest, AnotherTenantsIdsAreNotFoundEverywhere) {
  Start({"--tenants_file=" + WriteTenants(dir_, "{}")});
  auto a = As(kKeyA);
  auto b = As(kKeyB);
  v1::Model model = Upload(a.get());
  ASSERT_EQ(model.state(), v1::MODEL_READY);
  EXPECT_EQ(model.tenant(), "acme");
  v1::SubmitJobRequest r = QuickJob(model.id());
  r.mutable_config()->set_budget("MP4");
  absl::StatusOr<v1::Job> job = a->SubmitJob(r);
  ASSERT_TRUE(job.ok()) << job.status();
  v1::Job done = WaitFor(a.get(), job->id(), Finished);
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED);

  const auto kNotFound = absl::StatusCode::kNotFound;
  EXPECT_EQ(b->GetModel(model.id()).status().code(), kNotFound);
  EXPECT_EQ(b->DeleteModel(model.id()).code(), kNotFound);
  EXPECT_EQ(b->SubmitJob(QuickJob(model.id())).status().code(), kNotFound);
  EXPECT_EQ(b->GetJob(job->id()).status().code(), kNotFound);
  EXPECT_EQ(b->CancelJob(job->id()).status().code(), kNotFound);
  EXPECT_EQ(b->DeleteJob(job->id()).status().code(), kNotFound);
  EXPECT_EQ(b->WatchJob(job->id(), 0, nullptr).status().code(), kNotFound);
  EXPECT_EQ(b->DownloadArtifact(job->id(), "recipe.json", dir_ + "/r")
                .status()
                .code(),
            kNotFound);
  EXPECT_EQ(b->ListModels()->models_size(), 0);
  EXPECT_EQ(b->ListJobs()->jobs_size(), 0);
  EXPECT_EQ(b->ListJobs(v1::JOB_STATE_UNSPECIFIED, model.id())->jobs_size(), 0);
  // Re-planning from another tenant's job: not found either (on B's own
  // copy of the model).
  v1::Model mine = Upload(b.get());
  EXPECT_NE(mine.id(), model.id());  // the same bytes are B's own model
  EXPECT_FALSE(mine.deduplicated());
  v1::SubmitJobRequest replan = QuickJob(mine.id());
  replan.mutable_config()->set_budget("MP3");
  replan.mutable_config()->set_sensitivity_from_job(job->id());
  EXPECT_EQ(b->SubmitJob(replan).status().code(), kNotFound);
  // And A still sees all of its own.
  EXPECT_TRUE(a->GetJob(job->id()).ok());
  EXPECT_TRUE(a->DownloadArtifact(job->id(), "recipe.json", dir_ + "/r").ok());
}

TEST_F(OpsTest, QuotasAreResourceExhaustedNamingQuotaAndLimit) {
  int64_t size =
      static_cast<int64_t>(fs::file_size(ModelPath("fashion_cnn.pt")));
  Start({"--devices=cpu:2",
         "--tenants_file=" +
             WriteTenants(
                 dir_, absl::StrCat(R"({"running_jobs": 1, "queued_jobs": 1, )",
                                    R"("stored_bytes": )", size + 20000,
                                    R"(, "model_bytes": )", size + 10, "}"))});
  auto a = As(kKeyA);
  auto b = As(kKeyB);
  // model_bytes: a larger upload is refused before its bytes are sent.
  std::string big(size + 11, 'x');
  v1::ModelMetadata meta;
  meta.set_name("big");
  meta.add_input_shape(1);
  meta.set_size_bytes(static_cast<int64_t>(big.size()));
  meta.set_sha256(server::Sha256Hex(big));
  absl::Status s = a->UploadBytes(meta, big).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("model_bytes"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(std::to_string(size + 10)));
  // stored_bytes: the first model fits, a second (other bytes) would not;
  // the message names what the tenant could delete.
  v1::Model model = Upload(a.get());
  ASSERT_EQ(model.state(), v1::MODEL_READY);
  s = a->UploadModel(ModelPath("mini_densenet.pt"), "other", {1, 28, 28})
          .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("stored_bytes"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("model " + model.id()));
  // The same bytes under another input shape are another model but store
  // nothing new: accepted.
  absl::StatusOr<v1::Model> reshaped =
      a->UploadModel(ModelPath("fashion_cnn.pt"), "again", {1, 28, 29});
  ASSERT_TRUE(reshaped.ok()) << reshaped.status();
  EXPECT_NE(reshaped->id(), model.id());
  // Re-uploading the same model near the limit stores nothing new: accepted
  // (it was once refused).
  absl::StatusOr<v1::Model> again =
      a->UploadModel(ModelPath("fashion_cnn.pt"), "again", {1, 28, 28});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id(), model.id());
  EXPECT_TRUE(again->deduplicated());
  // running_jobs 1 and queued_jobs 1: one runs, one waits, a third is refused.
  absl::StatusOr<v1::Job> j1 = a->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(j1.ok());
  WaitFor(a.get(), j1->id(),
          [](const v1::Job& j) { return j.state() == v1::JOB_RUNNING; });
  absl::StatusOr<v1::Job> j2 = a->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(j2.ok()) << j2.status();
  s = a->SubmitJob(QuickJob(model.id())).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("queued_jobs"));
  // The second slot is free, but acme's second job waits for its quota;
  // zeta's job takes the slot.
  v1::Model zmodel = Upload(b.get());
  absl::StatusOr<v1::Job> z = b->SubmitJob(QuickJob(zmodel.id()));
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(WaitFor(b.get(), z->id(), Finished).state(), v1::JOB_SUCCEEDED);
  EXPECT_EQ(a->GetJob(j2->id())->state(), v1::JOB_QUEUED);
  ASSERT_TRUE(a->CancelJob(j1->id()).ok());
  WaitFor(a.get(), j2->id(),
          [](const v1::Job& j) { return j.state() != v1::JOB_QUEUED; });
  ASSERT_TRUE(a->CancelJob(j2->id()).ok());
}

// The blob file of `sha256` under the server's data folder.
std::string BlobFile(const ServerProcess& server, const std::string& sha256) {
  return server.data_dir() + "/blobs/" + sha256.substr(0, 2) + "/" + sha256;
}

TEST_F(OpsTest, DeletingJobsFreesWhatTheStoredBytesQuotaCounts) {
  const int64_t size =
      static_cast<int64_t>(fs::file_size(ModelPath("fashion_cnn.pt")));
  // Room for the model and little else: one job's results pass the limit.
  const int port = FreePort();
  Start({"--devices=cpu:1", "--metrics_listen=127.0.0.1:" + std::to_string(port),
         "--tenants_file=" +
             WriteTenants(dir_, absl::StrCat(R"({"stored_bytes": )", size + 1,
                                             "}"))});
  auto a = As(kKeyA);
  auto b = As(kKeyB);
  v1::Model model = Upload(a.get());
  ASSERT_EQ(model.state(), v1::MODEL_READY);
  absl::StatusOr<v1::Job> first = a->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(first.ok()) << first.status();
  v1::Job done = WaitFor(a.get(), first->id(), Finished);
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED);
  int64_t artifact_bytes = 0;
  for (const v1::Artifact& art : done.result().artifacts()) {
    artifact_bytes += art.size_bytes();
    EXPECT_TRUE(fs::exists(BlobFile(*server_, art.sha256()))) << art.name();
  }
  ASSERT_GT(artifact_bytes, 0);
  std::string metrics = HttpGet(port, "/metrics");
  EXPECT_EQ(Sample(metrics, "zeroq_stored_bytes", {"tenant=\"acme\""}),
            size + artifact_bytes);

  // Over the limit: the next job is refused, naming what to delete.
  absl::Status s = a->SubmitJob(QuickJob(model.id())).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("stored_bytes"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("job " + first->id()));
  EXPECT_THAT(std::string(s.message()), HasSubstr("model " + model.id()));

  // A queued or running job cannot be deleted; another tenant's is not found.
  v1::Model zmodel = Upload(b.get());
  absl::StatusOr<v1::Job> running = b->SubmitJob(QuickJob(zmodel.id(), 100000));
  ASSERT_TRUE(running.ok()) << running.status();
  s = b->DeleteJob(running->id()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("cancel it first"));
  EXPECT_EQ(a->DeleteJob(running->id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(b->DeleteJob(first->id()).status().code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(b->CancelJob(running->id()).ok());
  ASSERT_EQ(WaitFor(b.get(), running->id(), Finished).state(),
            v1::JOB_CANCELLED);
  absl::StatusOr<int64_t> freed = b->DeleteJob(running->id());
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, 0);  // a cancelled job holds no artifacts
  EXPECT_EQ(b->GetJob(running->id()).status().code(),
            absl::StatusCode::kNotFound);

  // Deleting the finished job frees its artifacts, files included; then jobs
  // are accepted again.
  freed = a->DeleteJob(first->id());
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, artifact_bytes);
  for (const v1::Artifact& art : done.result().artifacts()) {
    EXPECT_FALSE(fs::exists(BlobFile(*server_, art.sha256()))) << art.name();
  }
  EXPECT_EQ(a->GetJob(first->id()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(a->WatchJob(first->id(), 0, nullptr).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(a->DeleteJob(first->id()).status().code(),
            absl::StatusCode::kNotFound);
  metrics = HttpGet(port, "/metrics");
  EXPECT_EQ(Sample(metrics, "zeroq_stored_bytes", {"tenant=\"acme\""}), size);
  EXPECT_EQ(Sample(metrics, "zeroq_jobs_deleted_total", {"reason=\"request\""}),
            2);
  absl::StatusOr<v1::Job> second = a->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(WaitFor(a.get(), second->id(), Finished).state(),
            v1::JOB_SUCCEEDED);

  // The model's bytes are zeta's too: deleting acme's model keeps the blob.
  absl::StatusOr<int64_t> gone = a->DeleteJob(second->id());
  ASSERT_TRUE(gone.ok()) << gone.status();
  ASSERT_TRUE(a->DeleteModel(model.id()).ok());
  EXPECT_TRUE(fs::exists(BlobFile(*server_, zmodel.sha256())));
  absl::StatusOr<v1::Job> z = b->SubmitJob(QuickJob(zmodel.id()));
  ASSERT_TRUE(z.ok()) << z.status();
  EXPECT_EQ(WaitFor(b.get(), z->id(), Finished).state(), v1::JOB_SUCCEEDED);
  metrics = HttpGet(port, "/metrics");
  EXPECT_EQ(Sample(metrics, "zeroq_stored_bytes", {"tenant=\"acme\""}), 0);
}

TEST_F(OpsTest, RetentionRemovesOldJobsAndUnusedBlobs) {
  // Unused blobs left as a crash leaves them: one old, one just written.
  auto put_blob = [](const std::string& root, const std::string& bytes) {
    const std::string sha = server::Sha256Hex(bytes);
    fs::create_directories(root + "/blobs/" + sha.substr(0, 2));
    std::ofstream(root + "/blobs/" + sha.substr(0, 2) + "/" + sha) << bytes;
    return sha;
  };
  const int port = FreePort();
  server_ = std::make_unique<ServerProcess>(std::vector<std::string>{
      "--devices=cpu:1", "--job_retention=2s",
      "--metrics_listen=127.0.0.1:" + std::to_string(port)});
  const std::string root = server_->data_dir();
  const std::string old_sha = put_blob(root, "left by a crash long ago");
  const std::string new_sha = put_blob(root, "stored a moment ago");
  fs::last_write_time(BlobFile(*server_, old_sha),
                      fs::file_time_type::clock::now() - std::chrono::hours(2));
  ASSERT_TRUE(server_->Start()) << server_->Log();
  auto c = server_->NewClient();
  v1::Model model = Upload(c.get());
  absl::StatusOr<v1::Job> job = c->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok()) << job.status();
  v1::Job done = WaitFor(c.get(), job->id(), Finished);
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED);
  // Within a few sweeps past its 2 s the job is gone, artifacts and all.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (c->GetJob(job->id()).ok() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_EQ(c->GetJob(job->id()).status().code(), absl::StatusCode::kNotFound);
  for (const v1::Artifact& art : done.result().artifacts()) {
    EXPECT_FALSE(fs::exists(BlobFile(*server_, art.sha256()))) << art.name();
  }
  EXPECT_TRUE(fs::exists(BlobFile(*server_, model.sha256())));  // in use
  EXPECT_FALSE(fs::exists(BlobFile(*server_, old_sha)));
  EXPECT_TRUE(fs::exists(BlobFile(*server_, new_sha)));  // may be about to be used
  const std::string metrics = HttpGet(port, "/metrics");
  EXPECT_EQ(
      Sample(metrics, "zeroq_jobs_deleted_total", {"reason=\"retention\""}), 1);
  EXPECT_GE(Sample(metrics, "zeroq_blobs_removed_total"), 2);
  EXPECT_TRUE(c->GetModel(model.id()).ok());  // models are kept
}

TEST_F(OpsTest, PostgresStoreKeepsEverythingAcrossACrash) {
  const char* server_uri = getenv("ZEROQ_TEST_PG_URI");
  ASSERT_TRUE(server_uri != nullptr && server_uri[0] != '\0')
      << "ZEROQ_TEST_PG_URI is not set: this test needs a PostgreSQL server "
         "(ctest starts one, the fixture \"postgres\")";
  // A database of its own; the URI keeps the server's socket and user.
  const std::string db = absl::StrCat("zq_ops_", getpid());
  const std::string base = server_uri;
  ASSERT_NE(WithDatabase(base, db), "") << base;
  ASSERT_EQ(PgExec(base, "CREATE DATABASE " + db), "");
  struct DropDatabase {
    ~DropDatabase() {
      PgExec(uri, "DROP DATABASE IF EXISTS " + db + " WITH (FORCE)");
    }
    std::string uri, db;
  } drop{base, db};
  // A password the server (trust) never asks for, and the log never shows.
  const std::string uri = WithDatabase(base, db) + "&password=hunter2";

  Start({"--devices=cpu:1", "--store=" + uri});
  EXPECT_THAT(server_->Log(), HasSubstr("store PostgreSQL postgresql://"));
  auto c = server_->NewClient();
  v1::Model model = Upload(c.get());
  absl::StatusOr<v1::Job> job = c->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok()) << job.status();
  const v1::Job done = WaitFor(c.get(), job->id(), Finished);
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED);
  absl::StatusOr<v1::Job> running = c->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(running.ok()) << running.status();
  WaitFor(c.get(), running->id(),
          [](const v1::Job& j) { return j.state() == v1::JOB_RUNNING; });

  // A crash, and the same store again: the finished job, its events and
  // artifacts, and the running job back in the queue.
  server_->Kill();
  ASSERT_TRUE(server_->Start()) << server_->Log();
  c = server_->NewClient();
  absl::StatusOr<v1::Job> after = c->GetJob(done.id());
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->state(), v1::JOB_SUCCEEDED);
  EXPECT_EQ(after->result().artifacts_size(), done.result().artifacts_size());
  absl::StatusOr<v1::Job> requeued = c->GetJob(running->id());
  ASSERT_TRUE(requeued.ok()) << requeued.status();
  EXPECT_FALSE(Finished(*requeued)) << requeued->DebugString();
  absl::StatusOr<v1::Job> cancelled = c->CancelJob(running->id());
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(WaitFor(c.get(), running->id(), Finished).state(),
            v1::JOB_CANCELLED);
  absl::StatusOr<int64_t> freed = c->DeleteJob(done.id());
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_GT(*freed, 0);
  EXPECT_EQ(c->GetJob(done.id()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(server_->Log(), Not(HasSubstr("hunter2")));
  EXPECT_EQ(server_->Stop(), 0);
}

TEST_F(OpsTest, BadStoreIsAClearErrorAndExit1) {
  const std::string unreachable = absl::StrCat(
      "postgresql://u:hunter2@/zeroq?host=", dir_, "&connect_timeout=2");
  for (const std::string& store :
       {std::string("mysql://u:hunter2@db/zeroq"), std::string("sqlite:"),
        std::string("zeroq.db"), unreachable}) {
    const std::string log = dir_ + "/server.log";
    const std::string command = absl::StrCat(
        ZEROQ_SERVER, " --data_dir=", dir_, "/data --store='", store,
        "' --listen=127.0.0.1:0 --metrics_listen= --http_listen= > ", log,
        " 2>&1");
    const int status = std::system(command.c_str());
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1)
        << store << ": " << status;
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)),
                           std::istreambuf_iterator<char>());
    EXPECT_THAT(text,
                HasSubstr(store == unreachable ? "cannot connect" : "--store"))
        << store;
    EXPECT_THAT(text, Not(HasSubstr("hunter2"))) << store;
  }
}

TEST_F(OpsTest, OpenOnlyOnLoopbackUnlessInsecure) {
  ServerProcess refused({"--listen=0.0.0.0:0"});
  EXPECT_FALSE(refused.Start());
  EXPECT_THAT(refused.Log(), HasSubstr("--tenants_file"));
  ServerProcess allowed({"--listen=0.0.0.0:0", "--insecure_open"});
  EXPECT_TRUE(allowed.Start()) << allowed.Log();
  ServerProcess keyed(
      {"--listen=0.0.0.0:0", "--tenants_file=" + WriteTenants(dir_, "{}")});
  EXPECT_TRUE(keyed.Start()) << keyed.Log();
}

// A CA, a server certificate for 127.0.0.1 and a client certificate, made
// with openssl.
void MakeCertificates(const std::string& d) {
  std::string cmd = absl::StrCat(
      "cd ", d, " && set -e && ",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "
      "/CN=zeroq-test-ca "
      "-keyout ca.key -out ca.pem 2>/dev/null && ",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "
      "server.key "
      "-out server.csr 2>/dev/null && ",
      "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext && ",
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key "
      "-CAcreateserial -days 2 "
      "-extfile san.ext -out server.pem 2>/dev/null && ",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=client -keyout client.key "
      "-out client.csr 2>/dev/null && ",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key "
      "-CAcreateserial -days 2 "
      "-out client.pem 2>/dev/null");
  ASSERT_EQ(std::system(cmd.c_str()), 0);
}

// The HTTP status curl gets for `url` with `options` ("000": no answer,
// e.g. a failed TLS handshake).
std::string CurlStatus(const std::string& options, const std::string& url) {
  FILE* f = popen(("curl -s -o /dev/null -w '%{http_code}' --max-time 10 " +
                   options + " " + url + " 2>/dev/null")
                      .c_str(),
                  "r");
  std::string out;
  char buf[64];
  while (f != nullptr && fgets(buf, sizeof(buf), f) != nullptr) out += buf;
  if (f != nullptr) pclose(f);
  return out;
}

TEST_F(OpsTest, TlsWithAndWithoutClientCertificates) {
  MakeCertificates(dir_);
  Start({"--tls_cert=" + dir_ + "/server.pem",
         "--tls_key=" + dir_ + "/server.key"});
  // The HTTP API takes the same TLS flags.
  const std::string https =
      absl::StrCat("https://127.0.0.1:", server_->http_port(), "/v1/models");
  EXPECT_EQ(CurlStatus("--cacert " + dir_ + "/ca.pem", https), "200");
  EXPECT_EQ(CurlStatus("", absl::StrCat("http://127.0.0.1:",
                                        server_->http_port(), "/v1/models")),
            "000");  // plaintext against TLS: no HTTP answer
  client::ClientOptions tls;
  tls.tls_ca_file = dir_ + "/ca.pem";
  tls.rpc_timeout = absl::Seconds(10);
  auto good = *client::Client::Connect(server_->address(), tls);
  EXPECT_TRUE(good->ListModels().ok()) << good->ListModels().status();
  client::ClientOptions plain;
  plain.rpc_timeout = absl::Seconds(3);
  auto insecure = *client::Client::Connect(server_->address(), plain);
  EXPECT_EQ(insecure->ListModels().status().code(),
            absl::StatusCode::kUnavailable);
  server_.reset();

  Start({"--tls_cert=" + dir_ + "/server.pem",
         "--tls_key=" + dir_ + "/server.key",
         "--tls_client_ca=" + dir_ + "/ca.pem"});
  auto no_cert = *client::Client::Connect(server_->address(), tls);
  EXPECT_FALSE(no_cert->ListModels().ok());
  // The command line says it is TLS (exit 1), not "cannot be reached" (3):
  // plaintext against a TLS server, and no client certificate under mTLS.
  const std::string cli = absl::StrCat(ZEROQ_CLI, " --server ", server_->address(),
                                       " --connect_timeout 5 ");
  auto run = [](const std::string& cmd, std::string* out) {
    FILE* f = popen((cmd + " models 2>&1").c_str(), "r");
    char buf[512];
    while (f != nullptr && fgets(buf, sizeof(buf), f) != nullptr) *out += buf;
    const int status = f == nullptr ? -1 : pclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  std::string plain_out, no_cert_out;
  EXPECT_EQ(run(cli, &plain_out), 1) << plain_out;
  EXPECT_THAT(plain_out, HasSubstr("TLS: the server at"));
  EXPECT_THAT(plain_out, HasSubstr("pass --tls_ca"));
  EXPECT_EQ(run(cli + "--tls_ca " + dir_ + "/ca.pem", &no_cert_out), 1) << no_cert_out;
  EXPECT_THAT(no_cert_out, HasSubstr("client certificates"));
  client::ClientOptions mutual = tls;
  mutual.tls_cert_file = dir_ + "/client.pem";
  mutual.tls_key_file = dir_ + "/client.key";
  auto with_cert = *client::Client::Connect(server_->address(), mutual);
  EXPECT_TRUE(with_cert->ListModels().ok()) << with_cert->ListModels().status();
  // And over HTTP: no client certificate, no answer.
  const std::string mtls =
      absl::StrCat("https://127.0.0.1:", server_->http_port(), "/v1/models");
  EXPECT_EQ(CurlStatus("--cacert " + dir_ + "/ca.pem", mtls), "000");
  EXPECT_EQ(CurlStatus("--cacert " + dir_ + "/ca.pem --cert " + dir_ +
                           "/client.pem --key " + dir_ + "/client.key",
                       mtls),
            "200");
}

TEST_F(OpsTest, HealthAndReflection) {
  Start({});
  auto channel = grpc::CreateChannel(server_->address(),
                                     grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  for (const std::string& service :
       {std::string(), std::string("zeroq.v1.ZeroQ")}) {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING)
        << service;
  }
  {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("no.such.Service");
    grpc::health::v1::HealthCheckResponse resp;
    EXPECT_EQ(health->Check(&ctx, req, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }

  // Reflection: the service is listed and its descriptor names every method.
  auto reflection =
      grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = reflection->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  grpc::reflection::v1alpha::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::vector<std::string> services;
  for (const auto& s : resp.list_services_response().service())
    services.push_back(s.name());
  EXPECT_THAT(services, ::testing::IsSupersetOf(
                            {"zeroq.v1.ZeroQ", "grpc.health.v1.Health"}));
  req.set_file_containing_symbol("zeroq.v1.ZeroQ");
  ASSERT_TRUE(stream->Write(req));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_GT(resp.file_descriptor_response().file_descriptor_proto_size(), 0);
  google::protobuf::FileDescriptorProto file;
  bool found = false;
  for (const std::string& bytes :
       resp.file_descriptor_response().file_descriptor_proto()) {
    ASSERT_TRUE(file.ParseFromString(bytes));
    for (const auto& service : file.service()) {
      if (service.name() != "ZeroQ") continue;
      found = true;
      EXPECT_EQ(service.method_size(), 11);
    }
  }
  EXPECT_TRUE(found);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// Regression: the heartbeat sweep dropped every open stream from its set on
// its first pass, so no heartbeat ever reached a quiet watcher and
// zeroq_watch_streams read 0 with streams open.
TEST_F(OpsTest, QuietWatchersGetHeartbeatsAndAreCounted) {
  int port = FreePort();
  Start({"--metrics_listen=127.0.0.1:" + std::to_string(port),
         "--devices=cpu:1", "--heartbeat_interval=200ms"});
  auto c = server_->NewClient();
  v1::Job busy, quiet;
  ASSERT_TRUE(BusyAndQuiet(c.get(), &busy, &quiet));
  constexpr int kWatchers = 3;
  std::atomic<int> heartbeats[kWatchers] = {};
  std::atomic<bool> stop{false};
  std::vector<std::thread> watchers;
  for (int i = 0; i < kWatchers; ++i) {
    watchers.emplace_back([&, i] {
      auto w = server_->NewClient();
      absl::StatusOr<v1::Job> end =
          w->WatchJob(quiet.id(), 0, [&](const v1::JobEvent& e) {
            if (e.type() == v1::EVENT_HEARTBEAT) ++heartbeats[i];
            return !stop.load();
          });
      EXPECT_TRUE(end.ok()) << end.status();
    });
  }
  // The gauge counts the open streams (the sweep runs every 50 ms here).
  double open = -1;
  for (int i = 0; i < 200 && open != kWatchers; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    open = Sample(HttpGet(port, "/metrics"), "zeroq_watch_streams");
  }
  EXPECT_EQ(open, kWatchers);
  // Every quiet stream gets heartbeats, about one per 200 ms: three each
  // well within 10 s even on a busy machine.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  auto all_have = [&](int n) {
    for (const auto& h : heartbeats) {
      if (h.load() < n) return false;
    }
    return true;
  };
  while (!all_have(3) && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(20));
  for (int i = 0; i < kWatchers; ++i) EXPECT_GE(heartbeats[i].load(), 3) << i;
  // Each watcher leaves at its next event: a heartbeat, or (had none come)
  // the end of the cancelled job.
  stop = true;
  EXPECT_TRUE(c->CancelJob(busy.id()).ok());
  EXPECT_TRUE(c->CancelJob(quiet.id()).ok());
  for (std::thread& t : watchers) t.join();
  // The gauge follows the streams down.
  for (int i = 0; i < 100 && open != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    open = Sample(HttpGet(port, "/metrics"), "zeroq_watch_streams");
  }
  EXPECT_EQ(open, 0);
}

TEST_F(OpsTest, MetricsMoveWhileJobsRun) {
  int port = FreePort();
  // One attempt: the crash at the end is final (no retry to wait for).
  Start({"--metrics_listen=127.0.0.1:" + std::to_string(port),
         "--devices=cpu:1", "--max_attempts=1"});
  auto c = server_->NewClient();
  std::string before = HttpGet(port, "/metrics");
  ASSERT_THAT(before, HasSubstr("zeroq_queue_depth"));
  EXPECT_THAT(before, HasSubstr("zeroq_slots{device=\"cpu\"} 1"));
  v1::Model model = Upload(c.get());
  absl::StatusOr<v1::Job> long_job = c->SubmitJob(QuickJob(model.id(), 100000));
  absl::StatusOr<v1::Job> quick = c->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(long_job.ok() && quick.ok());
  WaitFor(c.get(), long_job->id(),
          [](const v1::Job& j) { return j.state() == v1::JOB_RUNNING; });
  std::string during = HttpGet(port, "/metrics");
  EXPECT_EQ(Sample(during, "zeroq_busy_slots", {"device=\"cpu\""}), 1);
  EXPECT_EQ(Sample(during, "zeroq_running_jobs", {"device=\"cpu\""}), 1);
  EXPECT_EQ(Sample(during, "zeroq_queue_depth"), 1);
  EXPECT_EQ(
      Sample(during, "zeroq_jobs_submitted_total", {"tenant=\"default\""}), 2);
  EXPECT_EQ(
      Sample(during, "zeroq_uploaded_bytes_total", {"tenant=\"default\""}),
      static_cast<double>(fs::file_size(ModelPath("fashion_cnn.pt"))));
  EXPECT_EQ(Sample(during, "zeroq_inspections_total", {"result=\"ready\""}), 1);
  ASSERT_TRUE(c->CancelJob(long_job->id()).ok());
  ASSERT_EQ(WaitFor(c.get(), quick->id(), Finished).state(), v1::JOB_SUCCEEDED);
  EXPECT_FALSE(c->GetJob("j-missing").ok());
  std::string after = HttpGet(port, "/metrics");
  EXPECT_EQ(
      Sample(after, "zeroq_jobs_finished_total", {"result=\"cancelled\""}), 1);
  EXPECT_EQ(
      Sample(after, "zeroq_jobs_finished_total", {"result=\"succeeded\""}), 1);
  EXPECT_EQ(Sample(after, "zeroq_queue_depth"), 0);
  EXPECT_EQ(Sample(after, "zeroq_busy_slots", {"device=\"cpu\""}), 0);
  EXPECT_EQ(Sample(after, "zeroq_queue_wait_seconds_count"), 2);
  EXPECT_EQ(Sample(after, "zeroq_stage_duration_seconds_count",
                   {"stage=\"distill\""}),
            1);
  EXPECT_EQ(Sample(after, "zeroq_job_duration_seconds_count",
                   {"result=\"succeeded\""}),
            1);
  EXPECT_GT(Sample(after, "zeroq_stored_bytes", {"tenant=\"default\""}),
            Sample(during, "zeroq_stored_bytes", {"tenant=\"default\""}));
  EXPECT_EQ(Sample(after, "zeroq_rpcs_total",
                   {"method=\"SubmitJob\"", "code=\"OK\""}),
            2);
  EXPECT_EQ(Sample(after, "zeroq_rpcs_total",
                   {"method=\"GetJob\"", "code=\"NOT_FOUND\""}),
            1);
  EXPECT_GT(
      Sample(after, "zeroq_rpc_duration_seconds_count", {"method=\"GetJob\""}),
      1);
  // A crashed worker is counted.
  absl::StatusOr<v1::Job> doomed = c->SubmitJob(QuickJob(model.id(), 100000));
  WaitFor(c.get(), doomed->id(),
          [](const v1::Job& j) { return j.stage() == v1::STAGE_DISTILL; });
  kill(testing::FindWorkerPid(doomed->id()), SIGKILL);
  WaitFor(c.get(), doomed->id(), Finished);
  EXPECT_EQ(Sample(HttpGet(port, "/metrics"), "zeroq_worker_crashes_total"), 1);
}

// SIGTERM tells every watcher at once where to resume, and the server exits
// promptly: with open streams, connected idle channels and metrics on, and
// a running job that gets no grace (figures: bench/shutdown_bench.py).
TEST_F(OpsTest, ShutdownIsPromptAndTellsWatchersWhereToResume) {
  int port = FreePort();
  Start({"--metrics_listen=127.0.0.1:" + std::to_string(port), "--devices=cpu:1",
         "--shutdown_grace=0s"});
  auto c = server_->NewClient();
  v1::Job busy, quiet;
  ASSERT_TRUE(BusyAndQuiet(c.get(), &busy, &quiet));
  // An idle connected channel besides the watchers'.
  auto idle = server_->NewClient();
  ASSERT_TRUE(idle->GetJob(quiet.id()).ok());
  constexpr int kWatchers = 4;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::JobEvent>>> streams;
  for (int i = 0; i < kWatchers; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    v1::WatchJobRequest req;
    req.set_job_id(quiet.id());
    streams.push_back(c->stub()->WatchJob(contexts.back().get(), req));
    v1::JobEvent e;
    ASSERT_TRUE(streams.back()->Read(&e));  // QUEUED, seq 1
  }
  const absl::Time sigterm = absl::Now();
  kill(server_->pid(), SIGTERM);
  for (auto& stream : streams) {
    v1::JobEvent e;
    while (stream->Read(&e)) {
    }
    grpc::Status ended = stream->Finish();
    EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(ended.error_message(), HasSubstr("resume with after_seq=1"));
  }
  const absl::Duration told = absl::Now() - sigterm;
  EXPECT_EQ(server_->Stop(), 0);
  const absl::Duration exited = absl::Now() - sigterm;
  RecordProperty("watchers_told_ms", std::to_string(absl::ToInt64Milliseconds(told)));
  RecordProperty("exit_ms", std::to_string(absl::ToInt64Milliseconds(exited)));
  // Measured 6 ms and 0.5 s; loose bounds for a busy machine.
  EXPECT_LT(told, absl::Seconds(1));
  EXPECT_LT(exited, absl::Seconds(3));
  // Nothing was lost: both jobs are queued again at the next start.
  ASSERT_TRUE(server_->Start());
  auto after = server_->NewClient();
  EXPECT_NE(after->GetJob(busy.id())->state(), v1::JOB_FAILED);
  EXPECT_NE(after->GetJob(quiet.id())->state(), v1::JOB_FAILED);
  ASSERT_TRUE(after->CancelJob(busy.id()).ok());
  ASSERT_TRUE(after->CancelJob(quiet.id()).ok());
}

TEST_F(OpsTest, GracefulShutdownDrainsAndLosesNothing) {
  Start({"--shutdown_grace=2s", "--heartbeat_interval=1s"});
  auto c = server_->NewClient();
  v1::Model model = Upload(c.get());
  absl::StatusOr<v1::Job> job = c->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(job.ok());
  WaitFor(c.get(), job->id(),
          [](const v1::Job& j) { return j.stage() == v1::STAGE_DISTILL; });
  // A health watcher and a job watcher are open when SIGTERM comes.
  auto channel = grpc::CreateChannel(server_->address(),
                                     grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext health_ctx;
  grpc::health::v1::HealthCheckRequest hreq;
  auto health_stream = health->Watch(&health_ctx, hreq);
  grpc::health::v1::HealthCheckResponse hresp;
  ASSERT_TRUE(health_stream->Read(&hresp));
  EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  grpc::ClientContext watch_ctx;
  v1::WatchJobRequest wreq;
  wreq.set_job_id(job->id());
  auto watch = c->stub()->WatchJob(&watch_ctx, wreq);
  v1::JobEvent e;
  ASSERT_TRUE(watch->Read(&e));

  kill(server_->pid(), SIGTERM);
  ASSERT_TRUE(health_stream->Read(&hresp));
  EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // During the grace period new work is refused; health turns NOT_SERVING
  // only once it is (a submit racing the drain was once accepted).
  absl::Status submit = c->SubmitJob(QuickJob(model.id())).status();
  EXPECT_EQ(submit.code(), absl::StatusCode::kUnavailable) << submit;
  while (watch->Read(&e)) {
  }
  grpc::Status ended = watch->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE)
      << ended.error_message();
  health_ctx.TryCancel();
  EXPECT_EQ(server_->Stop(), 0);  // exit status 0 after SIGTERM

  ASSERT_TRUE(server_->Start());
  c = server_->NewClient();
  v1::Job again = *c->GetJob(job->id());
  EXPECT_TRUE(again.state() == v1::JOB_QUEUED ||
              again.state() == v1::JOB_RUNNING)
      << v1::JobState_Name(again.state());
  EXPECT_LE(again.attempts(), 1);  // the stopped attempt does not count
  ASSERT_TRUE(c->CancelJob(job->id()).ok());
}

TEST_F(OpsTest, JsonLogLinesCarryIds) {
  Start({"--log_format=json"});
  auto c = server_->NewClient();
  v1::Model model = Upload(c.get());
  absl::StatusOr<v1::Job> job = c->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok());
  ASSERT_EQ(WaitFor(c.get(), job->id(), Finished).state(), v1::JOB_SUCCEEDED);
  ASSERT_EQ(server_->Stop(), 0);
  int lines = 0, with_job = 0, with_model = 0;
  for (absl::string_view line :
       absl::StrSplit(server_->Log(), '\n', absl::SkipEmpty())) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << line;
    EXPECT_TRUE(j.contains("time") && j.contains("level") && j.contains("msg"))
        << line;
    ++lines;
    if (j.value("job", "") == job->id()) {
      ++with_job;
      EXPECT_EQ(j.value("tenant", ""), "default");
      EXPECT_EQ(j.value("model", ""), model.id());
    }
    with_model += j.value("model", "") == model.id();
  }
  EXPECT_GT(lines, 3);
  EXPECT_GE(with_job, 2);  // submitted, succeeded
  EXPECT_GE(with_model, 3);
}

}  // namespace
}  // namespace zeroq
