#include "server/device_pool.h"

#include <dirent.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace zeroq::server {
namespace {

DeviceInfo Cpu(int slots) {
  DeviceInfo d;
  d.name = "cpu";
  d.kind = v1::DEVICE_CPU;
  d.slots = slots;
  d.busy.assign(slots, false);
  return d;
}

DeviceInfo Cuda(int index, int slots, double memory_fraction = 1.0) {
  DeviceInfo d;
  d.name = absl::StrCat("cuda:", index);
  d.kind = v1::DEVICE_CUDA;
  d.cuda_index = index;
  d.slots = slots;
  d.memory_fraction = memory_fraction;
  d.busy.assign(slots, false);
  return d;
}

absl::Status BadSpec(const std::string& spec, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("device spec \"", spec, "\": ", why,
                   "; use \"auto\", or a list such as \"cpu:2\" or "
                   "\"cuda:0:1,cuda:1:2:0.9,cpu:1\""));
}

}  // namespace

std::vector<int> DevicePool::FindCudaDevices() {
  std::vector<int> found;
  DIR* dir = opendir("/dev");
  if (dir == nullptr) return found;
  while (dirent* e = readdir(dir)) {
    absl::string_view name = e->d_name;
    int index = 0;
    if (absl::ConsumePrefix(&name, "nvidia") && !name.empty() &&
        std::all_of(name.begin(), name.end(),
                    [](char c) { return c >= '0' && c <= '9'; }) &&
        absl::SimpleAtoi(name, &index)) {
      found.push_back(index);
    }
  }
  closedir(dir);
  std::sort(found.begin(), found.end());
  return found;
}

absl::StatusOr<DevicePool> DevicePool::Parse(
    const std::string& spec, int cpu_slots, int cuda_slots,
    std::optional<std::vector<int>> present,
    std::optional<std::string> alloc_conf) {
  DevicePool pool;
  if (!present) present = FindCudaDevices();
  if (!alloc_conf) {
    const char* env = std::getenv("PYTORCH_CUDA_ALLOC_CONF");
    alloc_conf = env ? env : "";
  }
  pool.alloc_conf_ = *alloc_conf;
  if (spec == "auto" || spec.empty()) {
    if (cpu_slots < 0 || cuda_slots < 0)
      return BadSpec(spec, "slot counts must be >= 0");
    for (int i : *present) {
      if (cuda_slots > 0) pool.devices_.push_back(Cuda(i, cuda_slots));
    }
    if (cpu_slots > 0) pool.devices_.push_back(Cpu(cpu_slots));
  } else {
    for (absl::string_view part : absl::StrSplit(spec, ',')) {
      std::vector<std::string> f = absl::StrSplit(part, ':');
      int a = 0, b = 0;
      double fraction = 1.0;
      if (f.size() == 2 && f[0] == "cpu" && absl::SimpleAtoi(f[1], &a) &&
          a > 0 && a <= 256) {
        pool.devices_.push_back(Cpu(a));
      } else if ((f.size() == 3 || f.size() == 4) && f[0] == "cuda" &&
                 absl::SimpleAtoi(f[1], &a) && a >= 0 &&
                 absl::SimpleAtoi(f[2], &b) && b > 0 && b <= 64 &&
                 (f.size() == 3 || (absl::SimpleAtod(f[3], &fraction) &&
                                    fraction > 0 && fraction <= 1))) {
        if (std::find(present->begin(), present->end(), a) == present->end()) {
          return absl::FailedPreconditionError(absl::StrCat(
              "device spec \"", spec, "\": CUDA device ", a,
              " is not on this machine (no /dev/nvidia", a, "; found ",
              present->empty() ? "none" : absl::StrJoin(*present, ", "),
              "); use --devices=auto or list only the devices present"));
        }
        pool.devices_.push_back(Cuda(a, b, fraction));
      } else {
        return BadSpec(spec,
                       absl::StrCat("\"", part,
                                    "\" is not cpu:SLOTS or "
                                    "cuda:INDEX:SLOTS[:MEMORY_FRACTION]"));
      }
    }
  }
  if (pool.total_slots() == 0) return BadSpec(spec, "no device slots");
  std::vector<std::string> names;
  for (const DeviceInfo& d : pool.devices_) {
    if (std::find(names.begin(), names.end(), d.name) != names.end()) {
      return BadSpec(spec, absl::StrCat(d.name, " is listed twice"));
    }
    names.push_back(d.name);
  }
  return pool;
}

