// Several zeroq-server replicas on one PostgreSQL database and one data
// folder, end to end: real servers and workers on 127.0.0.1, real
// PostgreSQL. Jobs submitted anywhere run anywhere and each job has at most
// one live worker at any moment (a sampler scans /proc every 20 ms); a
// killed replica's jobs finish on the others; a watcher or a cancel on one
// replica reaches a job running on another; tenant quotas hold across
// replicas; a PostgreSQL restart turns health NOT_SERVING and back, and
// loses nothing.
//
// The tests use a fresh database on the server ctest starts (the fixture
// "postgres", ZEROQ_TEST_PG_URI); the one that restarts PostgreSQL starts a
// server of its own (scripts/pg_test_server.sh) so as not to disturb the
// tests running beside it.
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpc/health_client.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/sha256.h"
#include "tests/e2e_util.h"
#include "tests/pg_util.h"
#include "tests/server_process.h"

namespace zeroq {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::zeroq::v1;
using ::grpc::health::v1::HealthCheckResponse;
using testing::Finished;
using testing::QuickJob;
using testing::PgExec;
using testing::ServerProcess;
using testing::WithDatabase;

// ------------------------------------------------------------ PostgreSQL

// Runs a command through the shell; its exit status, and its standard
// output in *out.
int Shell(const std::string& command, std::string* out) {
  FILE* f = popen(command.c_str(), "r");
  if (f == nullptr) return -1;
  char buf[512];
  while (fgets(buf, sizeof(buf), f) != nullptr) *out += buf;
  const int status = pclose(f);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string Tail(const std::string& text, int lines) {
  size_t pos = text.size();
  for (int i = 0; i < lines && pos != std::string::npos && pos > 0; ++i)
    pos = text.rfind('\n', pos - 1);
  return pos == std::string::npos || pos == 0 ? text : text.substr(pos + 1);
}

// ------------------------------------------------------------ workers

// A live zeroq-worker process running a job under a data folder.
struct Worker {
  pid_t pid = -1;
  std::string replica;  // from DATA_DIR/replicas/NAME/jobs/JOB_ID/
  std::string job;
  std::string cmdline;
};

// The whole file, or what could be read of it: a /proc file of a process
// that exits while it is read ends early (ESRCH), which an ifstream's
// istreambuf_iterator would throw for.
std::string ReadFile(const fs::path& path) {
  std::string out;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) out.append(buf, n);
  ::close(fd);
  return out;
}

// The process's state letter and parent from /proc/PID/stat ('?' if gone).
char ProcState(pid_t pid, pid_t* ppid = nullptr) {
  const std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 4 > stat.size()) return '?';
  if (ppid != nullptr) *ppid = atoi(stat.c_str() + paren + 4);
  return stat[paren + 2];
}

// A process that exists and is not a zombie.
bool Alive(pid_t pid) {
  const char s = ProcState(pid);
  return s != '?' && s != 'Z' && s != 'X';
}

// The live zeroq-worker processes whose command line names a job folder
// under data_dir. A process a worker forked (same command line, a worker of
// the same job as its parent) is not another worker.
std::vector<Worker> ScanWorkers(const std::string& data_dir) {
  const std::string marker = data_dir + "/replicas/";
  std::vector<Worker> found;
  std::map<pid_t, pid_t> parent;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string cmd = ReadFile(e.path() / "cmdline");
    if (cmd.find("zeroq-worker") == std::string::npos) continue;
    const size_t at = cmd.find(marker);
    if (at == std::string::npos) continue;
    // .../replicas/NAME/jobs/JOB_ID/...
    std::vector<std::string> parts =
        absl::StrSplit(cmd.substr(at + marker.size()), '/');
    if (parts.size() < 4 || parts[1] != "jobs") continue;
    Worker w;
    w.pid = std::stoi(name);
    pid_t ppid = 0;
    const char state = ProcState(w.pid, &ppid);
    if (state == '?' || state == 'Z' || state == 'X') continue;
    w.replica = parts[0];
    w.job = parts[2];
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    w.cmdline = cmd;
    parent[w.pid] = ppid;
    found.push_back(std::move(w));
  }
  std::map<pid_t, std::string> job_of;
  for (const Worker& w : found) job_of[w.pid] = w.job;
  std::vector<Worker> workers;
  for (Worker& w : found) {
    auto p = job_of.find(parent[w.pid]);
    if (p != job_of.end() && p->second == w.job) continue;
    workers.push_back(std::move(w));
  }
  return workers;
}

