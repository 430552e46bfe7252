#include "server/watch.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"

namespace zeroq::server {

WatchStream::WatchStream(std::shared_ptr<EventLog> log, int64_t after_seq,
                         WatchSink* sink)
    : log_(std::move(log)), sink_(sink), cursor_(after_seq) {}

void WatchStream::Start() {
  {
    absl::MutexLock lock(&mu_);
    started_ = true;
    last_write_ = absl::Now();
  }
  Pump();
}

void WatchStream::OnEvents() { Pump(); }

void WatchStream::WriteDone(bool ok) {
  {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    last_write_ = absl::Now();
    if (!ok && !finish_with_)
      finish_with_ = absl::CancelledError("the client went away");
  }
  Pump();
}

void WatchStream::Cancel() {
  {
    absl::MutexLock lock(&mu_);
    if (!finish_with_) finish_with_ = absl::CancelledError("cancelled by the client");
  }
  Pump();
}

void WatchStream::AbortForShutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (!finish_with_) {
      finish_with_ = absl::UnavailableError(absl::StrCat(
          "the server is stopping; resume with after_seq=", cursor_));
    }
  }
  Pump();
}

void WatchStream::Heartbeat(absl::Time now, absl::Duration interval) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_ || writing_ || now - last_write_ < interval) return;
    heartbeat_due_ = true;
  }
  Pump();
}

void WatchStream::Pump() {
  enum { kNothing, kWrite, kFinish } action = kNothing;
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    if (!started_ || finished_ || writing_) return;
    if (finish_with_) {
      action = kFinish;
      status = *finish_with_;
    } else {
      if (buffer_.empty()) {
        std::vector<v1::JobEvent> batch;
        switch (log_->ReadAfter(cursor_, 64, &batch, shared_from_this())) {
          case EventLog::Read::kEvents:
            buffer_.insert(buffer_.end(), std::make_move_iterator(batch.begin()),
                           std::make_move_iterator(batch.end()));
            break;
          case EventLog::Read::kDone:
            action = kFinish;
            break;
          case EventLog::Read::kWait:
            break;
        }
      }
      if (!buffer_.empty()) {
        out_ = std::move(buffer_.front());
        buffer_.pop_front();
        cursor_ = out_.seq();
        heartbeat_due_ = false;
        action = kWrite;
      } else if (action == kNothing && heartbeat_due_) {
        heartbeat_due_ = false;
        out_.Clear();
        out_.set_type(v1::EVENT_HEARTBEAT);
        out_.set_seq(cursor_);
        const int64_t nanos = absl::ToUnixNanos(absl::Now());
        out_.mutable_time()->set_seconds(nanos / 1000000000);
        out_.mutable_time()->set_nanos(static_cast<int32_t>(nanos % 1000000000));
        action = kWrite;
      }
    }
    if (action == kWrite) writing_ = true;
    if (action == kFinish) finished_ = true;
  }
  if (action == kWrite) sink_->Write(out_);
  if (action == kFinish) sink_->Finish(status);
}

// ---------------------------------------------------------------- hub

WatchHub::WatchHub(absl::Duration heartbeat_interval, Metrics* metrics)
    : interval_(heartbeat_interval), metrics_(metrics) {
  thread_ = std::thread([this] { Loop(); });
}

WatchHub::~WatchHub() {
  Shutdown();
  if (thread_.joinable()) thread_.join();
}

bool WatchHub::Add(std::shared_ptr<WatchStream> stream,
                   WatchTransport transport) {
  absl::MutexLock lock(&mu_);
  if (shutdown_) return false;
  streams_.push_back({std::move(stream), transport});
  return true;
}

bool WatchHub::shut_down() {
  absl::MutexLock lock(&mu_);
  return shutdown_;
}

void WatchHub::Shutdown() {
  std::vector<Entry> streams;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;
    shutdown_ = true;
    streams.swap(streams_);
    wake_.SignalAll();
  }
  for (const Entry& e : streams) {
    if (auto s = e.stream.lock()) s->AbortForShutdown();
  }
}

void WatchHub::Loop() {
  absl::MutexLock lock(&mu_);
  while (!shutdown_) {
    wake_.WaitWithTimeout(&mu_, std::min(interval_ / 4, absl::Seconds(1)));
    if (shutdown_) break;
    std::vector<std::shared_ptr<WatchStream>> live;
    live.reserve(streams_.size());
    int64_t grpc = 0, http = 0;
    auto end = std::remove_if(streams_.begin(), streams_.end(), [&](const Entry& e) {
      std::shared_ptr<WatchStream> s = e.stream.lock();
      if (s == nullptr) return true;  // the stream has ended
      (e.transport == WatchTransport::kGrpc ? grpc : http)++;
      live.push_back(std::move(s));
      return false;
    });
    streams_.erase(end, streams_.end());
    if (metrics_) {
      metrics_->SetWatchStreams(grpc);
      metrics_->SetSseStreams(http);
    }
    mu_.Unlock();
    const absl::Time now = absl::Now();
    for (const auto& s : live) s->Heartbeat(now, interval_);
    live.clear();
    mu_.Lock();
  }
}

}  // namespace zeroq::server