std::optional<Slot> DevicePool::Acquire(v1::DeviceKind want) {
  // ANY tries CUDA devices first: a GPU slot is the faster place for a job.
  for (v1::DeviceKind kind : {v1::DEVICE_CUDA, v1::DEVICE_CPU}) {
    if (want != v1::DEVICE_ANY && want != kind) continue;
    for (size_t d = 0; d < devices_.size(); ++d) {
      DeviceInfo& dev = devices_[d];
      if (dev.kind != kind) continue;
      for (int s = 0; s < dev.slots; ++s) {
        if (dev.busy[s]) continue;
        dev.busy[s] = true;
        Slot slot;
        slot.device = static_cast<int>(d);
        slot.index = s;
        slot.name = absl::StrCat(dev.name, "/", s);
        slot.kind = kind;
        if (kind == v1::DEVICE_CUDA) {
          slot.core_device = "cuda";
          slot.env = {{"CUDA_VISIBLE_DEVICES", absl::StrCat(dev.cuda_index)}};
          const double share = dev.memory_fraction / dev.slots;
          if (share < 1.0) {
            slot.env.emplace_back(
                "PYTORCH_CUDA_ALLOC_CONF",
                absl::StrCat(alloc_conf_, alloc_conf_.empty() ? "" : ",",
                             "per_process_memory_fraction:",
                             absl::StrFormat("%.4f", share)));
          }
        } else {
          slot.core_device = "cpu";
          slot.env = {{"CUDA_VISIBLE_DEVICES", ""}};
        }
        return slot;
      }
    }
  }
  return std::nullopt;
}

void DevicePool::Release(const Slot& slot) {
  if (slot.device < 0 || slot.device >= static_cast<int>(devices_.size()))
    return;
  DeviceInfo& dev = devices_[slot.device];
  if (slot.index >= 0 && slot.index < dev.slots) dev.busy[slot.index] = false;
}

bool DevicePool::Has(v1::DeviceKind kind) const {
  if (kind == v1::DEVICE_ANY) return !devices_.empty();
  return std::any_of(devices_.begin(), devices_.end(),
                     [&](const DeviceInfo& d) { return d.kind == kind; });
}

std::vector<v1::DeviceKind> DevicePool::Placeable() const {
  std::vector<v1::DeviceKind> out;
  for (v1::DeviceKind kind : {v1::DEVICE_CPU, v1::DEVICE_CUDA}) {
    const bool free = std::any_of(
        devices_.begin(), devices_.end(), [&](const DeviceInfo& d) {
          return d.kind == kind &&
                 std::count(d.busy.begin(), d.busy.end(), false) > 0;
        });
    if (free) out.push_back(kind);
  }
  if (!out.empty()) out.push_back(v1::DEVICE_ANY);
  return out;
}

int DevicePool::total_slots() const {
  int n = 0;
  for (const DeviceInfo& d : devices_) n += d.slots;
  return n;
}

int DevicePool::busy_slots() const {
  int n = 0;
  for (const DeviceInfo& d : devices_)
    n += static_cast<int>(std::count(d.busy.begin(), d.busy.end(), true));
  return n;
}

std::string DevicePool::Describe() const {
  return absl::StrJoin(devices_, ", ",
                       [](std::string* out, const DeviceInfo& d) {
                         absl::StrAppend(out, d.name, " (", d.slots,
                                         d.slots == 1 ? " slot)" : " slots)");
                       });
}

}  // namespace zeroq::server