// Scans /proc every 20 ms for the workers under a data folder; records
// every moment a job had two live workers, where each job ran, and the most
// workers seen at once.
class WorkerSampler {
 public:
  explicit WorkerSampler(std::string data_dir)
      : data_dir_(std::move(data_dir)), thread_([this] { Loop(); }) {}
  ~WorkerSampler() { Stop(); }

  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  std::vector<std::string> Violations() const {
    std::lock_guard<std::mutex> lock(mu_);
    return violations_;
  }
  // Job -> the replicas seen running it.
  std::map<std::string, std::set<std::string>> Placements() const {
    std::lock_guard<std::mutex> lock(mu_);
    return placements_;
  }
  std::set<std::string> Replicas() const {
    std::set<std::string> all;
    for (const auto& [job, replicas] : Placements())
      all.insert(replicas.begin(), replicas.end());
    return all;
  }
  int MaxAtOnce() const {
    std::lock_guard<std::mutex> lock(mu_);
    return max_at_once_;
  }
  std::string MaxAtOnceDetail() const {
    std::lock_guard<std::mutex> lock(mu_);
    return max_detail_;
  }
  int64_t scans() const {
    std::lock_guard<std::mutex> lock(mu_);
    return scans_;
  }
  // The workers of the latest scan.
  std::vector<Worker> Current() const {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }
  // Waits for a scan that finishes after now.
  void Sync() const {
    const int64_t target = scans() + 2;
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (scans() < target && absl::Now() < deadline)
      absl::SleepFor(absl::Milliseconds(5));
  }

 private:
  static std::string Describe(const std::vector<Worker>& ws) {
    std::vector<std::string> out;
    for (const Worker& w : ws)
      out.push_back(
          absl::StrCat("pid ", w.pid, " replica ", w.replica, " job ", w.job));
    return absl::StrJoin(out, "; ");
  }

  void Loop() {
    while (!stop_) {
      std::vector<Worker> ws = ScanWorkers(data_dir_);
      std::map<std::string, std::vector<Worker>> by_job;
      for (const Worker& w : ws) by_job[w.job].push_back(w);
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++scans_;
        for (const auto& [job, list] : by_job) {
          for (const Worker& w : list) placements_[job].insert(w.replica);
          if (list.size() > 1 && violations_.size() < 20) {
            violations_.push_back(
                absl::StrCat(absl::FormatTime("%H:%M:%E3S", absl::Now(),
                                              absl::UTCTimeZone()),
                             " job ", job, " has ", list.size(),
                             " live workers: ", Describe(list)));
          }
        }
        if (static_cast<int>(ws.size()) > max_at_once_) {
          max_at_once_ = static_cast<int>(ws.size());
          max_detail_ = Describe(ws);
        }
        current_ = std::move(ws);
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }

  const std::string data_dir_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::vector<std::string> violations_;
  std::map<std::string, std::set<std::string>> placements_;
  std::vector<Worker> current_;
  int max_at_once_ = 0;
  std::string max_detail_;
  int64_t scans_ = 0;
  std::thread thread_;  // last: starts once the members above exist
};

// ------------------------------------------------------------ jobs

std::string Attempts(const v1::Job& j) {
  std::vector<std::string> out;
  for (const v1::JobAttempt& a : j.attempt_history())
    out.push_back(absl::StrCat("#", a.number(), " ", a.device(), " ",
                               a.outcome(), a.reason().empty() ? "" : ": ",
                               a.reason()));
  return absl::StrJoin(out, " | ");
}

std::string Summary(const v1::Job& j) {
  return absl::StrCat(
      j.id(), " ", v1::JobState_Name(j.state()), " attempts=", j.attempts(),
      " server_restarts=", j.server_restarts(),
      " worker_crashes=", j.worker_crashes(), " last_seq=", j.last_seq(),
      j.error().message().empty() ? "" : " error=", j.error().message(), " [",
      Attempts(j), "]");
}

// Polls the jobs (round robin over the clients, so that one replica's
// trouble does not hide the others' answers) until each is finished or the
// deadline passes; the jobs as last seen.
std::map<std::string, v1::Job> WaitAllFinished(
    const std::vector<client::Client*>& clients,
    const std::vector<std::string>& ids, absl::Duration timeout) {
  std::map<std::string, v1::Job> last;
  const absl::Time deadline = absl::Now() + timeout;
  size_t turn = 0;
  std::set<std::string> open(ids.begin(), ids.end());
  while (!open.empty() && absl::Now() < deadline) {
    for (auto it = open.begin(); it != open.end();) {
      absl::StatusOr<v1::Job> j = clients[turn++ % clients.size()]->GetJob(*it);
      if (j.ok()) {
        last[*it] = *j;
        if (Finished(*j)) {
          it = open.erase(it);
          continue;
        }
      }
      ++it;
    }
    if (!open.empty()) absl::SleepFor(absl::Milliseconds(100));
  }
  for (const std::string& id : open)
    ADD_FAILURE() << "job " << id << " did not finish within " << timeout
                  << "; last seen: " << Summary(last[id]);
  return last;
}

// The job's events (heartbeats left out) from seq 1, watched to its end;
// checks they are seqs 1..N, in order, ending in `end`.
std::vector<v1::JobEvent> DenseEvents(client::Client* c, const std::string& id,
                                      v1::JobState end) {
  std::vector<v1::JobEvent> events;
  absl::StatusOr<v1::Job> done = testing::WatchAll(c, id, &events);
  EXPECT_TRUE(done.ok()) << id << ": " << done.status();
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].seq() != static_cast<int64_t>(i + 1)) {
      ADD_FAILURE() << "job " << id << ": event " << i << " has seq "
                    << events[i].seq() << ", want " << i + 1;
      break;
    }
  }
  EXPECT_FALSE(events.empty()) << id;
  if (!events.empty()) {
    EXPECT_EQ(events.back().type(), v1::EVENT_STATE) << id;
    EXPECT_EQ(events.back().state(), end)
        << id << ": " << events.back().DebugString();
    if (done.ok()) EXPECT_EQ(done->last_seq(), events.back().seq()) << id;
  }
  return events;
}

