// The CUDA device logic, run on the CPU: the CUDA half of LibTorch loads on
// demand (and only then), devices that do not exist are refused clearly, and
// a device out of memory becomes RESOURCE_EXHAUSTED. On a machine with a GPU
// the same tests check the positive side (scripts/gpu_check.sh).
#include "core/cuda_runtime.h"

#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/match.h"
#include "core/model.h"
#include "core/test_util.h"
#include "core/torch_status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::HasSubstr;

bool MapsMention(const std::string& what) {
  std::ifstream in("/proc/self/maps");
  std::string maps((std::istreambuf_iterator<char>(in)), {});
  return absl::StrContains(maps, what);
}

// ctest runs every test in a process of its own; run together in one
// process, an earlier test may have loaded the CUDA half already.
TEST(CudaRuntime, CpuWorkNeverLoadsTheCudaHalf) {
  if (CudaRuntimeLoaded()) GTEST_SKIP() << "loaded by an earlier test";
  std::unique_ptr<Model> m = LoadTestModel("fashion_cnn.pt");
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->Forward(torch::zeros({2, 1, 28, 28})).ok());
  ASSERT_TRUE(ResolveDevice("cpu").ok());
  EXPECT_FALSE(CudaRuntimeLoaded());
  // libtorch_cpu.so itself needs the small CUDA runtime and CUPTI (its
  // profiler); the big libraries come only with the CUDA half.
  EXPECT_FALSE(MapsMention("libtorch_cuda.so"));
  EXPECT_FALSE(MapsMention("libcudnn"));
  EXPECT_FALSE(MapsMention("libcublas"));
  EXPECT_FALSE(MapsMention("libnccl"));
}

TEST(CudaRuntime, LoadsOnDemandWithoutAGpu) {
#if ZEROQ_TORCH_HAS_CUDA
  ASSERT_TRUE(LoadCudaRuntime().ok()) << LoadCudaRuntime();
  EXPECT_TRUE(CudaRuntimeLoaded());
  EXPECT_TRUE(MapsMention("libtorch_cuda.so"));
  absl::StatusOr<int> n = CudaDeviceCount();
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_GE(*n, 0);
  RecordProperty("cuda_devices", *n);
#else
  EXPECT_EQ(LoadCudaRuntime().code(), absl::StatusCode::kFailedPrecondition);
#endif
}

TEST(CudaRuntime, DeviceThatDoesNotExistIsFailedPrecondition) {
  absl::StatusOr<torch::Device> d = ResolveDevice("cuda:97");
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<int> n = CudaDeviceCount();
  if (n.ok() && *n == 0) {
    absl::StatusOr<torch::Device> any = ResolveDevice("cuda");
    ASSERT_FALSE(any.ok());
    EXPECT_EQ(any.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(any.status().message()), HasSubstr("no CUDA device"));
    // A model load on it says the same, before reading the file.
    absl::StatusOr<std::unique_ptr<Model>> m =
        Model::LoadFromFile(ModelPath("fashion_cnn.pt"), "cuda:0");
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  } else if (n.ok()) {
    EXPECT_TRUE(ResolveDevice("cuda:0").ok());
  }
}

TEST(CudaRuntime, MalformedDeviceIsInvalidArgument) {
  for (const char* name : {"gpu0", "cuda:x", ""}) {
    absl::StatusOr<torch::Device> d = ResolveDevice(name);
    ASSERT_FALSE(d.ok()) << name;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  EXPECT_EQ(ResolveDevice("mps").status().code(), absl::StatusCode::kInvalidArgument);
}

// What a CUDA out-of-memory turns into, thrown as LibTorch throws it (the
// caching allocator's c10::OutOfMemoryError) and as the TorchScript
// interpreter rethrows it (text in a runtime_error).
TEST(CudaRuntime, OutOfMemoryIsResourceExhausted) {
  absl::Status typed = CallTorch("distillation", [] {
    TORCH_CHECK_WITH(OutOfMemoryError, false,
                     "CUDA out of memory. Tried to allocate 2.00 GiB");
  });
  EXPECT_EQ(typed.code(), absl::StatusCode::kResourceExhausted) << typed;
  EXPECT_THAT(std::string(typed.message()), HasSubstr("CUDA out of memory"));
  absl::Status text = CallTorch("forward", [] {
    throw std::runtime_error(
        "The following operation failed in the TorchScript interpreter.\n"
        "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB");
  });
  EXPECT_EQ(text.code(), absl::StatusCode::kResourceExhausted) << text;
  absl::Status other = CallTorch("forward", [] {
    TORCH_CHECK(false, "shape mismatch");
  });
  EXPECT_EQ(other.code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace zeroq::core
