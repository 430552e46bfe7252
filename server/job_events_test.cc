// JobEvents on SQLite: one replica's watchers following events that this
// replica stores and events another store connection (another replica)
// writes, with the store's seqs, in order, each once.
#include "server/job_events.h"

#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/records.h"

namespace zeroq::server {
namespace {

namespace fs = std::filesystem;

class Collector : public EventListener {
 public:
  void OnEvents() override { woken_.Notify(); }
  absl::Notification woken_;
};

class JobEventsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "/job_events_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    for (auto* store : {&here_, &there_}) {
      auto opened = SqliteJobStore::Open(dir_ + "/zeroq.db");
      ASSERT_TRUE(opened.ok()) << opened.status();
      *store = *std::move(opened);
    }
    v1::Job job;
    job.set_id("j1");
    job.set_tenant("acme");
    job.set_model_id("m1");
    job.set_state(v1::JOB_QUEUED);
    ASSERT_TRUE(here_->CreateJob(job, {StateEvent(job, "queued")}, 0).ok());
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Appends one message event through `store`; returns what was stored.
  JobWrite Write(JobStore& store, const std::string& text,
                 v1::JobState state = v1::JOB_QUEUED) {
    absl::StatusOr<JobWrite> w =
        store.EditJob("j1", nullptr, [&](JobChange& c) {
          if (state != c.job.state()) {
            c.job.set_state(state);
            c.events.push_back(StateEvent(c.job, text));
          } else {
            v1::JobEvent e;
            e.set_type(v1::EVENT_MESSAGE);
            e.set_message(text);
            c.events.push_back(e);
          }
          return absl::OkStatus();
        });
    EXPECT_TRUE(w.ok()) << w.status();
    return w.ok() ? *w : JobWrite();
  }

  // Reads the log until `count` events or the end (up to 5 s).
  static std::vector<v1::JobEvent> ReadAll(EventLog& log, size_t count) {
    std::vector<v1::JobEvent> out;
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (out.size() < count && absl::Now() < deadline) {
      auto collector = std::make_shared<Collector>();
      const int64_t after = out.empty() ? 0 : out.back().seq();
      EventLog::Read r = log.ReadAfter(after, 100, &out, collector);
      if (r == EventLog::Read::kDone) break;
      if (r == EventLog::Read::kWait)
        collector->woken_.WaitForNotificationWithTimeout(absl::Seconds(1));
    }
    return out;
  }

  std::string dir_;
  std::unique_ptr<SqliteJobStore> here_;
  std::unique_ptr<SqliteJobStore> there_;
};

TEST_F(JobEventsTest, FollowsEventsWrittenElsewhereByPolling) {
  JobEvents events(here_.get(), absl::Milliseconds(50));
  auto log = events.Watch("j1");
  ASSERT_TRUE(log.ok()) << log.status();
  EXPECT_EQ(events.followed(), 1);
  for (int i = 0; i < 5; ++i) Write(*there_, "elsewhere");
  Write(*there_, "done", v1::JOB_SUCCEEDED);
  std::vector<v1::JobEvent> seen = ReadAll(**log, 7);
  ASSERT_EQ(seen.size(), 7u);
  for (size_t i = 0; i < seen.size(); ++i)
    EXPECT_EQ(seen[i].seq(), static_cast<int64_t>(i + 1));
  EXPECT_TRUE(IsTerminalEvent(seen.back()));
  EXPECT_TRUE((*log)->terminal());
  // A finished job's log is no longer followed.
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  while (events.followed() > 0 && absl::Now() < deadline)
    absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(events.followed(), 0);
}

TEST_F(JobEventsTest, OwnWritesArriveAtOnceAndAGapIsFilledFromTheStore) {
  // A poll so slow that only the two direct paths can deliver in time.
  JobEvents events(here_.get(), absl::Hours(1));
  auto log = events.Watch("j1");
  ASSERT_TRUE(log.ok());
  JobWrite mine = Write(*here_, "here");
  events.Stored("j1", mine.events);
  EXPECT_EQ((*log)->last_seq(), 2);
  // Written by another replica (seq 3), then this replica's seq 4: the gap
  // sends the log to the store, which has both.
  Write(*there_, "there");
  JobWrite next = Write(*here_, "here again");
  events.Stored("j1", next.events);
  std::vector<v1::JobEvent> seen = ReadAll(**log, 4);
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen[2].message(), "there");
  EXPECT_EQ(seen[3].message(), "here again");
  // The same events arriving twice are shown once.
  events.Stored("j1", next.events);
  events.Changed("j1");
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ((*log)->last_seq(), 4);
}

TEST_F(JobEventsTest, WatchersShareALogAndAFinishedJobReplaysWhole) {
  JobEvents events(here_.get(), absl::Milliseconds(50));
  auto a = events.Watch("j1");
  auto b = events.Watch("j1");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->get(), b->get());
  Write(*there_, "done", v1::JOB_CANCELLED);
  ReadAll(**a, 2);
  auto late = events.Watch("j1");
  ASSERT_TRUE(late.ok());
  EXPECT_TRUE((*late)->terminal());
  EXPECT_EQ((*late)->last_seq(), 2);
}

}  // namespace
}  // namespace zeroq::server
