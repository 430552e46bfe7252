#include "server/device_pool.h"

#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

TEST(DevicePool, ParsesAListAndHandsOutEverySlotOnce) {
  absl::StatusOr<DevicePool> pool =
      DevicePool::Parse("cuda:0:1,cuda:1:2,cpu:2");
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ(pool->total_slots(), 5);
  // ANY takes CUDA slots first, restricted to their device.
  std::optional<Slot> a = pool->Acquire(v1::DEVICE_ANY);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->name, "cuda:0/0");
  EXPECT_EQ(a->core_device, "cuda");
  ASSERT_EQ(a->env.size(), 1u);
  EXPECT_EQ(a->env[0].second, "0");
  std::optional<Slot> b = pool->Acquire(v1::DEVICE_CUDA);
  std::optional<Slot> c = pool->Acquire(v1::DEVICE_CUDA);
  ASSERT_TRUE(b && c);
  EXPECT_EQ(b->env[0].second, "1");
  EXPECT_FALSE(pool->Acquire(v1::DEVICE_CUDA));
  std::optional<Slot> d =
      pool->Acquire(v1::DEVICE_ANY);  // falls back to the CPU
  ASSERT_TRUE(d);
  EXPECT_EQ(d->core_device, "cpu");
  EXPECT_EQ(d->env[0].second, "");  // the CPU worker sees no GPU
  EXPECT_EQ(pool->busy_slots(), 4);
  pool->Release(*a);
  std::optional<Slot> e = pool->Acquire(v1::DEVICE_CUDA);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->name, "cuda:0/0");
}

TEST(DevicePool, CpuOnly) {
  absl::StatusOr<DevicePool> pool = DevicePool::Parse("cpu:1");
  ASSERT_TRUE(pool.ok());
  EXPECT_FALSE(pool->Has(v1::DEVICE_CUDA));
  EXPECT_TRUE(pool->Has(v1::DEVICE_ANY));
  EXPECT_FALSE(pool->Acquire(v1::DEVICE_CUDA));
  ASSERT_TRUE(pool->Acquire(v1::DEVICE_CPU));
  EXPECT_FALSE(pool->Acquire(v1::DEVICE_ANY));
  EXPECT_EQ(pool->Describe(), "cpu (1 slot)");
}

TEST(DevicePool, RejectsBadSpecs) {
  for (const char* spec : {"gpu:1", "cpu:0", "cpu", "cuda:0", "cuda:x:1",
                           "cpu:1,cpu:2", "cpu:-1"}) {
    EXPECT_EQ(DevicePool::Parse(spec).status().code(),
              absl::StatusCode::kInvalidArgument)
        << spec;
  }
}

TEST(DevicePool, AutoAddsTheCpu) {
  absl::StatusOr<DevicePool> pool = DevicePool::Parse("auto", 2, 1);
  ASSERT_TRUE(pool.ok());
  EXPECT_TRUE(pool->Has(v1::DEVICE_CPU));
  EXPECT_EQ(pool->total_slots(),
            2 + static_cast<int>(DevicePool::FindCudaDevices().size()));
}

}  // namespace
}  // namespace zeroq::server
