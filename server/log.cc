#include "server/log.h"

#include <unistd.h>

#include <atomic>
#include <string>

#include "absl/base/const_init.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace zeroq::server {
namespace {

std::atomic<LogFormat> g_format{LogFormat::kText};
ABSL_CONST_INIT absl::Mutex g_mu(absl::kConstInit);

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarning:
      return "WARNING";
    case LogLevel::kError:
      return "ERROR";
  }
  return "INFO";
}

}  // namespace

void SetLogFormat(LogFormat format) { g_format.store(format); }

std::string FormatLogLine(LogLevel level, const LogIds& ids,
                          absl::string_view message, LogFormat format) {
  std::string time = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(),
                                      absl::UTCTimeZone());
  if (format == LogFormat::kJson) {
    nlohmann::json j;
    j["time"] = time;
    j["level"] = LevelName(level);
    if (!ids.tenant.empty()) j["tenant"] = ids.tenant;
    if (!ids.job.empty()) j["job"] = ids.job;
    if (!ids.model.empty()) j["model"] = ids.model;
    j["msg"] = std::string(message);
    // Invalid UTF-8 (a model's name, say) is replaced, never a throw.
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  std::string line = absl::StrCat(time, " ", LevelName(level));
  if (!ids.tenant.empty()) absl::StrAppend(&line, " tenant=", ids.tenant);
  if (!ids.job.empty()) absl::StrAppend(&line, " job=", ids.job);
  if (!ids.model.empty()) absl::StrAppend(&line, " model=", ids.model);
  absl::StrAppend(&line, " ", message);
  return line;
}

void Log(LogLevel level, const LogIds& ids, absl::string_view message) {
  std::string line = FormatLogLine(level, ids, message, g_format.load());
  line.push_back('\n');
  absl::MutexLock lock(&g_mu);
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::write(2, line.data() + done, line.size() - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

}  // namespace zeroq::server
