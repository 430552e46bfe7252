#include "server/scheduler.h"

#include <algorithm>
#include <numeric>

namespace zeroq::server {

std::vector<size_t> DispatchOrder(
    const std::vector<QueuedJob>& queued,
    const absl::flat_hash_map<std::string, int>& running_per_tenant) {
  auto running = [&](const std::string& tenant) {
    auto it = running_per_tenant.find(tenant);
    return it == running_per_tenant.end() ? 0 : it->second;
  };
  std::vector<size_t> order(queued.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const QueuedJob& x = queued[a];
    const QueuedJob& y = queued[b];
    if (x.priority != y.priority) return x.priority > y.priority;
    int rx = running(x.tenant), ry = running(y.tenant);
    if (rx != ry) return rx < ry;
    return x.order < y.order;
  });
  return order;
}

}  // namespace zeroq::server
