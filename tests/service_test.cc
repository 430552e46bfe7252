// End-to-end tests of the service: a real zeroq-server process, real
// zeroq-worker processes and the C++ client, on 127.0.0.1.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <chrono>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/sha256.h"
#include "tests/e2e_util.h"
#include "tests/server_process.h"

namespace zeroq {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::zeroq::v1;
using testing::Finished;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::ModelPath;
using testing::QuickJob;
using testing::ServerProcess;
using testing::WatchAll;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
}

class ServiceTest : public ::testing::Test {
 protected:
  void StartServer(std::vector<std::string> flags = {}) {
    server_ = std::make_unique<ServerProcess>(std::move(flags));
    ASSERT_TRUE(server_->Start()) << server_->Log();
    client_ = server_->NewClient();
  }

  v1::Model UploadReady(const std::string& file,
                        std::vector<int64_t> shape = {1, 28, 28}) {
    return testing::UploadReady(client_.get(), file, std::move(shape));
  }

  v1::Job WaitFor(const std::string& id,
                  const std::function<bool(const v1::Job&)>& done,
                  absl::Duration timeout = absl::Minutes(3)) {
    return testing::WaitFor(client_.get(), id, done, timeout);
  }

  void TearDown() override {
    if (HasFailure() && server_)
      std::cerr << "---- server log\n" << server_->Log() << std::endl;
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::Client> client_;
};

TEST_F(ServiceTest, UploadInspectSubmitWatchDownloadMatchesOfflineRun) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.state_reason();
  EXPECT_GT(model.summary().bn_layers_size(), 0);
  EXPECT_GT(model.summary().layers_size(), 0);
  EXPECT_THAT(std::vector<int64_t>(model.summary().output_shape().begin(),
                                   model.summary().output_shape().end()),
              ::testing::ElementsAre(1, 10));
  EXPECT_EQ(model.sha256(), *server::Sha256File(ModelPath("fashion_cnn.pt")));

  absl::StatusOr<v1::Job> job = client_->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_QUEUED);
  std::vector<v1::JobEvent> events;
  absl::StatusOr<v1::Job> done = WatchAll(client_.get(), job->id(), &events);
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), v1::JOB_SUCCEEDED) << done->error().message();
  // Every event, in order, once; the last is the terminal state.
  ASSERT_FALSE(events.empty());
  for (size_t i = 0; i < events.size(); ++i)
    EXPECT_EQ(events[i].seq(), static_cast<int64_t>(i + 1));
  EXPECT_EQ(events.back().type(), v1::EVENT_STATE);
  EXPECT_EQ(events.back().state(), v1::JOB_SUCCEEDED);
  EXPECT_EQ(done->last_seq(), events.back().seq());
  bool saw_distill =
      std::any_of(events.begin(), events.end(), [](const v1::JobEvent& e) {
        return e.type() == v1::EVENT_PROGRESS &&
               e.stage() == v1::STAGE_DISTILL && e.loss() > 0;
      });
  EXPECT_TRUE(saw_distill);
  EXPECT_EQ(done->attempts(), 1);
  EXPECT_GT(done->result().layers_size(), 0);
  EXPECT_GT(done->result().top1_agreement(), 0.5);

  // Download every artifact; each matches its announced hash.
  fs::path out = fs::path(server_->dir()) / "download";
  fs::create_directories(out);
  std::set<std::string> names;
  for (const v1::Artifact& a : done->result().artifacts()) {
    absl::StatusOr<v1::Artifact> got = client_->DownloadArtifact(
        job->id(), a.name(), (out / a.name()).string());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->sha256(), a.sha256());
    EXPECT_EQ(*server::Sha256File((out / a.name()).string()), a.sha256());
    names.insert(a.name());
  }
  EXPECT_THAT(names, ::testing::IsSupersetOf(
                         {"model.zeroq.pt", "recipe.json", "report.json"}));

  // The offline command with the same settings computes the same recipe.
  fs::path offline = fs::path(server_->dir()) / "offline";
  std::string cmd = absl::StrCat(
      ZEROQ_QUANTIZE, " --model=", ModelPath("fashion_cnn.pt"),
      " --input_shape=1,28,28 --out=", offline.string(),
      " --weight_bits=4 --batch_size=8 --iterations=20 --seed=7 --threads=1",
      " --reconstruct_iterations=5",
      " --progress=none > ", offline.string(), ".log 2>&1");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << ReadFile(offline.string() + ".log");
  EXPECT_EQ(ReadFile((out / "recipe.json").string()),
            ReadFile((offline / "recipe.json").string()));
  // And the quantized model loads in Python and gives the same outputs.
  std::string py =
      absl::StrCat(ZEROQ_PYTHON,
                   " -c \"import torch,sys; a=torch.jit.load(sys.argv[1]); "
                   "b=torch.jit.load(sys.argv[2]);",
                   " x=torch.randn(4,1,28,28); assert torch.equal(a(x), b(x)), "
                   "'outputs differ'\" ",
                   (out / "model.zeroq.pt").string(), " ",
                   (offline / "model.zeroq.pt").string());
  EXPECT_EQ(std::system(py.c_str()), 0);
}

