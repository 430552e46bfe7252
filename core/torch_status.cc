#include "core/torch_status.h"

#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace zeroq::core {

std::string CleanTorchMessage(absl::string_view what) {
  // LibTorch messages end with "Exception raised from ... (most recent call
  // first):" and a list of frames; TorchScript errors carry a "Traceback"
  // first. Keep the lines that say what went wrong.
  std::vector<std::string> kept;
  for (absl::string_view line : absl::StrSplit(what, '\n')) {
    if (absl::StartsWith(line, "Exception raised from")) break;
    if (absl::StartsWith(line, "frame #")) continue;
    absl::string_view trimmed = absl::StripAsciiWhitespace(line);
    if (trimmed.empty()) continue;
    kept.emplace_back(trimmed);
  }
  // Script errors put the real message last ("RuntimeError: ...").
  for (auto it = kept.rbegin(); it != kept.rend(); ++it) {
    size_t pos = it->find("Error: ");
    if (pos != std::string::npos && pos < 40) return it->substr(pos + 7);
  }
  if (kept.empty()) return std::string(absl::StripAsciiWhitespace(what));
  if (kept.size() > 3) kept.resize(3);
  return absl::StrJoin(kept, " ");
}

namespace internal {
absl::Status FromTorchError(absl::string_view context, const c10::Error& e,
                            absl::StatusCode code) {
  return absl::Status(code,
                      absl::StrCat(context, ": ", CleanTorchMessage(e.what())));
}

bool IsOutOfMemoryText(absl::string_view what) {
  return absl::StrContains(what, "out of memory");
}
}  // namespace internal

}  // namespace zeroq::core