constexpr char kKey[] = "key-of-acme";

std::string TempDir(const std::string& prefix) {
  std::string tmpl = (fs::temp_directory_path() / (prefix + "XXXXXX")).string();
  char* p = mkdtemp(tmpl.data());
  return p == nullptr ? "" : p;
}

// grpc.health.v1 Check of the whole server: SERVING, NOT_SERVING, or the
// RPC's error.
std::string Health(const std::string& address) {
  auto channel =
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::health::v1::HealthCheckRequest req;
  HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok())
    return absl::StrCat("error ", s.error_code(), " ", s.error_message());
  return HealthCheckResponse::ServingStatus_Name(resp.status());
}

// ------------------------------------------------------------ the fixture

class ReplicasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    shared_ = TempDir("zqr_data_");
    ASSERT_FALSE(shared_.empty());
  }

  void TearDown() override {
    if (HasFailure()) {
      for (const auto& [name, server] : replicas_) {
        std::cerr << "---- replica " << name << " (" << server->log_path()
                  << "), last lines:\n"
                  << Tail(server->Log(), 120) << std::endl;
      }
      if (!own_pg_dir_.empty()) {
        fs::path real = fs::is_symlink(own_pg_dir_, ec_)
                            ? fs::read_symlink(own_pg_dir_, ec_)
                            : fs::path(own_pg_dir_);
        std::cerr << "---- PostgreSQL log, last lines:\n"
                  << Tail(ReadFile(real / "server.log"), 40) << std::endl;
      }
    }
    replicas_.clear();  // SIGKILL: their workers go with them
    if (!drop_uri_.empty())
      PgExec(drop_uri_, "DROP DATABASE IF EXISTS " + db_ + " WITH (FORCE)");
    if (!own_pg_dir_.empty()) {
      std::string out;
      Shell(absl::StrCat("bash ", ZEROQ_PG_TEST_SCRIPT, " stop ", own_pg_dir_,
                         " 2>&1"),
            &out);
    }
    if (!tenants_file_.empty()) fs::remove(tenants_file_, ec_);
    if (getenv("ZEROQ_KEEP_TEST_DATA") == nullptr) fs::remove_all(shared_, ec_);
  }

  // A fresh database on the tests' PostgreSQL server (ZEROQ_TEST_PG_URI):
  // its URI in *uri.
  void FreshDatabase(std::string* uri) {
    const char* server_uri = getenv("ZEROQ_TEST_PG_URI");
    ASSERT_TRUE(server_uri != nullptr && server_uri[0] != '\0')
        << "ZEROQ_TEST_PG_URI is not set: this test needs a PostgreSQL server "
           "(ctest starts one, the fixture \"postgres\")";
    CreateDatabase(server_uri, uri);
  }

  // A PostgreSQL server of this test's own, in a short folder under /tmp
  // (its socket's path must fit in 107 bytes), with a fresh database: its
  // URI in *uri.
  void OwnPostgres(std::string* uri) {
    own_pg_dir_ = absl::StrCat(
        "/tmp/zqr-pg-", getpid(), "-",
        ::testing::UnitTest::GetInstance()->random_seed(), "-", counter_++);
    std::string out;
    const int rc = Shell(absl::StrCat("bash ", ZEROQ_PG_TEST_SCRIPT, " start ",
                                      own_pg_dir_, " 2>&1"),
                         &out);
    ASSERT_EQ(rc, 0) << out;
    // The URI is the last line it prints.
    std::string base(absl::StripAsciiWhitespace(out));
    base = base.substr(base.rfind('\n') + 1);
    ASSERT_TRUE(absl::StartsWith(base, "postgresql://")) << out;
    CreateDatabase(base, uri);
  }

  // Stops (pause) or starts again (resume) this test's own PostgreSQL.
  void PgControl(const std::string& what) {
    std::string out;
    const int rc = Shell(absl::StrCat("bash ", ZEROQ_PG_TEST_SCRIPT, " ", what,
                                      " ", own_pg_dir_, " 2>&1"),
                         &out);
    ASSERT_EQ(rc, 0) << what << ": " << out;
  }

  // Starts replica `name` on the store and the shared data folder.
  ServerProcess* StartReplica(const std::string& name, const std::string& store,
                              std::vector<std::string> flags = {}) {
    std::vector<std::string> all = {
        "--data_dir=" + shared_, "--replica_id=" + name, "--store=" + store,
        "--lease_duration=2s",   "--devices=cpu:1",      "--threads_per_job=1"};
    all.insert(all.end(), flags.begin(), flags.end());
    auto server = std::make_unique<ServerProcess>(all);
    const bool started = server->Start();
    ServerProcess* raw = server.get();
    replicas_[name] = std::move(server);
    EXPECT_TRUE(started) << "replica " << name << " did not start:\n"
                         << raw->Log();
    return started ? raw : nullptr;
  }

  // A tenants file with one tenant, acme (key kKey), and its quotas.
  std::string WriteTenants(const std::string& quotas) {
    const std::string path = shared_ + "-tenants.json";
    std::ofstream(path)
        << R"({"tenants": [{"name": "acme", "api_key_sha256": [")"
        << server::Sha256Hex(kKey) << R"("], "quotas": )" << quotas << "}]}";
    tenants_file_ = path;
    return path;
  }

  std::string shared_;  // the replicas' data folder
  std::map<std::string, std::unique_ptr<ServerProcess>> replicas_;

 private:
  void CreateDatabase(const std::string& server_uri, std::string* uri) {
    db_ = absl::StrCat("zq_replicas_", getpid(), "_", counter_++);
    ASSERT_EQ(PgExec(server_uri, "CREATE DATABASE " + db_), "");
    drop_uri_ = server_uri;
    *uri = WithDatabase(server_uri, db_);
    ASSERT_FALSE(uri->empty()) << server_uri;
  }

  std::error_code ec_;
  std::string db_, drop_uri_;
  std::string own_pg_dir_;
  std::string tenants_file_;
  static inline int counter_ = 0;
};