TEST_F(ServiceTest, SecondUploadOfTheSameBytesDeduplicates) {
  StartServer();
  absl::StatusOr<v1::Model> a =
      client_->UploadModel(ModelPath("fashion_cnn.pt"), "a", {1, 28, 28});
  absl::StatusOr<v1::Model> b =
      client_->UploadModel(ModelPath("fashion_cnn.pt"), "b", {1, 28, 28});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->id(), b->id());
  EXPECT_FALSE(a->deduplicated());
  EXPECT_TRUE(b->deduplicated());
  absl::StatusOr<v1::ListModelsResponse> list = client_->ListModels();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->models_size(), 1);
  // Stored once.
  int blobs = 0;
  for (const auto& e :
       fs::recursive_directory_iterator(server_->data_dir() + "/blobs")) {
    blobs += e.is_regular_file();
  }
  EXPECT_EQ(blobs, 1);
}

TEST_F(ServiceTest, SizeAndHashMismatchesAreDataLossAndLeaveNothing) {
  StartServer();
  std::string bytes = ReadFile(ModelPath("fashion_cnn.pt"));
  v1::ModelMetadata m;
  m.set_name("x");
  m.add_input_shape(1);
  m.add_input_shape(28);
  m.add_input_shape(28);
  m.set_sha256(server::Sha256Hex(bytes));
  m.set_size_bytes(static_cast<int64_t>(bytes.size()) +
                   10);  // more announced than sent
  absl::Status s = client_->UploadBytes(m, bytes).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  m.set_size_bytes(static_cast<int64_t>(bytes.size()) -
                   10);  // more sent than announced
  s = client_->UploadBytes(m, bytes).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  m.set_size_bytes(static_cast<int64_t>(bytes.size()));
  m.set_sha256(server::Sha256Hex("something else"));
  s = client_->UploadBytes(m, bytes).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("SHA-256"));
  // No model, no blob, no temp file.
  EXPECT_EQ(client_->ListModels()->models_size(), 0);
  int files = 0;
  for (const auto& e :
       fs::recursive_directory_iterator(server_->data_dir() + "/blobs")) {
    files += e.is_regular_file();
  }
  EXPECT_EQ(files, 0);
  // A stream without metadata first.
  v1::ModelMetadata empty;
  s = client_->UploadBytes(empty, bytes).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST_F(ServiceTest, RandomBytesBecomeAnInvalidModel) {
  StartServer();
  std::string junk(5000, '\0');
  for (size_t i = 0; i < junk.size(); ++i)
    junk[i] = static_cast<char>((i * 7919 + 13) % 251);
  v1::ModelMetadata m;
  m.set_name("junk");
  m.add_input_shape(1);
  m.add_input_shape(28);
  m.add_input_shape(28);
  m.set_sha256(server::Sha256Hex(junk));
  m.set_size_bytes(static_cast<int64_t>(junk.size()));
  absl::StatusOr<v1::Model> model = client_->UploadBytes(m, junk);
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<v1::Model> done =
      client_->WaitForModel(model->id(), absl::Minutes(1));
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state(), v1::MODEL_INVALID);
  EXPECT_FALSE(done->state_reason().empty());
  absl::Status s = client_->SubmitJob(QuickJob(model->id())).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("INVALID"));
}

TEST_F(ServiceTest, ModelWithoutBatchNormIsRefused) {
  StartServer();
  v1::Model model = UploadReady("no_batchnorm.pt", {3, 8, 8});
  // Inspection succeeds: it is a valid model, only not one ZeroQ can serve.
  ASSERT_EQ(model.state(), v1::MODEL_READY) << model.state_reason();
  EXPECT_EQ(model.summary().bn_layers_size(), 0);
  EXPECT_GT(model.summary().layers_size(), 0);
  for (v1::CalibrationSource source :
       {v1::CALIBRATION_DISTILLED, v1::CALIBRATION_GAUSSIAN}) {
    v1::SubmitJobRequest r = QuickJob(model.id());
    r.mutable_config()->set_calibration(source);
    absl::Status s = client_->SubmitJob(r).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("BatchNorm"));
  }
  EXPECT_EQ(client_->ListJobs()->jobs_size(), 0);  // nothing was accepted
}

