// redact.h: what a tenant may read of server-side text.
//
//   Redactor r({"/var/lib/zeroq", "/usr/local/bin"});
//   job.mutable_error()->set_message(r.ForTenant(worker_message));
//   LogWarning(ids, worker_message);          // the full text stays in the log
//
// Errors and events that reach tenants come partly from workers and from
// LibTorch, whose messages name files: blobs and job folders under the data
// folder, the worker's own path. ForTenant() replaces every path under one of
// the given roots by "<server file>" (a path runs to the next blank, quote,
// comma, semicolon or closing bracket), so tenants see what went wrong but
// never where the server keeps things. Thread-safe (immutable).
#ifndef ZEROQ_SERVER_REDACT_H_
#define ZEROQ_SERVER_REDACT_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace zeroq::server {

class Redactor {
 public:
  // `roots`: folders whose contents are private; each is also matched in its
  // absolute, normalised form. Empty roots are ignored.
  explicit Redactor(const std::vector<std::string>& roots);

  std::string ForTenant(absl::string_view text) const;

 private:
  std::vector<std::string> roots_;  // longest first
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_REDACT_H_
