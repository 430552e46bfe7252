// scheduler.h: the order in which queued jobs are offered a device slot.
//
//   std::vector<size_t> order = DispatchOrder(queued, running_per_tenant);
//   for (size_t i : order) if (auto slot = pool.Acquire(queued[i].device)) {
//   ...; break; }
//
// Highest priority first; among equal priorities the tenant with the fewest
// running jobs (so one tenant's burst cannot starve another's single job);
// then the oldest. The caller offers slots in this order and skips a job
// whose device kind has no free slot, so a job waiting for a GPU never holds
// back CPU work. A pure function; thread-safe.
#ifndef ZEROQ_SERVER_SCHEDULER_H_
#define ZEROQ_SERVER_SCHEDULER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace zeroq::server {

struct QueuedJob {
  int priority = 0;
  std::string tenant;
  int64_t order = 0;  // enqueue order: smaller is older
};

std::vector<size_t> DispatchOrder(
    const std::vector<QueuedJob>& queued,
    const absl::flat_hash_map<std::string, int>& running_per_tenant);

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_SCHEDULER_H_