TEST_F(ServiceTest, BadRequestsGetTheRightCodes) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  struct Case {
    std::function<void(v1::SubmitJobRequest*)> edit;
    absl::StatusCode code;
    std::string text;
  };
  std::vector<Case> cases = {
      {[](auto* r) { r->set_model_id("m-nope"); }, absl::StatusCode::kNotFound,
       "m-nope"},
      {[](auto* r) { r->mutable_config()->set_weight_bits(9); },
       absl::StatusCode::kInvalidArgument, "config.weight_bits"},
      {[](auto* r) { r->mutable_config()->set_budget("MP1"); },
       absl::StatusCode::kInvalidArgument, "config.budget"},
      {[](auto* r) {
         (*r->mutable_config()->mutable_layer_bits())["nope"] = 4;
       },
       absl::StatusCode::kInvalidArgument, "config.layer_bits"},
      {[](auto* r) {
         r->mutable_config()->set_budget("MP4");
         r->mutable_config()->set_sensitivity_from_job("j-nope");
       },
       absl::StatusCode::kNotFound, "sensitivity_from_job"},
      {[](auto* r) { r->set_device(v1::DEVICE_CUDA); },
       absl::StatusCode::kFailedPrecondition, "CUDA"},
  };
  for (const Case& c : cases) {
    v1::SubmitJobRequest r = QuickJob(model.id());
    c.edit(&r);
    absl::Status s = client_->SubmitJob(r).status();
    EXPECT_EQ(s.code(), c.code) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.text));
  }
  EXPECT_EQ(client_->GetJob("j-nope").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->GetModel("m-nope").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->CancelJob("j-nope").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->WatchJob("j-nope", 0, nullptr).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(
      client_->DownloadArtifact("j-nope", "recipe.json", server_->dir() + "/x")
          .status()
          .code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(
      client_->ListJobs(v1::JOB_STATE_UNSPECIFIED, "", -1).status().code(),
      absl::StatusCode::kInvalidArgument);
}

TEST_F(ServiceTest, SubmitIsIdempotentOnRequestId) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  v1::SubmitJobRequest r = QuickJob(model.id());
  r.set_request_id("retry-me");
  absl::StatusOr<v1::Job> a = client_->SubmitJob(r);
  absl::StatusOr<v1::Job> b = client_->SubmitJob(r);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->id(), b->id());
  EXPECT_EQ(client_->ListJobs()->jobs_size(), 1);
  // The model is in use: it cannot be deleted until the job is done.
  EXPECT_EQ(client_->DeleteModel(model.id()).code(),
            absl::StatusCode::kFailedPrecondition);
  WaitFor(a->id(), Finished);
  EXPECT_TRUE(client_->DeleteModel(model.id()).ok());
  EXPECT_EQ(client_->GetModel(model.id()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ServiceTest, TwoJobsRunAtOnceOnTwoSlots) {
  StartServer({"--devices=cpu:2"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> a = client_->SubmitJob(QuickJob(model.id(), 400));
  absl::StatusOr<v1::Job> b = client_->SubmitJob(QuickJob(model.id(), 400));
  ASSERT_TRUE(a.ok() && b.ok());
  // Both are RUNNING at the same moment, on different slots.
  bool together = false;
  std::string slot_a, slot_b;
  for (int i = 0; i < 3000 && !together; ++i) {
    v1::Job ja = *client_->GetJob(a->id()), jb = *client_->GetJob(b->id());
    if (Finished(ja) || Finished(jb)) break;
    together = ja.state() == v1::JOB_RUNNING && jb.state() == v1::JOB_RUNNING;
    slot_a = ja.device();
    slot_b = jb.device();
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(together);
  EXPECT_NE(slot_a, slot_b);
  EXPECT_EQ(WaitFor(a->id(), Finished).state(), v1::JOB_SUCCEEDED);
  EXPECT_EQ(WaitFor(b->id(), Finished).state(), v1::JOB_SUCCEEDED);
}

TEST_F(ServiceTest, CancelInTheMiddleOfDistillationFreesTheSlot) {
  StartServer({"--devices=cpu:1"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job =
      client_->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(job.ok());
  absl::StatusOr<v1::Job> queued =
      client_->SubmitJob(QuickJob(model.id()));  // waits for the slot
  ASSERT_TRUE(queued.ok());
  // Cancel once distillation is under way.
  absl::StatusOr<v1::Job> seen =
      client_->WatchJob(job->id(), 0, [](const v1::JobEvent& e) {
        return !(e.type() == v1::EVENT_PROGRESS &&
                 e.stage() == v1::STAGE_DISTILL && e.step() > 0);
      });
  ASSERT_TRUE(seen.ok());
  ASSERT_EQ(seen->state(), v1::JOB_RUNNING);
  const absl::Time asked = absl::Now();
  absl::StatusOr<v1::Job> taken = client_->CancelJob(job->id());
  ASSERT_TRUE(taken.ok()) << taken.status();
  // The answer says the cancel was taken (the job still RUNNING), and so
  // does GetJob until it ends.
  EXPECT_EQ(taken->state(), v1::JOB_RUNNING);
  EXPECT_TRUE(taken->cancel_requested());
  absl::StatusOr<v1::Job> looked = client_->GetJob(job->id());
  ASSERT_TRUE(looked.ok()) << looked.status();
  EXPECT_TRUE(looked->cancel_requested() || looked->state() == v1::JOB_CANCELLED);
  v1::Job cancelled = WaitFor(job->id(), Finished, absl::Seconds(30));
  EXPECT_LT(absl::Now() - asked, absl::Seconds(2));
  EXPECT_EQ(cancelled.state(), v1::JOB_CANCELLED);
  EXPECT_TRUE(cancelled.cancel_requested());
  EXPECT_EQ(cancelled.error().code(),
            static_cast<int>(absl::StatusCode::kCancelled));
  // The freed slot runs the queued job.
  EXPECT_EQ(WaitFor(queued->id(), Finished).state(), v1::JOB_SUCCEEDED);
  // Cancelling a finished job changes nothing.
  EXPECT_EQ(client_->CancelJob(queued->id())->state(), v1::JOB_SUCCEEDED);
  // A queued job is cancelled at once.
  ASSERT_TRUE(client_->SubmitJob(QuickJob(model.id(), 100000)).ok());
  absl::StatusOr<v1::Job> waiting = client_->SubmitJob(QuickJob(model.id()));
  absl::StatusOr<v1::Job> c = client_->CancelJob(waiting->id());
  ASSERT_TRUE(c.ok());
  if (c->state() != v1::JOB_RUNNING) EXPECT_EQ(c->state(), v1::JOB_CANCELLED);
}

// Tenants read errors and events, never where the server keeps things: a
// job whose model file has gone from the blob store fails with LibTorch's
// "file path: ..." message, which names the data folder in the server log
// only.
TEST_F(ServiceTest, FailuresNeverShowServerPathsToTenants) {
  StartServer({"--devices=cpu:1"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> busy = client_->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(busy.ok()) << busy.status();
  WaitFor(busy->id(), [](const v1::Job& j) { return j.state() == v1::JOB_RUNNING; });
  absl::StatusOr<v1::Job> job = client_->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok()) << job.status();
  // The bytes vanish from under the server (a broken volume, say).
  std::error_code ec;
  std::filesystem::remove_all(server_->data_dir() + "/blobs", ec);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_TRUE(client_->CancelJob(busy->id()).ok());
  v1::Job failed = WaitFor(job->id(), Finished);
  ASSERT_EQ(failed.state(), v1::JOB_FAILED);
  std::vector<std::string> visible = {failed.error().message()};
  std::vector<v1::JobEvent> events;
  ASSERT_TRUE(client_->WatchJob(job->id(), 0, [&](const v1::JobEvent& e) {
                        visible.push_back(e.message());
                        if (e.has_error()) visible.push_back(e.error().message());
                        return true;
                      }).ok());
  const std::string data_dir = server_->data_dir();
  const std::string abs_data_dir =
      std::filesystem::weakly_canonical(std::filesystem::absolute(data_dir)).string();
  bool redacted = false;
  for (const std::string& text : visible) {
    EXPECT_THAT(text, Not(HasSubstr(data_dir)));
    EXPECT_THAT(text, Not(HasSubstr(abs_data_dir)));
    EXPECT_THAT(text, Not(HasSubstr("/blobs/")));
    redacted |= absl::StrContains(text, "<server file>");
  }
  EXPECT_TRUE(redacted) << failed.error().message();
  // The log has the whole story for the operator.
  EXPECT_THAT(server_->Log(), HasSubstr(data_dir + "/blobs/"));
}

// A worker killed by a signal (what the kernel's OOM killer does) is the
// machine's doing more often than the job's: retried with backoff, up to
// --max_attempts; every attempt is kept on the job.
TEST_F(ServiceTest, KilledWorkerIsRetriedThenFailsAndTheServerCarriesOn) {
  StartServer({"--max_attempts=2"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job =
      client_->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(job.ok());
  for (int attempt = 1; attempt <= 2; ++attempt) {
    WaitFor(job->id(), [attempt](const v1::Job& j) {
      return (j.attempts() == attempt && j.stage() == v1::STAGE_DISTILL) ||
             Finished(j);
    });
    pid_t worker = testing::FindWorkerPid(job->id());
    ASSERT_GT(worker, 0) << "attempt " << attempt;
    kill(worker, SIGKILL);
  }
  v1::Job failed = WaitFor(job->id(), Finished);
  EXPECT_EQ(failed.state(), v1::JOB_FAILED);
  EXPECT_EQ(failed.error().code(), static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_THAT(failed.error().message(), HasSubstr("crashed 2 times"));
  EXPECT_THAT(failed.error().message(), HasSubstr("signal 9"));
  EXPECT_EQ(failed.worker_crashes(), 2);
  EXPECT_EQ(failed.attempts(), 2);
  ASSERT_EQ(failed.attempt_history_size(), 2);
  for (const v1::JobAttempt& a : failed.attempt_history()) {
    EXPECT_EQ(a.outcome(), "crashed");
    EXPECT_THAT(a.reason(), HasSubstr("signal 9"));
    EXPECT_FALSE(a.device().empty());
    EXPECT_GT(a.end_time().seconds(), 0);
  }
  // The retry waited its backoff (1 s) after the first crash.
  auto seconds = [](const google::protobuf::Timestamp& t) {
    return t.seconds() + t.nanos() / 1e9;
  };
  EXPECT_GE(seconds(failed.attempt_history(1).start_time()) -
                seconds(failed.attempt_history(0).end_time()),
            0.9);
  // The server is fine and runs the next job; a crash that happens once
  // costs a job nothing but time.
  absl::StatusOr<v1::Job> next = client_->SubmitJob(QuickJob(model.id(), 300));
  ASSERT_TRUE(next.ok());
  WaitFor(next->id(), [](const v1::Job& j) {
    return j.stage() == v1::STAGE_DISTILL || Finished(j);
  });
  pid_t worker = testing::FindWorkerPid(next->id());
  ASSERT_GT(worker, 0);
  kill(worker, SIGKILL);
  v1::Job done = WaitFor(next->id(), Finished);
  EXPECT_EQ(done.state(), v1::JOB_SUCCEEDED) << done.error().message();
  EXPECT_EQ(done.worker_crashes(), 1);
  ASSERT_EQ(done.attempt_history_size(), 2);
  EXPECT_EQ(done.attempt_history(0).outcome(), "crashed");
  EXPECT_EQ(done.attempt_history(1).outcome(), "succeeded");
}

// A failure the worker reports (the model does not load, the core refuses
// the config) is final: no retry.
TEST_F(ServiceTest, DeterministicFailureIsNotRetried) {
  StartServer({"--max_attempts=3"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  std::error_code ec;
  fs::remove_all(server_->data_dir() + "/blobs", ec);  // the model won't load
  absl::StatusOr<v1::Job> job = client_->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok()) << job.status();
  v1::Job failed = WaitFor(job->id(), Finished);
  EXPECT_EQ(failed.state(), v1::JOB_FAILED);
  EXPECT_EQ(failed.attempts(), 1);
  EXPECT_EQ(failed.worker_crashes(), 0);
  ASSERT_EQ(failed.attempt_history_size(), 1);
  EXPECT_EQ(failed.attempt_history(0).outcome(), "failed");
  EXPECT_FALSE(failed.attempt_history(0).reason().empty());
}

TEST_F(ServiceTest, TimeLimitStopsAJob) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  v1::SubmitJobRequest r = QuickJob(model.id(), 100000);
  r.set_time_limit_seconds(2);
  absl::StatusOr<v1::Job> job = client_->SubmitJob(r);
  ASSERT_TRUE(job.ok());
  v1::Job done = WaitFor(job->id(), Finished);
  EXPECT_EQ(done.state(), v1::JOB_FAILED);
  EXPECT_EQ(done.error().code(),
            static_cast<int>(absl::StatusCode::kDeadlineExceeded));
  EXPECT_THAT(done.error().message(), HasSubstr("time limit"));
}

TEST_F(ServiceTest, ServerKilledMidJobRequeuesItOnRestart) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job = client_->SubmitJob(QuickJob(model.id(), 300));
  ASSERT_TRUE(job.ok());
  WaitFor(job->id(), [](const v1::Job& j) {
    return (j.stage() == v1::STAGE_DISTILL && j.step() > 0) || Finished(j);
  });
  ASSERT_EQ(client_->GetJob(job->id())->state(), v1::JOB_RUNNING);
  pid_t worker = testing::FindWorkerPid(job->id());
  server_->Kill();
  // The worker dies with its server.
  for (int i = 0; i < 200 && worker > 0 && kill(worker, 0) == 0; ++i)
    absl::SleepFor(absl::Milliseconds(10));
  EXPECT_TRUE(worker <= 0 || kill(worker, 0) != 0)
      << "the orphaned worker is still running";

  ASSERT_TRUE(server_->Start()) << server_->Log();
  client_ = server_->NewClient();
  std::vector<v1::JobEvent> events;
  absl::StatusOr<v1::Job> done = WatchAll(client_.get(), job->id(), &events);
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_SUCCEEDED) << done->error().message();
  EXPECT_EQ(done->attempts(), 2);
  bool requeued =
      std::any_of(events.begin(), events.end(), [](const v1::JobEvent& e) {
        return absl::StrContains(e.message(),
                                 "re-queued after a server restart");
      });
  EXPECT_TRUE(requeued);
  for (size_t i = 0; i < events.size(); ++i)
    EXPECT_EQ(events[i].seq(), static_cast<int64_t>(i + 1));
  // Nothing partial is left in the job folders (a finished job's folder
  // goes a moment after its end is stored).
  auto leftovers = [&] {
    int n = 0;
    for (const auto& e : fs::directory_iterator(server_->jobs_dir()))
      n += 1 + 0 * e.is_directory();
    return n;
  };
  for (int i = 0; i < 100 && leftovers() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(leftovers(), 0);
}

// A cancel taken just before the server died is not lost: the restart ends
// the job CANCELLED instead of running it again.
TEST_F(ServiceTest, CancelTakenBeforeACrashHoldsAfterTheRestart) {
  StartServer({"--devices=cpu:1"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job =
      client_->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(job.ok()) << job.status();
  WaitFor(job->id(), [](const v1::Job& j) {
    return (j.stage() == v1::STAGE_DISTILL && j.step() > 0) || Finished(j);
  });
  // The worker is frozen, so it cannot act on the cancel before the crash.
  pid_t worker = testing::FindWorkerPid(job->id());
  ASSERT_GT(worker, 0);
  ASSERT_EQ(kill(worker, SIGSTOP), 0);
  absl::StatusOr<v1::Job> taken = client_->CancelJob(job->id());
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_EQ(taken->state(), v1::JOB_RUNNING);
  EXPECT_TRUE(taken->cancel_requested());
  server_->Kill();
  kill(worker, SIGKILL);  // its death signal is pending while it is stopped

  ASSERT_TRUE(server_->Start()) << server_->Log();
  client_ = server_->NewClient();
  std::vector<v1::JobEvent> events;
  absl::StatusOr<v1::Job> done = WatchAll(client_.get(), job->id(), &events);
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), v1::JOB_CANCELLED) << done->error().message();
  EXPECT_EQ(done->attempts(), 1);  // never started again
  ASSERT_FALSE(done->attempt_history().empty());
  EXPECT_EQ(done->attempt_history().rbegin()->outcome(), "cancelled");
  for (size_t i = 0; i < events.size(); ++i)
    EXPECT_EQ(events[i].seq(), static_cast<int64_t>(i + 1));
  // The slot is free: the next job runs.
  absl::StatusOr<v1::Job> next = client_->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(WaitFor(next->id(), Finished).state(), v1::JOB_SUCCEEDED);
}

TEST_F(ServiceTest, LateAndReconnectingWatchersMissNothing) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  v1::SubmitJobRequest r = QuickJob(model.id());
  r.mutable_config()->set_budget("MP4");
  absl::StatusOr<v1::Job> job = client_->SubmitJob(r);
  ASSERT_TRUE(job.ok());
  // One watcher from the start, one that leaves after 5 events and resumes.
  std::vector<int64_t> first, second;
  std::thread t([&] {
    auto c = server_->NewClient();
    absl::StatusOr<v1::Job> end = c->WatchJob(job->id(), 0, [&](const v1::JobEvent& e) {
      if (e.type() != v1::EVENT_HEARTBEAT) first.push_back(e.seq());
      return true;
    });
    EXPECT_TRUE(end.ok()) << end.status();
  });
  int64_t cursor = 0;
  ASSERT_TRUE(client_->WatchJob(job->id(), 0, [&](const v1::JobEvent& e) {
                        second.push_back(e.seq());
                        cursor = e.seq();
                        return second.size() < 5;
                      }).ok());
  ASSERT_TRUE(client_->WatchJob(job->id(), cursor, [&](const v1::JobEvent& e) {
                        if (e.type() != v1::EVENT_HEARTBEAT) second.push_back(e.seq());
                        return true;
                      }).ok());
  t.join();
  v1::Job done = *client_->GetJob(job->id());
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED) << done.error().message();
  ASSERT_EQ(static_cast<int64_t>(first.size()), done.last_seq());
  EXPECT_EQ(first, second);
  // A watcher after the end gets the whole stored history, sensitivity and
  // Pareto events included.
  std::vector<v1::JobEvent> late;
  ASSERT_TRUE(client_->WatchJob(job->id(), 0, [&](const v1::JobEvent& e) {
                        late.push_back(e);
                        return true;
                      }).ok());
  ASSERT_EQ(static_cast<int64_t>(late.size()), done.last_seq());
  int sensitivity = 0, pareto = 0;
  for (const auto& e : late) {
    sensitivity += e.type() == v1::EVENT_SENSITIVITY;
    pareto += e.type() == v1::EVENT_PARETO;
  }
  EXPECT_EQ(sensitivity, done.result().layers_size() * 5);  // widths {2, 3, 4, 6, 8}
  EXPECT_GT(pareto, 0);
  EXPECT_GT(done.result().frontier_size(), 0);
  // Resuming from the middle gets exactly the rest.
  std::vector<int64_t> rest;
  ASSERT_TRUE(client_->WatchJob(job->id(), done.last_seq() - 3,
                                [&](const v1::JobEvent& e) {
                                  rest.push_back(e.seq());
                                  return true;
                                }).ok());
  EXPECT_EQ(rest, (std::vector<int64_t>{done.last_seq() - 2,
                                        done.last_seq() - 1, done.last_seq()}));
}

TEST_F(ServiceTest, ReplanFromAFinishedJobSkipsTheSweep) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  v1::SubmitJobRequest r = QuickJob(model.id());
  r.mutable_config()->set_budget("MP4");
  absl::StatusOr<v1::Job> first = client_->SubmitJob(r);
  ASSERT_TRUE(first.ok());
  v1::Job a = WaitFor(first->id(), Finished);
  ASSERT_EQ(a.state(), v1::JOB_SUCCEEDED) << a.error().message();

  v1::SubmitJobRequest again = r;
  again.mutable_config()->set_budget("MP3");
  again.mutable_config()->set_sensitivity_from_job(a.id());
  absl::StatusOr<v1::Job> second = client_->SubmitJob(again);
  ASSERT_TRUE(second.ok()) << second.status();
  std::vector<v1::JobEvent> events;
  v1::Job b = *client_->WatchJob(second->id(), 0, [&](const v1::JobEvent& e) {
    events.push_back(e);
    return true;
  });
  ASSERT_EQ(b.state(), v1::JOB_SUCCEEDED) << b.error().message();
  // No distillation and no sweep: the table and the data are reused.
  for (const auto& e : events) {
    EXPECT_NE(e.type(), v1::EVENT_SENSITIVITY);
    EXPECT_FALSE(e.type() == v1::EVENT_PROGRESS &&
                 e.stage() == v1::STAGE_DISTILL);
  }
  ASSERT_EQ(a.result().layers_size(), b.result().layers_size());
  for (int i = 0; i < a.result().layers_size(); ++i) {
    EXPECT_EQ(std::vector<double>(a.result().layers(i).sensitivity().begin(),
                                  a.result().layers(i).sensitivity().end()),
              std::vector<double>(b.result().layers(i).sensitivity().begin(),
                                  b.result().layers(i).sensitivity().end()));
  }
  EXPECT_LT(b.result().weight_bytes(), a.result().weight_bytes());

  // Widths asked for are honoured within the stored table's (they were once
  // accepted and ignored: MP6 with [2,4] chose 8 bits)...
  v1::SubmitJobRequest narrow = again;
  narrow.mutable_config()->set_budget("MP6");
  narrow.mutable_config()->add_candidate_bits(2);
  narrow.mutable_config()->add_candidate_bits(4);
  absl::StatusOr<v1::Job> third = client_->SubmitJob(narrow);
  ASSERT_TRUE(third.ok()) << third.status();
  v1::Job c = WaitFor(third->id(), Finished);
  ASSERT_EQ(c.state(), v1::JOB_SUCCEEDED) << c.error().message();
  for (const v1::LayerResult& l : c.result().layers()) {
    EXPECT_TRUE(l.bits() == 2 || l.bits() == 4) << l.name() << " " << l.bits();
    EXPECT_THAT(std::vector<int>(l.candidate_bits().begin(), l.candidate_bits().end()),
                ::testing::ElementsAre(2, 4));
  }
  // ... and widths it does not have are refused at once, naming the field.
  v1::SubmitJobRequest other_widths = again;
  other_widths.mutable_config()->add_candidate_bits(3);
  other_widths.mutable_config()->add_candidate_bits(5);
  absl::Status refused = client_->SubmitJob(other_widths).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_THAT(std::string(refused.message()), HasSubstr("config.candidate_bits"));
  EXPECT_THAT(std::string(refused.message()), HasSubstr("2,3,4,6,8"));
  // Re-planning from a job of another model is refused.
  v1::Model other = UploadReady("fashion_cnn.pt", {1, 28, 28});
  EXPECT_EQ(other.id(), model.id());  // same bytes and shape: the same model
}

TEST_F(ServiceTest, DownloadResumesFromAnOffset) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job = client_->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(job.ok());
  v1::Job done = WaitFor(job->id(), Finished);
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED);
  std::string whole = (fs::path(server_->dir()) / "whole.pt").string();
  ASSERT_TRUE(
      client_->DownloadArtifact(job->id(), "model.zeroq.pt", whole).ok());
  std::string bytes = ReadFile(whole);
  // A partial file from an interrupted download is completed, not restarted.
  std::string resumed = (fs::path(server_->dir()) / "resumed.pt").string();
  std::ofstream(resumed + ".part", std::ios::binary)
      << bytes.substr(0, bytes.size() / 3);
  absl::StatusOr<v1::Artifact> got =
      client_->DownloadArtifact(job->id(), "model.zeroq.pt", resumed);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(ReadFile(resumed), bytes);
  // Raw: the first chunk of a resumed download starts at the offset and
  // still announces the whole size and hash.
  auto ctx = client_->NewContext(false);
  v1::DownloadArtifactRequest req;
  req.set_job_id(job->id());
  req.set_artifact("model.zeroq.pt");
  req.set_offset(100);
  auto reader = client_->stub()->DownloadArtifact(ctx.get(), req);
  v1::ArtifactChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  EXPECT_EQ(chunk.offset(), 100);
  EXPECT_EQ(chunk.size_bytes(), static_cast<int64_t>(bytes.size()));
  EXPECT_EQ(chunk.data(), bytes.substr(100, chunk.data().size()));
  while (reader->Read(&chunk)) {
  }
  EXPECT_TRUE(reader->Finish().ok());
  req.set_offset(static_cast<int64_t>(bytes.size()) + 1);
  auto ctx2 = client_->NewContext(false);
  auto bad = client_->stub()->DownloadArtifact(ctx2.get(), req);
  while (bad->Read(&chunk)) {
  }
  EXPECT_EQ(bad->Finish().error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_EQ(
      client_->DownloadArtifact(job->id(), "nope", whole + "2").status().code(),
      absl::StatusCode::kNotFound);
}

TEST_F(ServiceTest, ListJobsPagesAndFilters) {
  StartServer();
  v1::Model model = UploadReady("fashion_cnn.pt");
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    v1::SubmitJobRequest r = QuickJob(model.id(), 100000);
    ids.push_back(client_->SubmitJob(r)->id());
  }
  for (const auto& id : ids) ASSERT_TRUE(client_->CancelJob(id).ok()) << id;
  for (const auto& id : ids) WaitFor(id, Finished);
  std::set<std::string> seen;
  std::string token;
  int pages = 0;
  do {
    absl::StatusOr<v1::ListJobsResponse> page =
        client_->ListJobs(v1::JOB_CANCELLED, model.id(), 2, token);
    ASSERT_TRUE(page.ok()) << page.status();
    for (const auto& j : page->jobs()) EXPECT_TRUE(seen.insert(j.id()).second);
    token = page->next_page_token();
    ++pages;
  } while (!token.empty() && pages < 10);
  EXPECT_EQ(seen, std::set<std::string>(ids.begin(), ids.end()));
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(client_->ListJobs(v1::JOB_SUCCEEDED)->jobs_size(), 0);

  // A token stays valid while jobs are added: the next page is what came
  // after the last job returned, not an offset that new jobs would shift.
  absl::StatusOr<v1::ListJobsResponse> first =
      client_->ListJobs(v1::JOB_STATE_UNSPECIFIED, "", 2, "");
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<v1::Job> newer = client_->SubmitJob(QuickJob(model.id()));
  ASSERT_TRUE(newer.ok()) << newer.status();
  absl::StatusOr<v1::ListJobsResponse> second = client_->ListJobs(
      v1::JOB_STATE_UNSPECIFIED, "", 2, first->next_page_token());
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->jobs_size(), 2);
  EXPECT_EQ(second->jobs(0).id(), ids[2]);  // newest first: 4, 3 | 2, 1
  EXPECT_EQ(second->jobs(1).id(), ids[1]);

  // Results: a summary by default, the whole job on request.
  v1::Job done = WaitFor(newer->id(), Finished);
  ASSERT_EQ(done.state(), v1::JOB_SUCCEEDED) << done.error().message();
  ASSERT_GT(done.result().layers_size(), 0);
  absl::StatusOr<v1::ListJobsResponse> summary =
      client_->ListJobs(v1::JOB_SUCCEEDED, "", 10, "");
  ASSERT_TRUE(summary.ok() && summary->jobs_size() == 1);
  const v1::Job& brief = summary->jobs(0);
  EXPECT_EQ(brief.result().layers_size(), 0);
  EXPECT_EQ(brief.result().frontier_size(), 0);
  EXPECT_EQ(brief.result().weight_bytes(), done.result().weight_bytes());
  EXPECT_EQ(brief.result().artifacts_size(), done.result().artifacts_size());
  absl::StatusOr<v1::ListJobsResponse> full =
      client_->ListJobs(v1::JOB_SUCCEEDED, "", 10, "", v1::JOB_VIEW_FULL);
  ASSERT_TRUE(full.ok() && full->jobs_size() == 1);
  EXPECT_EQ(full->jobs(0).SerializeAsString(), done.SerializeAsString());
}

TEST_F(ServiceTest, GracefulStopRequeuesTheRunningJob) {
  StartServer({"--shutdown_grace=0s"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job = client_->SubmitJob(QuickJob(model.id(), 300));
  ASSERT_TRUE(job.ok());
  WaitFor(job->id(), [](const v1::Job& j) {
    return j.stage() == v1::STAGE_DISTILL || Finished(j);
  });
  EXPECT_EQ(server_->Stop(), 0);
  ASSERT_TRUE(server_->Start());
  client_ = server_->NewClient();
  v1::Job done = WaitFor(job->id(), Finished);
  EXPECT_EQ(done.state(), v1::JOB_SUCCEEDED) << done.error().message();
  EXPECT_EQ(done.attempts(), 1);  // a graceful stop does not use up an attempt
}

TEST_F(ServiceTest, HigherPriorityRunsFirst) {
  StartServer({"--devices=cpu:1"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> blocker =
      client_->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(blocker.ok());
  WaitFor(blocker->id(), [](const v1::Job& j) {
    return j.state() == v1::JOB_RUNNING || Finished(j);
  });
  v1::SubmitJobRequest low = QuickJob(model.id());
  v1::SubmitJobRequest high = QuickJob(model.id());
  high.set_priority(10);
  absl::StatusOr<v1::Job> a = client_->SubmitJob(low);
  absl::StatusOr<v1::Job> b = client_->SubmitJob(high);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(client_->CancelJob(blocker->id()).ok());
  v1::Job done_a = WaitFor(a->id(), Finished);
  v1::Job done_b = WaitFor(b->id(), Finished);
  ASSERT_EQ(done_a.state(), v1::JOB_SUCCEEDED);
  ASSERT_EQ(done_b.state(), v1::JOB_SUCCEEDED);
  // One slot: the later, higher-priority job ran first and ended before the
  // other started.
  auto nanos = [](const google::protobuf::Timestamp& t) {
    return t.seconds() * 1000000000 + t.nanos();
  };
  EXPECT_LE(nanos(done_b.end_time()), nanos(done_a.start_time()));
}

TEST_F(ServiceTest, JobInterruptedTooOftenFails) {
  StartServer({"--max_server_restarts=0"});
  v1::Model model = UploadReady("fashion_cnn.pt");
  absl::StatusOr<v1::Job> job =
      client_->SubmitJob(QuickJob(model.id(), 100000));
  ASSERT_TRUE(job.ok());
  WaitFor(job->id(), [](const v1::Job& j) {
    return j.stage() == v1::STAGE_DISTILL || Finished(j);
  });
  server_->Kill();
  // Leftovers of the crash: a partial upload and a job folder.
  fs::create_directories(server_->data_dir() + "/blobs/tmp");
  std::ofstream(server_->data_dir() + "/blobs/tmp/upload-partial")
      << "half a model";
  ASSERT_TRUE(fs::exists(server_->jobs_dir() + "/" + job->id()));
  ASSERT_TRUE(server_->Start());
  client_ = server_->NewClient();
  v1::Job failed = WaitFor(job->id(), Finished);
  EXPECT_EQ(failed.state(), v1::JOB_FAILED);
  EXPECT_EQ(failed.error().code(),
            static_cast<int>(absl::StatusCode::kAborted));
  EXPECT_THAT(failed.error().message(), HasSubstr("server restarts"));
  EXPECT_FALSE(fs::exists(server_->data_dir() + "/blobs/tmp/upload-partial"));
  EXPECT_FALSE(fs::exists(server_->jobs_dir() + "/" + job->id()));
  // The model survived the crash and still serves jobs.
  EXPECT_EQ(client_->GetModel(model.id())->state(), v1::MODEL_READY);
}

}  // namespace
}  // namespace zeroq
