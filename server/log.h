// log.h: the server's log lines, on stderr: time, level, tenant, job and
// model ids, message. Text by default, JSON lines with SetLogFormat(kJson).
//
//   LogInfo({.tenant = "acme", .job = job.id()}, "queued");
//   // 2026-12-01T03:50:00.123Z INFO tenant=acme job=j-1f.. queued
//   //
//   {"time":"2026-12-01T03:50:00.123Z","level":"INFO","tenant":"acme","job":"j-1f..","msg":"queued"}
//
// Thread-safe: a line is written whole.
#ifndef ZEROQ_SERVER_LOG_H_
#define ZEROQ_SERVER_LOG_H_

#include <string>

#include "absl/strings/string_view.h"

namespace zeroq::server {

enum class LogFormat { kText, kJson };
enum class LogLevel { kInfo, kWarning, kError };

struct LogIds {
  std::string tenant, job, model;
};

void SetLogFormat(LogFormat format);
// The line as written (without the newline); for tests.
std::string FormatLogLine(LogLevel level, const LogIds& ids,
                          absl::string_view message, LogFormat format);
void Log(LogLevel level, const LogIds& ids, absl::string_view message);

inline void LogInfo(const LogIds& ids, absl::string_view m) {
  Log(LogLevel::kInfo, ids, m);
}
inline void LogWarning(const LogIds& ids, absl::string_view m) {
  Log(LogLevel::kWarning, ids, m);
}
inline void LogError(const LogIds& ids, absl::string_view m) {
  Log(LogLevel::kError, ids, m);
}

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_LOG_H_
