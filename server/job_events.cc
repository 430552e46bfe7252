#include "server/job_events.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/log.h"
#include "server/records.h"

namespace zeroq::server {

bool IsTerminalEvent(const v1::JobEvent& event) {
  return event.type() == v1::EVENT_STATE && IsTerminal(event.state());
}

namespace {

bool EndsJob(const std::vector<v1::JobEvent>& events) {
  return !events.empty() && IsTerminalEvent(events.back());
}

}  // namespace

JobEvents::JobEvents(JobStore* store, absl::Duration poll)
    : store_(store), poll_(poll) {
  follower_ = std::thread([this] { Loop(); });
}

JobEvents::~JobEvents() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  follower_.join();
}

absl::StatusOr<std::shared_ptr<EventLog>> JobEvents::Watch(
    const std::string& job_id) {
  {
    absl::MutexLock lock(&mu_);
    auto it = logs_.find(job_id);
    if (it != logs_.end()) {
      if (std::shared_ptr<EventLog> log = it->second.lock()) return log;
    }
  }
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::JobEvent> history,
                      store_->ListEvents(job_id, 0));
  const bool ended = EndsJob(history);
  auto log = std::make_shared<EventLog>(std::move(history), ended, &fan_out_);
  if (ended) return log;  // nothing more will come
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = logs_.try_emplace(job_id, log);
  if (!inserted) {
    // Another watcher came at the same moment: share its log.
    if (std::shared_ptr<EventLog> theirs = it->second.lock()) return theirs;
    it->second = log;
  }
  // Whatever was stored between the read and now is read at once.
  dirty_.insert(job_id);
  return log;
}

void JobEvents::Stored(const std::string& job_id,
                       const std::vector<v1::JobEvent>& events) {
  if (events.empty()) return;
  std::shared_ptr<EventLog> log;
  {
    absl::MutexLock lock(&mu_);
    auto it = logs_.find(job_id);
    if (it == logs_.end()) return;  // nobody watches it here
    log = it->second.lock();
    if (log == nullptr) {
      logs_.erase(it);
      return;
    }
  }
  if (!log->Append(events, EndsJob(events))) {
    Changed(job_id);  // out of step: the follower reads the store
    return;
  }
  if (log->terminal()) {
    absl::MutexLock lock(&mu_);
    logs_.erase(job_id);
  }
}

void JobEvents::Changed(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  if (logs_.contains(job_id)) dirty_.insert(job_id);
}

int JobEvents::followed() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(logs_.size());
}

void JobEvents::CatchUp(const std::string& job_id,
                        const std::shared_ptr<EventLog>& log) {
  absl::StatusOr<std::vector<v1::JobEvent>> events =
      store_->ListEvents(job_id, log->last_seq());
  if (!events.ok()) {
    // Tried again at the next poll; the watchers wait meanwhile.
    LogWarning({"", job_id, ""}, absl::StrCat("reading events: ",
                                              events.status().message()));
    return;
  }
  if (!events->empty()) log->Append(*events, EndsJob(*events));
}

void JobEvents::Loop() {
  absl::Time next_poll = absl::Now() + poll_;
  while (true) {
    std::vector<std::pair<std::string, std::shared_ptr<EventLog>>> work;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !dirty_.empty();
      };
      mu_.AwaitWithDeadline(absl::Condition(&ready), next_poll);
      if (stopping_) return;
      const bool poll_all = absl::Now() >= next_poll;
      if (poll_all) next_poll = absl::Now() + poll_;
      for (auto it = logs_.begin(); it != logs_.end();) {
        std::shared_ptr<EventLog> log = it->second.lock();
        if (log == nullptr || log->terminal()) {
          logs_.erase(it++);
          continue;
        }
        if (poll_all || dirty_.contains(it->first))
          work.emplace_back(it->first, std::move(log));
        ++it;
      }
      dirty_.clear();
    }
    for (const auto& [id, log] : work) CatchUp(id, log);
  }
}

}  // namespace zeroq::server
