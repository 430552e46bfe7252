#include "server/event_log.h"

#include <algorithm>
#include <iterator>
#include <utility>

namespace zeroq::server {

EventFanOut::EventFanOut() { thread_ = std::thread([this] { Loop(); }); }

EventFanOut::~EventFanOut() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void EventFanOut::Wake(std::vector<std::weak_ptr<EventListener>> listeners) {
  if (listeners.empty()) return;
  absl::MutexLock lock(&mu_);
  queue_.insert(queue_.end(), std::make_move_iterator(listeners.begin()),
                std::make_move_iterator(listeners.end()));
}

void EventFanOut::Loop() {
  while (true) {
    std::vector<std::weak_ptr<EventListener>> batch;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and nothing left to wake
      batch.swap(queue_);
    }
    for (const auto& w : batch) {
      if (std::shared_ptr<EventListener> l = w.lock()) l->OnEvents();
    }
  }
}

EventLog::EventLog(EventFanOut* fan_out) : fan_out_(fan_out) {}

EventLog::EventLog(std::vector<v1::JobEvent> events, bool terminal,
                   EventFanOut* fan_out)
    : fan_out_(fan_out), events_(std::move(events)), terminal_(terminal) {}

bool EventLog::Append(const std::vector<v1::JobEvent>& events, bool terminal) {
  std::vector<std::weak_ptr<EventListener>> wake;
  {
    absl::MutexLock lock(&mu_);
    const int64_t last = events_.empty() ? 0 : events_.back().seq();
    auto first = std::find_if(
        events.begin(), events.end(),
        [last](const v1::JobEvent& e) { return e.seq() > last; });
    if (first != events.end() && first->seq() != last + 1) return false;
    if (first == events.end() && (!terminal || terminal_)) return true;
    events_.insert(events_.end(), first, events.end());
    terminal_ = terminal_ || terminal;
    wake.swap(waiting_);
  }
  if (fan_out_ != nullptr) {
    fan_out_->Wake(std::move(wake));
    return true;
  }
  for (const auto& w : wake) {
    if (std::shared_ptr<EventListener> l = w.lock()) l->OnEvents();
  }
  return true;
}

int64_t EventLog::last_seq() const {
  absl::MutexLock lock(&mu_);
  return events_.empty() ? 0 : events_.back().seq();
}

bool EventLog::terminal() const {
  absl::MutexLock lock(&mu_);
  return terminal_;
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
