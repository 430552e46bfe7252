#include "server/event_log.h"

#include <algorithm>
#include <utility>

namespace zeroq::server {

EventLog::EventLog(std::vector<v1::JobEvent> events, bool terminal)
    : events_(std::move(events)), terminal_(terminal) {}

void EventLog::Append(const std::vector<v1::JobEvent>& events, bool terminal) {
  std::vector<std::weak_ptr<EventListener>> wake;
  {
    absl::MutexLock lock(&mu_);
    events_.insert(events_.end(), events.begin(), events.end());
    terminal_ = terminal_ || terminal;
    wake.swap(waiting_);
  }
  for (const auto& w : wake) {
    if (std::shared_ptr<EventListener> l = w.lock()) l->OnEvents();
  }
}

EventLog::Read EventLog::ReadAfter(
    int64_t after_seq, int max, std::vector<v1::JobEvent>* out,
    const std::shared_ptr<EventListener>& listener) {
  absl::MutexLock lock(&mu_);
  // Seqs are dense from 1, but a log rebuilt from the store may start later;
  // find the first event after after_seq by seq, not by index.
  auto it = std::upper_bound(
      events_.begin(), events_.end(), after_seq,
      [](int64_t s, const v1::JobEvent& e) { return s < e.seq(); });
  if (it != events_.end()) {
    for (int n = 0; it != events_.end() && n < max; ++it, ++n)
      out->push_back(*it);
    return Read::kEvents;
  }
  if (terminal_) return Read::kDone;
  if (listener != nullptr) waiting_.push_back(listener);
  return Read::kWait;
}

}  // namespace zeroq::server
