// cuda_runtime.h: LibTorch's CUDA half, loaded only by a process that uses a
// CUDA device.
//
//   ZQ_RETURN_IF_ERROR(CheckDevice(torch::Device("cuda:0")));  // loads it
//
// The core links only LibTorch's CPU library. The CUDA library
// (libtorch_cuda.so beside libtorch_cpu.so, with the wheel's CUDA runtime,
// cuBLAS, cuDNN... through its own RPATH) registers its kernels and hooks when
// it is loaded, so loading it on first use gives the same LibTorch as linking
// it, while a worker on a CPU slot never maps, relocates or initialises any of
// it: cuDNN, cuBLAS, NCCL... (libtorch_cpu.so itself only needs the small
// CUDA runtime and CUPTI libraries, which it loads without initialising
// anything). Measured: a process linked with the CUDA half starts about
// 0.13 s later and with about 370 MiB more resident memory. Thread-safe.
#ifndef ZEROQ_CORE_CUDA_RUNTIME_H_
#define ZEROQ_CORE_CUDA_RUNTIME_H_

#include <string>

#include <torch/types.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace zeroq::core {

// Loads the CUDA half once. FAILED_PRECONDITION if this LibTorch has none
// (a CPU-only build) or it cannot be loaded (the message says why).
absl::Status LoadCudaRuntime();

// True once LoadCudaRuntime() has succeeded in this process.
bool CudaRuntimeLoaded();

// CUDA devices visible to this process (after CUDA_VISIBLE_DEVICES); loads
// the CUDA half. 0 on a machine without a GPU or driver.
absl::StatusOr<int> CudaDeviceCount();

// OK for the CPU. For a CUDA device: loads the CUDA half and checks that the
// device exists, else FAILED_PRECONDITION saying how many there are. Nothing
// CUDA is touched for a CPU device.
absl::Status CheckDevice(const torch::Device& device);

// Parses "cpu", "cuda", "cuda:N" and checks it as CheckDevice does.
// INVALID_ARGUMENT for a malformed name.
absl::StatusOr<torch::Device> ResolveDevice(const std::string& name);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_CUDA_RUNTIME_H_
