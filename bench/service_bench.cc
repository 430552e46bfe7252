// service_bench: the service's own costs, against a real zeroq-server on
// 127.0.0.1. Prints:
//  - upload throughput (client streaming, server-side SHA-256, fsync and
//    rename), beside a local baseline: hashing the same bytes and writing
//    them with fsync in the same folder;
//  - GetJob latency p50/p99 with no watchers and with N WatchJob streams
//    open, the server's thread count and resident memory then and idle;
//  - submit -> RUNNING and submit -> first worker event latency.
//
//   service_bench [--watchers=1000] [--upload_mb=256] [--runs=5]
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "bench/bench_util.h"
#include "grpcpp/grpcpp.h"
#include "server/sha256.h"
#include "tests/server_process.h"

ABSL_FLAG(int, watchers, 1000, "WatchJob streams held open");
ABSL_FLAG(int, upload_mb, 256, "size of each upload, MiB");
ABSL_FLAG(int, runs, 5, "repetitions of each measurement");
ABSL_FLAG(int, get_calls, 2000, "GetJob calls per latency measurement");

namespace {

namespace v1 = ::zeroq::v1;
using zeroq::bench::Median;

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// /proc/PID/status field, e.g. "Threads" or "VmRSS" (kB).
long ProcStatus(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0)
      return std::stol(line.substr(key.size() + 1));
  }
  return -1;
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * v.size()));
  return v[i];
}

