// device_pool.h: the devices jobs run on and their concurrent job slots.
//
//   ZQ_ASSIGN_OR_RETURN(DevicePool pool, DevicePool::Parse("cpu:2,cuda:0:1"));
//   std::optional<Slot> s = pool.Acquire(v1::DEVICE_ANY);   // cuda first
//   ... run the job with s->env, s->device ...
//   pool.Release(*s);
//
// A spec lists devices separated by commas: "cpu:N" (N slots on the CPU) or
// "cuda:I:N[:F]" (N slots on CUDA device I sharing the fraction F of its
// memory, default 1), or "auto": every CUDA device found (/dev/nvidiaI) with
// `cuda_slots` slots each, plus the CPU with `cpu_slots`. A CUDA device must
// exist: a spec naming one that does not fails.
//
// Sharing a GPU: a worker on a CUDA slot sees only its device
// (CUDA_VISIBLE_DEVICES) and, when the device has several slots or F < 1,
// caps LibTorch's caching allocator at F / N of the device's memory
// (PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction, appended to the
// server's own setting of that variable), so one job cannot starve the
// others on the same GPU; it runs out of memory alone instead.
// Not thread-safe: the scheduler calls it under its own lock.
#ifndef ZEROQ_SERVER_DEVICE_POOL_H_
#define ZEROQ_SERVER_DEVICE_POOL_H_

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

namespace v1 = ::zeroq::v1;

struct Slot {
  int device = 0;           // index in DevicePool::devices()
  int index = 0;            // slot on that device
  std::string name;         // "cpu/0", "cuda:1/0"
  std::string core_device;  // what the worker is told: "cpu" or "cuda"
  v1::DeviceKind kind = v1::DEVICE_CPU;
  // Restricts the worker to its device.
  std::vector<std::pair<std::string, std::string>> env;
};

struct DeviceInfo {
  std::string name;  // "cpu", "cuda:0"
  v1::DeviceKind kind = v1::DEVICE_CPU;
  int cuda_index = -1;
  int slots = 0;
  double memory_fraction = 1.0;  // of the device, shared by its slots
  std::vector<bool> busy;  // per slot
};

class DevicePool {
 public:
  // `present`: the CUDA device indices that exist (default: found by
  // FindCudaDevices()). `alloc_conf`: the server's PYTORCH_CUDA_ALLOC_CONF,
  // kept in the workers' (default: read from the environment).
  static absl::StatusOr<DevicePool> Parse(
      const std::string& spec, int cpu_slots = 1, int cuda_slots = 1,
      std::optional<std::vector<int>> present = std::nullopt,
      std::optional<std::string> alloc_conf = std::nullopt);
  // CUDA device indices present on this machine (from /dev/nvidiaN).
  static std::vector<int> FindCudaDevices();

  // A free slot of the wanted kind (ANY: CUDA first, then CPU), or nullopt.
  std::optional<Slot> Acquire(v1::DeviceKind want);
  void Release(const Slot& slot);
  // Whether any device of this kind exists at all (a job asking for a kind
  // the pool lacks could never run).
  bool Has(v1::DeviceKind kind) const;

  const std::vector<DeviceInfo>& devices() const { return devices_; }
  // The device preferences a job may have and still get a slot now
  // (DEVICE_ANY when any slot is free); empty when every slot is busy.
  std::vector<v1::DeviceKind> Placeable() const;
  int total_slots() const;
  int busy_slots() const;
  std::string Describe() const;  // "cpu (2 slots), cuda:0 (1 slot)"

 private:
  std::vector<DeviceInfo> devices_;
  std::string alloc_conf_;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_DEVICE_POOL_H_
