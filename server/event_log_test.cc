// EventLog and EventFanOut: replay and waiting from a cursor, one-shot
// listeners, and that an append hands the wakes to the fan-out thread
// instead of running the listeners itself.
#include "server/event_log.h"

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

v1::JobEvent Event(int64_t seq) {
  v1::JobEvent e;
  e.set_seq(seq);
  e.set_type(v1::EVENT_PROGRESS);
  return e;
}

class Counting : public EventListener {
 public:
  void OnEvents() override {
    thread = std::this_thread::get_id();
    ++calls;
  }
  std::atomic<int> calls{0};
  std::thread::id thread;
};

// Blocks in OnEvents until released.
class Blocking : public EventListener {
 public:
  void OnEvents() override {
    entered.Notify();
    release.WaitForNotification();
  }
  absl::Notification entered, release;
};

TEST(EventLog, ReplaysThenWaitsThenEnds) {
  EventLog log;
  log.Append({Event(1), Event(2), Event(3)}, false);
  std::vector<v1::JobEvent> out;
  auto listener = std::make_shared<Counting>();
  EXPECT_EQ(log.ReadAfter(1, 64, &out, listener), EventLog::Read::kEvents);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].seq(), 2);
  out.clear();
  EXPECT_EQ(log.ReadAfter(3, 64, &out, listener), EventLog::Read::kWait);
  log.Append({Event(4)}, true);  // no fan-out: woken inline, once
  EXPECT_EQ(listener->calls, 1);
  log.Append({}, true);
  EXPECT_EQ(listener->calls, 1);  // one-shot
  EXPECT_EQ(log.ReadAfter(3, 64, &out, nullptr), EventLog::Read::kEvents);
  out.clear();
  EXPECT_EQ(log.ReadAfter(4, 64, &out, nullptr), EventLog::Read::kDone);
}

TEST(EventFanOut, AppendDoesNotRunTheListeners) {
  EventFanOut fan_out;
  EventLog log(&fan_out);
  auto slow = std::make_shared<Blocking>();
  auto counted = std::make_shared<Counting>();
  std::vector<v1::JobEvent> out;
  ASSERT_EQ(log.ReadAfter(0, 64, &out, slow), EventLog::Read::kWait);
  ASSERT_EQ(log.ReadAfter(0, 64, &out, counted), EventLog::Read::kWait);
  // The append returns while the first listener is still blocked in its
  // wake: the appender never waits for a watcher.
  log.Append({Event(1)}, false);
  ASSERT_TRUE(slow->entered.WaitForNotificationWithTimeout(absl::Seconds(10)));
  log.Append({Event(2)}, false);
  EXPECT_EQ(counted->calls, 0);  // queued behind the blocked one
  slow->release.Notify();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (counted->calls == 0 && absl::Now() < deadline)
    absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(counted->calls, 1);
  EXPECT_NE(counted->thread, std::this_thread::get_id());
}

TEST(EventFanOut, WakesWhatIsQueuedBeforeItStops) {
  auto listener = std::make_shared<Counting>();
  {
    EventFanOut fan_out;
    EventLog log(&fan_out);
    std::vector<v1::JobEvent> out;
    ASSERT_EQ(log.ReadAfter(0, 64, &out, listener), EventLog::Read::kWait);
    log.Append({Event(1)}, true);
  }
  EXPECT_EQ(listener->calls, 1);
}

}  // namespace
}  // namespace zeroq::server