// 30 jobs submitted round robin to 3 one-slot replicas all succeed; no job
// ever has two live workers; the jobs ran on more than one replica.
TEST_F(ReplicasTest, ThirtyJobsOnThreeReplicas) {
  std::string uri;
  ASSERT_NO_FATAL_FAILURE(FreshDatabase(&uri));
  std::vector<std::unique_ptr<client::Client>> clients;
  std::vector<client::Client*> raw;
  for (const char* name : {"ra", "rb", "rc"}) {
    ServerProcess* s = StartReplica(name, uri);
    ASSERT_NE(s, nullptr);
    clients.push_back(s->NewClient());
    raw.push_back(clients.back().get());
  }
  WorkerSampler sampler(shared_);
  const v1::Model model = testing::UploadReady(raw[0], "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.DebugString();

  const absl::Time start = absl::Now();
  std::vector<std::string> ids;
  for (int i = 0; i < 30; ++i) {
    absl::StatusOr<v1::Job> job =
        raw[i % 3]->SubmitJob(QuickJob(model.id(), 10));
    ASSERT_TRUE(job.ok()) << "job " << i << ": " << job.status();
    ids.push_back(job->id());
  }
  std::map<std::string, v1::Job> done =
      WaitAllFinished(raw, ids, absl::Minutes(2));
  const absl::Duration took = absl::Now() - start;
  sampler.Sync();
  sampler.Stop();
  RecordProperty("thirty_jobs_ms",
                 std::to_string(absl::ToInt64Milliseconds(took)));

  for (const std::string& id : ids)
    EXPECT_EQ(done[id].state(), v1::JOB_SUCCEEDED) << Summary(done[id]);
  EXPECT_THAT(sampler.Violations(), ::testing::IsEmpty());
  const auto placements = sampler.Placements();
  std::map<std::string, int> per_replica;
  for (const auto& [job, replicas] : placements)
    for (const std::string& r : replicas) ++per_replica[r];
  std::string spread;
  for (const auto& [r, n] : per_replica) spread += absl::StrCat(r, ":", n, " ");
  std::cerr << "30 jobs in " << took << " after " << sampler.scans()
            << " scans; jobs seen running per replica: " << spread << std::endl;
  // The sampler sees nearly every job (each runs for a good part of a
  // second, it looks every 20 ms).
  EXPECT_GE(placements.size(), 20u) << spread;
  EXPECT_GT(sampler.Replicas().size(), 1u) << spread;
  for (const std::string& id : ids)
    EXPECT_EQ(done[id].attempts(), 1) << Summary(done[id]);
}

// SIGKILL a replica while it runs a job: every job still succeeds on the
// others, none is lost, no job ever has two live workers, and the killed
// replica's job shows it was taken back from an expired lease.
TEST_F(ReplicasTest, KilledReplicasJobsFinishElsewhere) {
  std::string uri;
  ASSERT_NO_FATAL_FAILURE(FreshDatabase(&uri));
  std::vector<std::unique_ptr<client::Client>> clients;
  for (const char* name : {"ra", "rb", "rc"}) {
    ServerProcess* s = StartReplica(name, uri);
    ASSERT_NE(s, nullptr);
    clients.push_back(s->NewClient());
  }
  WorkerSampler sampler(shared_);
  const v1::Model model =
      testing::UploadReady(clients[0].get(), "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.DebugString();
  std::vector<std::string> ids;
  for (int i = 0; i < 9; ++i) {
    absl::StatusOr<v1::Job> job =
        clients[i % 3]->SubmitJob(QuickJob(model.id(), 200));
    ASSERT_TRUE(job.ok()) << "job " << i << ": " << job.status();
    ids.push_back(job->id());
  }
  // The victim, rc, once its worker is into distillation: past its start,
  // where it asks to die with its server. (A worker killed with its server
  // in the first moments of its start, while LibTorch loads, lives on until
  // it gets to that request and sees its parent gone, up to seconds on a
  // busy machine.)
  std::vector<Worker> victims;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (victims.empty() && absl::Now() < deadline) {
    for (const Worker& w : ScanWorkers(shared_)) {
      if (w.replica != "rc") continue;
      absl::StatusOr<v1::Job> j = clients[0]->GetJob(w.job);
      if (j.ok() && j->state() == v1::JOB_RUNNING &&
          j->stage() == v1::STAGE_DISTILL)
        victims.push_back(w);
    }
    if (victims.empty()) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_FALSE(victims.empty()) << "rc never ran a job to its distillation";
  const absl::Time killed = absl::Now();
  replicas_["rc"]->Kill();
  // Its workers die with it (PR_SET_PDEATHSIG), well before its lease ends.
  for (const Worker& w : victims) {
    while (Alive(w.pid) && absl::Now() - killed < absl::Seconds(5))
      absl::SleepFor(absl::Milliseconds(5));
    const absl::Duration gone = absl::Now() - killed;
    EXPECT_LT(gone, absl::Seconds(2)) << "worker " << w.pid << " of job "
                                      << w.job << " outlived its killed server";
    std::cerr << "killed rc running job " << w.job
              << "; its worker was gone after " << gone << std::endl;
  }

  std::vector<client::Client*> survivors = {clients[0].get(), clients[1].get()};
  std::map<std::string, v1::Job> done =
      WaitAllFinished(survivors, ids, absl::Minutes(2));
  sampler.Sync();
  sampler.Stop();
  for (const std::string& id : ids)
    EXPECT_EQ(done[id].state(), v1::JOB_SUCCEEDED) << Summary(done[id]);
  EXPECT_THAT(sampler.Violations(), ::testing::IsEmpty());
  const auto placements = sampler.Placements();
  for (const Worker& w : victims) {
    const v1::Job& j = done[w.job];
    bool lease = false;
    for (const v1::JobAttempt& a : j.attempt_history())
      lease =
          lease ||
          absl::StrContains(
              absl::AsciiStrToLower(a.outcome() + " " + a.reason()), "lease");
    EXPECT_TRUE(j.server_restarts() >= 1 || lease) << Summary(j);
    EXPECT_GE(j.attempts(), 2) << Summary(j);
    EXPECT_GE(j.attempt_history_size(), 2) << Summary(j);
    // It finished on a survivor.
    const std::set<std::string> where = placements.count(w.job)
                                            ? placements.at(w.job)
                                            : std::set<std::string>{};
    EXPECT_TRUE(where.count("ra") || where.count("rb"))
        << "job " << w.job << " seen on: " << absl::StrJoin(where, ",");
    std::cerr << "victim's job: " << Summary(j) << std::endl;
  }
  // The survivors never lost a job either: every job has its events.
  for (size_t i = 0; i < ids.size(); ++i) {
    if (done[ids[i]].state() != v1::JOB_SUCCEEDED) continue;
    DenseEvents(survivors[i % 2], ids[i], v1::JOB_SUCCEEDED);
  }
}

// A job runs on B; A, started later, streams it from seq 0: seqs 1..N once
// each, in order, ending SUCCEEDED, the same events B's watcher got.
TEST_F(ReplicasTest, WatcherOnAnotherReplicaSeesEveryEvent) {
  std::string uri;
  ASSERT_NO_FATAL_FAILURE(FreshDatabase(&uri));
  ServerProcess* b = StartReplica("rb", uri);
  ASSERT_NE(b, nullptr);
  auto cb = b->NewClient();
  const v1::Model model = testing::UploadReady(cb.get(), "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.DebugString();
  // Long enough that A watches it live for several seconds.
  v1::SubmitJobRequest req = QuickJob(model.id(), 1500);
  absl::StatusOr<v1::Job> job = cb->SubmitJob(req);
  ASSERT_TRUE(job.ok()) << job.status();
  std::vector<v1::JobEvent> on_b;
  absl::StatusOr<v1::Job> b_end = absl::UnknownError("not watched");
  std::thread watch_b(
      [&] { b_end = testing::WatchAll(cb.get(), job->id(), &on_b); });
  // Joined however the test ends (the stream ends with the job, in seconds).
  struct Join {
    std::thread* t;
    ~Join() {
      if (t->joinable()) t->join();
    }
  } join_b{&watch_b};
  testing::WaitFor(cb.get(), job->id(), [](const v1::Job& j) {
    return j.state() == v1::JOB_RUNNING || Finished(j);
  });

  ServerProcess* a = StartReplica("ra", uri);
  ASSERT_NE(a, nullptr);
  auto ca = a->NewClient();
  absl::StatusOr<v1::Job> before = ca->GetJob(job->id());
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->state(), v1::JOB_RUNNING)
      << "the job ended before A watched it: make it longer; "
      << Summary(*before);
  std::vector<v1::JobEvent> on_a;
  int64_t live = 0;  // events A got while the job was running
  bool ended = false;
  absl::StatusOr<v1::Job> a_end =
      ca->WatchJob(job->id(), 0, [&](const v1::JobEvent& e) {
        if (e.type() == v1::EVENT_HEARTBEAT) return true;
        on_a.push_back(e);
        if (!ended && e.type() == v1::EVENT_STATE &&
            e.state() != v1::JOB_RUNNING && e.state() != v1::JOB_QUEUED)
          ended = true;
        if (!ended && e.seq() > before->last_seq()) ++live;
        return true;
      });
  watch_b.join();
  ASSERT_TRUE(a_end.ok()) << a_end.status();
  ASSERT_TRUE(b_end.ok()) << b_end.status();
  EXPECT_EQ(a_end->state(), v1::JOB_SUCCEEDED) << Summary(*a_end);
  std::cerr << "A got " << on_a.size() << " events, " << live
            << " of them after it started watching; B got " << on_b.size()
            << std::endl;
  EXPECT_GT(live, 0) << "A saw nothing live: the job should run longer";

  ASSERT_FALSE(on_a.empty());
  for (size_t i = 0; i < on_a.size(); ++i) {
    ASSERT_EQ(on_a[i].seq(), static_cast<int64_t>(i + 1))
        << "event " << i << " on A: " << on_a[i].DebugString();
  }
  EXPECT_EQ(on_a.back().type(), v1::EVENT_STATE);
  EXPECT_EQ(on_a.back().state(), v1::JOB_SUCCEEDED)
      << on_a.back().DebugString();
  EXPECT_EQ(a_end->last_seq(), static_cast<int64_t>(on_a.size()));
  ASSERT_EQ(on_a.size(), on_b.size());
  for (size_t i = 0; i < on_a.size(); ++i) {
    EXPECT_EQ(on_a[i].SerializeAsString(), on_b[i].SerializeAsString())
        << "event " << i << "\non A: " << on_a[i].DebugString()
        << "on B: " << on_b[i].DebugString();
  }
}

// A job runs on B; CancelJob through C stops B's worker within 2 s of the
// call returning, and the job ends CANCELLED.
TEST_F(ReplicasTest, CancelOnAnotherReplicaStopsTheWorkerWithinTwoSeconds) {
  std::string uri;
  ASSERT_NO_FATAL_FAILURE(FreshDatabase(&uri));
  ServerProcess* b = StartReplica("rb", uri);
  ASSERT_NE(b, nullptr);
  auto cb = b->NewClient();
  const v1::Model model = testing::UploadReady(cb.get(), "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.DebugString();
  absl::StatusOr<v1::Job> job = cb->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(job.ok()) << job.status();
  testing::WaitFor(cb.get(), job->id(), [](const v1::Job& j) {
    return j.stage() == v1::STAGE_DISTILL || Finished(j);
  });
  pid_t worker = -1;
  for (int i = 0; i < 500 && worker < 0; ++i) {
    for (const Worker& w : ScanWorkers(shared_))
      if (w.job == job->id()) worker = w.pid;
    if (worker < 0) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_GT(worker, 0) << "no worker for " << job->id();

  ServerProcess* c = StartReplica("rc", uri);
  ASSERT_NE(c, nullptr);
  auto cc = c->NewClient();
  // Let C settle (its first claims and lease sweeps) before the cancel.
  absl::SleepFor(absl::Milliseconds(500));
  ASSERT_TRUE(Alive(worker));
  absl::StatusOr<v1::Job> cancelled = cc->CancelJob(job->id());
  const absl::Time returned = absl::Now();
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  while (Alive(worker) && absl::Now() - returned < absl::Seconds(10))
    absl::SleepFor(absl::Milliseconds(10));
  const absl::Duration gone = absl::Now() - returned;
  RecordProperty("worker_gone_ms",
                 std::to_string(absl::ToInt64Milliseconds(gone)));
  std::cerr << "the worker was gone " << gone
            << " after CancelJob on C returned" << std::endl;
  EXPECT_FALSE(Alive(worker));
  EXPECT_LE(gone, absl::Seconds(2));
  const v1::Job end =
      testing::WaitFor(cc.get(), job->id(), Finished, absl::Seconds(30));
  EXPECT_EQ(end.state(), v1::JOB_CANCELLED) << Summary(end);
  for (const Worker& w : ScanWorkers(shared_))
    EXPECT_NE(w.job, job->id())
        << "a worker of the cancelled job runs: " << w.cmdline;
  absl::StatusOr<v1::Job> on_b = cb->GetJob(job->id());
  ASSERT_TRUE(on_b.ok()) << on_b.status();
  EXPECT_EQ(on_b->state(), v1::JOB_CANCELLED) << Summary(*on_b);
  DenseEvents(cb.get(), job->id(), v1::JOB_CANCELLED);
}

// A tenant allowed one running job, on 3 replicas of 2 slots each: never
// more than one of its jobs runs at a time, in the store's view or in the
// processes', and all of them succeed.
TEST_F(ReplicasTest, RunningLimitHoldsAcrossReplicas) {
  std::string uri;
  ASSERT_NO_FATAL_FAILURE(FreshDatabase(&uri));
  const std::string tenants = WriteTenants(R"({"running_jobs": 1})");
  std::vector<std::unique_ptr<client::Client>> clients;
  std::vector<client::Client*> raw;
  client::ClientOptions keyed;
  keyed.api_key = kKey;
  for (const char* name : {"ra", "rb", "rc"}) {
    ServerProcess* s = StartReplica(
        name, uri, {"--devices=cpu:2", "--tenants_file=" + tenants});
    ASSERT_NE(s, nullptr);
    clients.push_back(s->NewClient(keyed));
    raw.push_back(clients.back().get());
  }
  const v1::Model model = testing::UploadReady(raw[0], "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.DebugString();

  WorkerSampler sampler(shared_);
  // The store's view, through every replica in turn.
  std::atomic<bool> stop{false};
  std::atomic<int> max_running{0}, polls{0};
  std::mutex mu;
  std::string max_running_detail;
  std::thread poller([&] {
    std::vector<std::unique_ptr<client::Client>> pollers;
    for (const char* name : {"ra", "rb", "rc"})
      pollers.push_back(replicas_[name]->NewClient(keyed));
    size_t turn = 0;
    while (!stop) {
      absl::StatusOr<v1::ListJobsResponse> running =
          pollers[turn++ % pollers.size()]->ListJobs(v1::JOB_RUNNING);
      if (running.ok()) {
        ++polls;
        if (running->jobs_size() > max_running) {
          max_running = running->jobs_size();
          std::lock_guard<std::mutex> lock(mu);
          max_running_detail.clear();
          for (const v1::Job& j : running->jobs())
            max_running_detail += Summary(j) + "\n";
        }
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  });
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<v1::Job> job =
        raw[i % 3]->SubmitJob(QuickJob(model.id(), 60));
    EXPECT_TRUE(job.ok()) << "job " << i << ": " << job.status();
    if (job.ok()) ids.push_back(job->id());
  }
  std::map<std::string, v1::Job> done =
      WaitAllFinished(raw, ids, absl::Minutes(2));
  stop = true;
  poller.join();
  sampler.Sync();
  sampler.Stop();
  for (const std::string& id : ids)
    EXPECT_EQ(done[id].state(), v1::JOB_SUCCEEDED) << Summary(done[id]);
  std::cerr << polls << " ListJobs polls, at most " << max_running
            << " running; " << sampler.scans() << " scans, at most "
            << sampler.MaxAtOnce() << " workers at once; replicas used: "
            << absl::StrJoin(sampler.Replicas(), ",") << std::endl;
  EXPECT_GT(polls, 20);
  EXPECT_EQ(max_running, 1) << max_running_detail;
  EXPECT_EQ(sampler.MaxAtOnce(), 1) << sampler.MaxAtOnceDetail();
  EXPECT_THAT(sampler.Violations(), ::testing::IsEmpty());
  // (Where they ran is up to the replicas: the one whose job ends frees the
  // quota and often claims the next itself; the others, with free slots,
  // were refused by the quota while it ran.)
}

// PostgreSQL stops for a few seconds while a job runs: both replicas report
// NOT_SERVING during the outage and SERVING again soon after; every job
// accepted before it succeeds, with its events dense 1..N.
TEST_F(ReplicasTest, PostgresRestartMidRun) {
  std::string uri;
  ASSERT_NO_FATAL_FAILURE(OwnPostgres(&uri));
  std::vector<std::unique_ptr<client::Client>> clients;
  std::vector<client::Client*> raw;
  std::vector<ServerProcess*> servers;
  for (const char* name : {"ra", "rb"}) {
    ServerProcess* s = StartReplica(name, uri);
    ASSERT_NE(s, nullptr);
    servers.push_back(s);
    clients.push_back(s->NewClient());
    raw.push_back(clients.back().get());
  }
  for (ServerProcess* s : servers) EXPECT_EQ(Health(s->address()), "SERVING");
  WorkerSampler sampler(shared_);
  const v1::Model model = testing::UploadReady(raw[0], "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.DebugString();
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<v1::Job> job =
        raw[i % 2]->SubmitJob(QuickJob(model.id(), 300));
    ASSERT_TRUE(job.ok()) << "job " << i << ": " << job.status();
    ids.push_back(job->id());
  }
  // Wait until a job is well into its run.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  bool running = false;
  while (!running && absl::Now() < deadline) {
    for (const std::string& id : ids) {
      absl::StatusOr<v1::Job> j = raw[0]->GetJob(id);
      running = running || (j.ok() && j->stage() == v1::STAGE_DISTILL &&
                            j->state() == v1::JOB_RUNNING);
    }
    if (!running) absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(running) << "no job started";

  // The outage: at least 3 s, and until both replicas said NOT_SERVING (at
  // most 15 s).
  ASSERT_NO_FATAL_FAILURE(PgControl("pause"));
  const absl::Time down = absl::Now();
  // Each replica's health changes, "STATUS@ms since the stop -> ...".
  std::vector<std::string> seen(servers.size()), last(servers.size());
  std::vector<absl::Duration> not_serving_after(servers.size(),
                                                absl::InfiniteDuration());
  auto all_not_serving = [&] {
    for (const absl::Duration& d : not_serving_after)
      if (d == absl::InfiniteDuration()) return false;
    return true;
  };
  while (absl::Now() - down < absl::Seconds(3) ||
         (!all_not_serving() && absl::Now() - down < absl::Seconds(15))) {
    for (size_t i = 0; i < servers.size(); ++i) {
      const std::string h = Health(servers[i]->address());
      if (h != last[i])
        seen[i] +=
            absl::StrCat(seen[i].empty() ? "" : " -> ", h, "@",
                         absl::ToInt64Milliseconds(absl::Now() - down), "ms");
      last[i] = h;
      if (h == "NOT_SERVING" &&
          not_serving_after[i] == absl::InfiniteDuration())
        not_serving_after[i] = absl::Now() - down;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  // A submit during the outage is refused as unavailable, or accepted and
  // then not lost.
  std::string outage_job;
  {
    client::ClientOptions quick;
    quick.rpc_timeout = absl::Seconds(5);
    auto c = servers[1]->NewClient(quick);
    absl::StatusOr<v1::Job> j = c->SubmitJob(QuickJob(model.id(), 20));
    if (j.ok()) {
      outage_job = j->id();
      std::cerr << "a submit during the outage was accepted: " << j->id()
                << std::endl;
    } else {
      std::cerr << "a submit during the outage: " << j.status() << std::endl;
      EXPECT_TRUE(j.status().code() == absl::StatusCode::kUnavailable ||
                  j.status().code() == absl::StatusCode::kDeadlineExceeded)
          << j.status();
    }
  }
  const absl::Duration outage = absl::Now() - down;
  ASSERT_NO_FATAL_FAILURE(PgControl("resume"));
  const absl::Time up = absl::Now();
  std::vector<absl::Duration> serving_after(servers.size(),
                                            absl::InfiniteDuration());
  while (absl::Now() - up < absl::Seconds(20)) {
    bool all = true;
    for (size_t i = 0; i < servers.size(); ++i) {
      if (serving_after[i] != absl::InfiniteDuration()) continue;
      const std::string h = Health(servers[i]->address());
      if (h != last[i])
        seen[i] +=
            absl::StrCat(" -> ", h, "@",
                         absl::ToInt64Milliseconds(absl::Now() - down), "ms");
      last[i] = h;
      if (h == "SERVING") serving_after[i] = absl::Now() - up;
      all = all && h == "SERVING";
    }
    if (all) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  for (size_t i = 0; i < servers.size(); ++i) {
    std::cerr << "replica " << i << " health (since the stop, outage " << outage
              << "): " << seen[i] << std::endl;
    EXPECT_NE(not_serving_after[i], absl::InfiniteDuration())
        << "replica " << i << " never said NOT_SERVING: " << seen[i];
    EXPECT_LE(serving_after[i], absl::Seconds(10))
        << "replica " << i
        << " not SERVING 10 s after PostgreSQL came back: " << seen[i];
  }

  if (!outage_job.empty()) ids.push_back(outage_job);
  std::map<std::string, v1::Job> done =
      WaitAllFinished(raw, ids, absl::Minutes(2));
  sampler.Sync();
  sampler.Stop();
  for (const std::string& id : ids) {
    EXPECT_EQ(done[id].state(), v1::JOB_SUCCEEDED) << Summary(done[id]);
    std::cerr << Summary(done[id]) << std::endl;
    if (done[id].state() == v1::JOB_SUCCEEDED)
      DenseEvents(raw[1], id, v1::JOB_SUCCEEDED);
  }
  EXPECT_THAT(sampler.Violations(), ::testing::IsEmpty());
}

}  // namespace
}  // namespace zeroq
