// e2e_util.h: what the end-to-end tests do over and over against a real
// server: a quick job, waiting on a job, uploading a model until READY,
// collecting a job's events.
//
//   v1::Model m = UploadReady(client, "fashion_cnn.pt");
//   absl::StatusOr<v1::Job> job = client->SubmitJob(QuickJob(m.id()));
//   v1::Job done = WaitFor(client, job->id(), Finished);
#ifndef ZEROQ_TESTS_E2E_UTIL_H_
#define ZEROQ_TESTS_E2E_UTIL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "client/client.h"
#include "gtest/gtest.h"

namespace zeroq::testing {

namespace v1 = ::zeroq::v1;

// A committed model under tests/models.
inline std::string ModelPath(const std::string& name) {
  return std::string(ZEROQ_TEST_MODELS_DIR) + "/" + name;
}

// A quick job on the example model: W4A8, few distillation steps, a small
// batch, a few reconstruction steps (W4 runs RECONSTRUCT by default), one
// thread, a fixed seed.
inline v1::SubmitJobRequest QuickJob(const std::string& model_id,
                                     int iterations = 20) {
  v1::SubmitJobRequest r;
  r.set_model_id(model_id);
  v1::QuantizationConfig* c = r.mutable_config();
  c->set_weight_bits(4);
  c->mutable_distillation()->set_batch_size(8);
  c->mutable_distillation()->set_iterations(iterations);
  c->mutable_distillation()->set_seed(7);
  c->mutable_reconstruction()->set_iterations(5);
  c->set_threads(1);
  return r;
}

inline bool Finished(const v1::Job& j) {
  return j.state() == v1::JOB_SUCCEEDED || j.state() == v1::JOB_FAILED ||
         j.state() == v1::JOB_CANCELLED;
}

// Polls the job until `done` holds; the job as last seen (and a test
// failure on timeout).
inline v1::Job WaitFor(client::Client* c, const std::string& id,
                       const std::function<bool(const v1::Job&)>& done,
                       absl::Duration timeout = absl::Minutes(3)) {
  absl::Time deadline = absl::Now() + timeout;
  v1::Job job;
  while (absl::Now() < deadline) {
    absl::StatusOr<v1::Job> j = c->GetJob(id);
    if (j.ok()) {
      job = *j;
      if (done(job)) return job;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  ADD_FAILURE() << "timed out waiting on job " << id << ": "
                << job.DebugString();
  return job;
}

// Uploads a committed model and waits for its inspection; the model as last
// seen (a test failure when the upload or the wait fails).
inline v1::Model UploadReady(client::Client* c, const std::string& file,
                             std::vector<int64_t> shape = {1, 28, 28}) {
  absl::StatusOr<v1::Model> m = c->UploadModel(ModelPath(file), file, shape);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return {};
  absl::StatusOr<v1::Model> ready = c->WaitForModel(m->id(), absl::Minutes(2));
  EXPECT_TRUE(ready.ok()) << ready.status();
  return ready.ok() ? *ready : *m;
}

// Watches the job to its end from after_seq, appending every event but
// heartbeats to *events.
inline absl::StatusOr<v1::Job> WatchAll(client::Client* c,
                                        const std::string& id,
                                        std::vector<v1::JobEvent>* events,
                                        int64_t after_seq = 0) {
  return c->WatchJob(id, after_seq, [events](const v1::JobEvent& e) {
    if (e.type() != v1::EVENT_HEARTBEAT) events->push_back(e);
    return true;
  });
}

}  // namespace zeroq::testing

#endif  // ZEROQ_TESTS_E2E_UTIL_H_
