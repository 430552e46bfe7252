#include "core/cuda_runtime.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>

#include <torch/cuda.h>

#include "absl/strings/str_cat.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

// The folder of the loaded libtorch_cpu.so: the CUDA half sits beside it.
std::string TorchLibDir() {
  Dl_info info{};
  // Any function defined in libtorch_cpu.so.
  if (dladdr(reinterpret_cast<void*>(&torch::cuda::device_count), &info) == 0 ||
      info.dli_fname == nullptr) {
    return "";
  }
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

struct LoadState {
  std::once_flag once;
  absl::Status status;
  std::atomic<bool> loaded{false};
};

LoadState& State() {
  static LoadState* state = new LoadState;
  return *state;
}

}  // namespace

absl::Status LoadCudaRuntime() {
  LoadState& s = State();
  std::call_once(s.once, [&s] {
#if ZEROQ_TORCH_HAS_CUDA
    const std::string path = TorchLibDir() + "libtorch_cuda.so";
    // RTLD_GLOBAL: its kernels and hooks register with the already loaded
    // CPU half, exactly as when it is linked.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      s.status = absl::FailedPreconditionError(absl::StrCat(
          "cannot load LibTorch's CUDA library: ", why ? why : "unknown error"));
      return;
    }
    s.loaded = true;
#else
    s.status = absl::FailedPreconditionError(
        "this build's LibTorch has no CUDA support; use device \"cpu\"");
#endif
  });
  return s.status;
}

bool CudaRuntimeLoaded() { return State().loaded.load(); }

absl::StatusOr<int> CudaDeviceCount() {
  if (absl::Status s = LoadCudaRuntime(); !s.ok()) return s;
  return CallTorch("counting CUDA devices",
                   [] { return static_cast<int>(torch::cuda::device_count()); });
}

absl::Status CheckDevice(const torch::Device& device) {
  if (!device.is_cuda()) return absl::OkStatus();
  absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok()) return count.status();
  const int index = device.has_index() ? device.index() : 0;
  if (index >= *count) {
    return absl::FailedPreconditionError(
        *count == 0
            ? std::string("no CUDA device is visible to this process (no GPU, "
                          "or no driver); use device \"cpu\"")
            : absl::StrCat("CUDA device ", index, " does not exist: ", *count,
                           " visible"));
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::Device> ResolveDevice(const std::string& name) {
  absl::StatusOr<torch::Device> device =
      CallTorch(absl::StrCat("device \"", name, "\""),
                [&] { return torch::Device(name); });
  if (!device.ok()) return device.status();
  if (!device->is_cpu() && !device->is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device \"", name, "\" is not supported: use cpu, cuda or cuda:N"));
  }
  if (absl::Status s = CheckDevice(*device); !s.ok()) return s;
  return *device;
}

}  // namespace zeroq::core