// One watch stream, on the callback API: no thread per stream.
class Watcher : public grpc::ClientReadReactor<v1::JobEvent> {
 public:
  Watcher(v1::ZeroQ::Stub* stub, const std::string& job, std::atomic<int>* open,
          std::atomic<int>* done)
      : open_(open), done_(done) {
    req_.set_job_id(job);
    stub->async()->WatchJob(&ctx_, &req_, this);
    StartRead(&event_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (!counted_) {
      counted_ = true;
      open_->fetch_add(1);
    }
    StartRead(&event_);
  }
  void OnDone(const grpc::Status&) override { done_->fetch_add(1); }
  void Cancel() { ctx_.TryCancel(); }

 private:
  grpc::ClientContext ctx_;
  v1::WatchJobRequest req_;
  v1::JobEvent event_;
  bool counted_ = false;
  std::atomic<int>* open_;
  std::atomic<int>* done_;
};

std::vector<double> GetJobLatencies(zeroq::client::Client* client,
                                    const std::string& job, int calls) {
  std::vector<double> ms;
  for (int i = 0; i < calls; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<v1::Job> j = client->GetJob(job);
    ms.push_back(Seconds(std::chrono::steady_clock::now() - t0) * 1e3);
    if (!j.ok())
      std::fprintf(stderr, "GetJob: %s\n", j.status().ToString().c_str());
  }
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int runs = absl::GetFlag(FLAGS_runs);
  zeroq::testing::ServerProcess server(
      {"--devices=cpu:1", "--heartbeat_interval=5s"});
  if (!server.Start()) {
    std::fprintf(stderr, "server did not start:\n%s\n", server.Log().c_str());
    return 1;
  }
  auto client = server.NewClient();
  std::printf(
      "service_bench: server pid %d, 2 cores, jobs with 1 intra-op thread\n",
      server.pid());
  long idle_threads = ProcStatus(server.pid(), "Threads");
  long idle_rss = ProcStatus(server.pid(), "VmRSS");

  // ---- upload throughput
  const size_t bytes = static_cast<size_t>(absl::GetFlag(FLAGS_upload_mb))
                       << 20;
  std::string data(bytes, '\0');
  std::mt19937_64 rng(1);
  for (size_t i = 0; i + 8 <= bytes; i += 8) {
    uint64_t v = rng();
    std::memcpy(&data[i], &v, 8);
  }
  std::vector<double> upload_mbs, baseline_mbs, ratios;
  for (int r = 0; r < runs; ++r) {
    data[r] ^= 1;  // distinct bytes each run: no deduplication
    v1::ModelMetadata meta;
    meta.set_name("bench");
    meta.add_input_shape(1);
    meta.set_size_bytes(static_cast<int64_t>(bytes));
    auto t0 = std::chrono::steady_clock::now();
    meta.set_sha256(zeroq::server::Sha256Hex(data));  // the client hashes too
    absl::StatusOr<v1::Model> m = client->UploadBytes(meta, data);
    double ours = Seconds(std::chrono::steady_clock::now() - t0);
    if (!m.ok()) {
      std::fprintf(stderr, "upload: %s\n", m.status().ToString().c_str());
      return 1;
    }
    // Baseline: hash once and write once with fsync, locally.
    t0 = std::chrono::steady_clock::now();
    std::string sha = zeroq::server::Sha256Hex(data);
    std::string path = server.dir() + "/baseline.bin";
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (size_t off = 0; off < bytes; off += 1 << 20) {
      if (write(fd, data.data() + off, std::min<size_t>(1 << 20, bytes - off)) <
          0)
        return 1;
    }
    fsync(fd);
    close(fd);
    double base = Seconds(std::chrono::steady_clock::now() - t0);
    unlink(path.c_str());
    upload_mbs.push_back(bytes / 1e6 / ours);
    baseline_mbs.push_back(bytes / 1e6 / base);
    ratios.push_back(base / ours);
    (void)client->DeleteModel(
        m->id());  // may still be inspecting: fine either way
  }
  std::printf(
      "upload %d MiB x %d: %.0f MB/s median (client hash + stream + server "
      "hash, fsync, "
      "rename); local hash+write+fsync baseline %.0f MB/s; ratio ours/baseline "
      "%.2f\n",
      absl::GetFlag(FLAGS_upload_mb), runs, Median(upload_mbs),
      Median(baseline_mbs), Median(ratios));
  data.clear();
  data.shrink_to_fit();

  // ---- a model and a long-running job to watch
  absl::StatusOr<v1::Model> model = client->UploadModel(
      std::string(ZEROQ_TEST_MODELS_DIR) + "/fashion_cnn.pt", "fashion",
      {1, 28, 28});
  if (!model.ok() ||
      !client->WaitForModel(model->id(), absl::Minutes(2)).ok()) {
    std::fprintf(stderr, "model upload failed\n");
    return 1;
  }

  // ---- submit -> RUNNING and submit -> first worker event
  std::vector<double> to_running, to_worker, to_cancelled;
  for (int r = 0; r < runs; ++r) {
    v1::SubmitJobRequest req;
    req.set_model_id(model->id());
    req.mutable_config()->mutable_distillation()->set_iterations(100000);
    req.mutable_config()->set_threads(1);
    auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<v1::Job> job = client->SubmitJob(req);
    if (!job.ok()) return 1;
    bool running = false, from_worker = false;
    absl::StatusOr<v1::Job> seen =
        client->WatchJob(job->id(), 0, [&](const v1::JobEvent& e) {
          double s = Seconds(std::chrono::steady_clock::now() - t0);
          if (e.type() == v1::EVENT_STATE && e.state() == v1::JOB_RUNNING &&
              !running) {
            running = true;
            to_running.push_back(s * 1e3);
          }
          if (running && !from_worker && e.type() != v1::EVENT_STATE &&
              e.type() != v1::EVENT_HEARTBEAT) {
            from_worker = true;
            to_worker.push_back(s * 1e3);
          }
          // Watch on until distillation is under way, then cancel.
          return !(e.type() == v1::EVENT_PROGRESS &&
                   e.stage() == v1::STAGE_DISTILL && e.step() > 0);
        });
    // Cancel -> CANCELLED: the worker has exited and the slot is free.
    auto c0 = std::chrono::steady_clock::now();
    absl::StatusOr<v1::Job> cancel = client->CancelJob(job->id());
    absl::StatusOr<v1::Job> ended = client->WatchJob(job->id(), 0, nullptr);
    if (!cancel.ok() || !ended.ok() || ended->state() != v1::JOB_CANCELLED) {
      std::fprintf(stderr, "service_bench: cancel did not end the job: %s %s\n",
                   cancel.status().ToString().c_str(),
                   ended.ok() ? v1::JobState_Name(ended->state()).c_str()
                              : ended.status().ToString().c_str());
      return 1;
    }
    to_cancelled.push_back(Seconds(std::chrono::steady_clock::now() - c0) *
                           1e3);
  }
  std::printf(
      "submit -> RUNNING: %.2f ms median; submit -> first event from the "
      "worker process "
      "(exec, LibTorch load, model load): %.0f ms median (%d runs)\n",
      Median(to_running), Median(to_worker), runs);
  std::printf(
      "CancelJob in distillation -> CANCELLED (worker exited, slot free): "
      "%.0f ms median, %.0f ms max (goal 2000 ms)\n",
      Median(to_cancelled),
      *std::max_element(to_cancelled.begin(), to_cancelled.end()));

  // ---- GetJob latency without and with watchers
  v1::SubmitJobRequest req;
  req.set_model_id(model->id());
  req.mutable_config()->mutable_distillation()->set_iterations(100000);
  req.mutable_config()->set_threads(1);
  absl::StatusOr<v1::Job> job = client->SubmitJob(req);
  if (!job.ok()) return 1;
  const int calls = absl::GetFlag(FLAGS_get_calls);
  std::vector<double> base = GetJobLatencies(client.get(), job->id(), calls);

  const int n = absl::GetFlag(FLAGS_watchers);
  std::atomic<int> open{0}, done{0};
  grpc::ChannelArguments args;
  args.SetInt("grpc.use_local_subchannel_pool", 1);
  auto channel = grpc::CreateCustomChannel(
      server.address(), grpc::InsecureChannelCredentials(), args);
  auto stub = v1::ZeroQ::NewStub(channel);
  std::vector<std::unique_ptr<Watcher>> watchers;
  for (int i = 0; i < n; ++i)
    watchers.push_back(
        std::make_unique<Watcher>(stub.get(), job->id(), &open, &done));
  absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (open.load() < n && absl::Now() < deadline)
    absl::SleepFor(absl::Milliseconds(10));
  std::vector<double> with = GetJobLatencies(client.get(), job->id(), calls);
  long threads = ProcStatus(server.pid(), "Threads");
  long rss = ProcStatus(server.pid(), "VmRSS");
  std::printf(
      "GetJob latency, %d calls, job running: p50 %.3f ms, p99 %.3f ms with no "
      "watchers; "
      "p50 %.3f ms, p99 %.3f ms with %d of %d WatchJob streams open (p50 ratio "
      "%.2f)\n",
      calls, Percentile(base, 50), Percentile(base, 99), Percentile(with, 50),
      Percentile(with, 99), open.load(), n,
      Percentile(with, 50) / Percentile(base, 50));
  std::printf("server threads: %ld idle, %ld with the watchers (goal < 64)\n",
              idle_threads, threads);
  std::printf(
      "server resident memory: %.1f MiB idle, %.1f MiB with the watchers (%.1f "
      "KiB per stream)\n",
      idle_rss / 1024.0, rss / 1024.0,
      static_cast<double>(rss - idle_rss) / std::max(1, n));
  (void)client->CancelJob(job->id());
  deadline = absl::Now() + absl::Seconds(60);
  while (done.load() < n && absl::Now() < deadline)
    absl::SleepFor(absl::Milliseconds(10));
  std::printf("all %d watch streams ended after the cancel: %s\n", n,
              done.load() == n ? "yes" : "no");
  for (auto& w : watchers) w->Cancel();
  while (done.load() < n) absl::SleepFor(absl::Milliseconds(10));
  server.Stop();
  return 0;
}
