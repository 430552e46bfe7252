#include "server/scheduler.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

using ::testing::ElementsAre;

TEST(Scheduler, PriorityFirstThenAge) {
  std::vector<QueuedJob> q = {
      {0, "a", 1}, {5, "a", 2}, {0, "a", 0}, {5, "a", 3}};
  EXPECT_THAT(DispatchOrder(q, {}), ElementsAre(1, 3, 2, 0));
}

TEST(Scheduler, FairBetweenTenantsAtEqualPriority) {
  // Tenant "big" submitted a burst before "small" submitted one job; "big"
  // already runs two jobs, so "small" goes next despite being younger.
  std::vector<QueuedJob> q = {
      {0, "big", 0}, {0, "big", 1}, {0, "big", 2}, {0, "small", 3}};
  EXPECT_THAT(DispatchOrder(q, {{"big", 2}}), ElementsAre(3, 0, 1, 2));
  // With nothing running anywhere, age decides.
  EXPECT_THAT(DispatchOrder(q, {}), ElementsAre(0, 1, 2, 3));
}

TEST(Scheduler, PriorityBeatsFairness) {
  std::vector<QueuedJob> q = {{0, "small", 0}, {1, "big", 1}};
  EXPECT_THAT(DispatchOrder(q, {{"big", 5}}), ElementsAre(1, 0));
}

TEST(Scheduler, Empty) { EXPECT_TRUE(DispatchOrder({}, {}).empty()); }

}  // namespace
}  // namespace zeroq::server
