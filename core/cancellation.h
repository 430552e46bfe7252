// cancellation.h: CancellationToken, a flag long-running core work polls.
//
//   CancellationToken token;
//   std::thread t([&] { Distill(model, shape, options, nullptr, &token); });
//   token.Cancel();  // Distill returns absl::CancelledError() soon after.
//
// Thread-safe: Cancel() may be called from any thread (or a signal handler:
// it only stores to a lock-free atomic) while workers poll IsCancelled().
#ifndef ZEROQ_CORE_CANCELLATION_H_
#define ZEROQ_CORE_CANCELLATION_H_

#include <atomic>

#include "absl/status/status.h"

namespace zeroq::core {

class CancellationToken {
 public:
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool IsCancelled() const {
    return cancelled_.load(std::memory_order_relaxed);
  }

 private:
  std::atomic<bool> cancelled_{false};
};

// OK, or CANCELLED naming `where`, for a token that may be null.
inline absl::Status CheckCancelled(const CancellationToken* token,
                                   const char* where) {
  if (token != nullptr && token->IsCancelled()) {
    return absl::CancelledError(std::string("cancelled during ") + where);
  }
  return absl::OkStatus();
}

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_CANCELLATION_H_
