#include "server/redact.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"

namespace zeroq::server {
namespace {

bool EndsPath(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '"' || c == '\'' ||
         c == ',' || c == ';' || c == ')' || c == ']' || c == '}' || c == '>';
}

}  // namespace

Redactor::Redactor(const std::vector<std::string>& roots) {
  namespace fs = std::filesystem;
  for (const std::string& root : roots) {
    if (root.empty()) continue;
    roots_.push_back(root);
    std::error_code ec;
    fs::path abs = fs::weakly_canonical(fs::absolute(root, ec), ec);
    if (!ec) roots_.push_back(abs.lexically_normal().string());
  }
  for (std::string& r : roots_) {
    while (r.size() > 1 && r.back() == '/') r.pop_back();
  }
  // "/" would match every path; a bare relative name such as "data" would
  // match words. Neither is a root worth hiding on its own.
  roots_.erase(std::remove_if(roots_.begin(), roots_.end(),
                              [](const std::string& r) {
                                return r == "/" || r.find('/') == std::string::npos;
                              }),
               roots_.end());
  std::sort(roots_.begin(), roots_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  roots_.erase(std::unique(roots_.begin(), roots_.end()), roots_.end());
}

std::string Redactor::ForTenant(absl::string_view text) const {
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    bool replaced = false;
    // A root counts where a path can start: at the beginning or after a
    // character that ends one.
    // An opening bracket counts too: LibTorch writes "torch.jit.load(PATH)".
    const bool path_can_start =
        i == 0 || EndsPath(text[i - 1]) || text[i - 1] == ':' ||
        text[i - 1] == '=' || text[i - 1] == '(' || text[i - 1] == '[' ||
        text[i - 1] == '{' || text[i - 1] == '<';
    if (path_can_start) {
      for (const std::string& root : roots_) {
        if (!absl::StartsWith(text.substr(i), root)) continue;
        const size_t after = i + root.size();
        if (after < text.size() && text[after] != '/' && !EndsPath(text[after]) &&
            text[after] != ':') {
          continue;  // "/data2" is not under "/data"
        }
        size_t end = after;
        while (end < text.size() && !EndsPath(text[end])) ++end;
        // A trailing period or colon ends a sentence, not the path.
        while (end > after && (text[end - 1] == '.' || text[end - 1] == ':')) --end;
        out += "<server file>";
        i = end;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += text[i++];
  }
  return out;
}

}  // namespace zeroq::server
