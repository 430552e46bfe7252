#include "server/device_pool.h"

#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

TEST(DevicePool, ParsesAListAndHandsOutEverySlotOnce) {
  absl::StatusOr<DevicePool> pool = DevicePool::Parse(
      "cuda:0:1,cuda:1:2,cpu:2", 1, 1, std::vector<int>{0, 1}, "");
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ(pool->total_slots(), 5);
  // ANY takes CUDA slots first, restricted to their device.
  std::optional<Slot> a = pool->Acquire(v1::DEVICE_ANY);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->name, "cuda:0/0");
  EXPECT_EQ(a->core_device, "cuda");
  ASSERT_EQ(a->env.size(), 1u);  // one slot: the whole device, no cap
  EXPECT_EQ(a->env[0].second, "0");
  std::optional<Slot> b = pool->Acquire(v1::DEVICE_CUDA);
  std::optional<Slot> c = pool->Acquire(v1::DEVICE_CUDA);
  ASSERT_TRUE(b && c);
  EXPECT_EQ(b->env[0].second, "1");
  // Two slots on cuda:1 split its memory.
  ASSERT_EQ(b->env.size(), 2u);
  EXPECT_EQ(b->env[1].first, "PYTORCH_CUDA_ALLOC_CONF");
  EXPECT_EQ(b->env[1].second, "per_process_memory_fraction:0.5000");
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

TEST(DevicePool, CudaDeviceThatIsNotThereFailsClearly) {
  absl::StatusOr<DevicePool> pool =
      DevicePool::Parse("cuda:0:1", 1, 1, std::vector<int>{}, "");
  ASSERT_FALSE(pool.ok());
  EXPECT_EQ(pool.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(pool.status().message().find("CUDA device 0 is not on this machine"),
            std::string::npos)
      << pool.status();
  EXPECT_NE(pool.status().message().find("found none"), std::string::npos);
  pool = DevicePool::Parse("cuda:2:1,cpu:1", 1, 1, std::vector<int>{0, 1}, "");
  EXPECT_EQ(pool.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(pool.status().message().find("found 0, 1"), std::string::npos);
}

TEST(DevicePool, MemoryFractionPerDeviceSplitBetweenSlots) {
  absl::StatusOr<DevicePool> pool = DevicePool::Parse(
      "cuda:0:4:0.8,cuda:1:1:0.5", 1, 1, std::vector<int>{0, 1},
      "expandable_segments:True");
  ASSERT_TRUE(pool.ok()) << pool.status();
  std::optional<Slot> a = pool->Acquire(v1::DEVICE_CUDA);
  ASSERT_TRUE(a);
  ASSERT_EQ(a->env.size(), 2u);
  // The operator's own allocator settings are kept.
  EXPECT_EQ(a->env[1].second,
            "expandable_segments:True,per_process_memory_fraction:0.2000");
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(pool->Acquire(v1::DEVICE_CUDA));
  std::optional<Slot> b = pool->Acquire(v1::DEVICE_CUDA);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->name, "cuda:1/0");
  EXPECT_EQ(b->env[1].second,
            "expandable_segments:True,per_process_memory_fraction:0.5000");
  for (const char* bad : {"cuda:0:1:0", "cuda:0:1:1.5", "cuda:0:1:x",
                          "cuda:0:1:0.5:1"}) {
    EXPECT_EQ(DevicePool::Parse(bad, 1, 1, std::vector<int>{0}, "").status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(DevicePool, AutoWithoutGpuServesTheCpu) {
  absl::StatusOr<DevicePool> pool =
      DevicePool::Parse("auto", 2, 1, std::vector<int>{}, "");
  ASSERT_TRUE(pool.ok());
  EXPECT_FALSE(pool->Has(v1::DEVICE_CUDA));
  EXPECT_EQ(pool->Describe(), "cpu (2 slots)");
  pool = DevicePool::Parse("auto", 1, 2, std::vector<int>{0}, "");
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ(pool->Describe(), "cuda:0 (2 slots), cpu (1 slot)");
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
