// torch_status.h: the core's one boundary between LibTorch exceptions and
// absl::Status. No exception leaves the core.
//
//   absl::StatusOr<torch::Tensor> out = CallTorch("forward", [&] {
//     return module.forward({x}).toTensor();
//   });
//
// A c10::Error, or the runtime_error the TorchScript interpreter turns it
// into, becomes the given code (INVALID_ARGUMENT unless said otherwise) with
// LibTorch's message, stripped of its C++ backtrace and script traceback;
// A device out of memory (c10::OutOfMemoryError, e.g. CUDA's, also when the
// interpreter rethrows it as text) and std::bad_alloc become
// RESOURCE_EXHAUSTED; any other exception INTERNAL.
#ifndef ZEROQ_CORE_TORCH_STATUS_H_
#define ZEROQ_CORE_TORCH_STATUS_H_

#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "c10/util/Exception.h"

namespace zeroq::core {

// LibTorch's message without the C++ frames and "Exception raised from" tail.
std::string CleanTorchMessage(absl::string_view what);

namespace internal {
absl::Status FromTorchError(absl::string_view context, const c10::Error& e,
                            absl::StatusCode code);
// True for the text of a device out-of-memory error ("CUDA out of memory").
bool IsOutOfMemoryText(absl::string_view what);
}  // namespace internal

// Runs fn, mapping exceptions to a Status prefixed by `context`.
template <typename Fn>
auto CallTorch(absl::string_view context, Fn&& fn,
               absl::StatusCode code = absl::StatusCode::kInvalidArgument)
    -> std::conditional_t<std::is_void_v<decltype(fn())>, absl::Status,
                          absl::StatusOr<decltype(fn())>> {
  try {
    if constexpr (std::is_void_v<decltype(fn())>) {
      fn();
      return absl::OkStatus();
    } else {
      return fn();
    }
  } catch (const c10::OutOfMemoryError& e) {
    return internal::FromTorchError(context, e,
                                    absl::StatusCode::kResourceExhausted);
  } catch (const c10::Error& e) {
    return internal::FromTorchError(context, e, code);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(context, ": out of memory"));
  } catch (const std::runtime_error& e) {
    // The TorchScript interpreter rethrows an op's c10::Error as a
    // runtime_error carrying the script traceback: keep its last message.
    return absl::Status(internal::IsOutOfMemoryText(e.what())
                            ? absl::StatusCode::kResourceExhausted
                            : code,
                        absl::StrCat(context, ": ", CleanTorchMessage(e.what())));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(context, ": ", e.what()));
  }
}

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_TORCH_STATUS_H_
