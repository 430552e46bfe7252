// cli.h: the pure parts of the `zeroq` command line: per-command flag
// parsing, value parsers, the request a command line describes, exit codes,
// and the text it prints (reports, tables, progress). Nothing here does I/O
// or RPCs, so all of it is unit tested (cli_test.cc); zeroq_main.cc wires it
// to the Client.
#ifndef ZEROQ_CLIENT_CLI_H_
#define ZEROQ_CLIENT_CLI_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::client {

namespace v1 = ::zeroq::v1;

// The command's exit status.
enum ExitCode : int {
  kExitOk = 0,
  kExitError = 1,        // the server refused the call, or the job failed
  kExitUsage = 2,        // bad command line; nothing was sent
  kExitUnreachable = 3,  // no connection to the server
};

// A usage error (exit 2): INVALID_ARGUMENT with a marker, so that it is not
// confused with an INVALID_ARGUMENT the server returned (exit 1).
absl::Status UsageError(absl::string_view message);
bool IsUsageError(const absl::Status& status);
// The server could not be reached (exit 3).
absl::Status UnreachableError(absl::string_view message);
// A job that ended FAILED or CANCELLED (exit 1 whatever its error code):
// "job j-1 FAILED: <the job's error message>" with the job's code.
absl::Status JobFailedError(const v1::Job& job);
// Exit code for a failed status: usage 2; unreachable (the marker, or
// UNAVAILABLE from a call) 3; anything else 1.
int ExitCodeFor(const absl::Status& status);
// "NOT_FOUND: job \"j-x\" not found"; usage errors without the code.
std::string FormatError(const absl::Status& status);

// ------------------------------------------------------------ flags

struct FlagSpec {
  std::string name;        // without dashes, e.g. "budget"
  std::string value_name;  // e.g. "SPEC"; empty for a boolean flag
  std::string help;
  char short_name = 0;  // e.g. 'o' for -o
};

struct CommandSpec {
  std::string name;         // e.g. "submit"
  std::string synopsis;     // positional arguments, e.g. "MODEL_ID"
  std::string summary;      // one line for `zeroq help`
  std::string description;  // paragraphs for `zeroq CMD --help`
  std::vector<FlagSpec> flags;
  int min_args = 0;
  int max_args = 0;  // -1: any number
};

struct ParsedArgs {
  std::vector<std::string> args;             // positional
  std::map<std::string, std::string> flags;  // booleans: "true"/"false"
  bool help = false;                         // --help or -h seen

  bool Has(const std::string& name) const { return flags.count(name) > 0; }
  std::string Get(const std::string& name,
                  const std::string& fallback = "") const;
  bool GetBool(const std::string& name) const;
};

// Parses the arguments after the command name against the command's flags
// and `globals`: --name=value, --name value, -o value, --flag (boolean),
// --flag=true|false, "--" ends the flags. The last of repeated flags wins.
// Usage errors name the flag (and suggest a close one for a misspelling) or
// the missing or extra argument. With --help the argument count is not
// checked.
absl::StatusOr<ParsedArgs> ParseArgs(const CommandSpec& command,
                                     const std::vector<FlagSpec>& globals,
                                     const std::vector<std::string>& argv);

// `zeroq CMD --help`.
std::string CommandHelp(const CommandSpec& command,
                        const std::vector<FlagSpec>& globals);
// `zeroq help`: every command, the global flags, the exit codes.
std::string MainHelp(const std::vector<CommandSpec>& commands,
                     const std::vector<FlagSpec>& globals);

// ------------------------------------------------------------ values

// "1,28,28" -> {1, 28, 28}; every dimension positive.
absl::StatusOr<std::vector<int64_t>> ParseShape(absl::string_view flag,
                                                absl::string_view text);
// An integer in [lo, hi]; the error names the flag.
absl::StatusOr<int64_t> ParseInt(absl::string_view flag, absl::string_view text,
                                 int64_t lo, int64_t hi);
// A finite real number; the error names the flag. Its range is the
// config check's (BuildSubmitRequest).
absl::StatusOr<double> ParseReal(absl::string_view flag, absl::string_view text);
// "2,4,8" -> {2, 4, 8}, each in [lo, hi].
absl::StatusOr<std::vector<int>> ParseIntList(absl::string_view flag,
                                              absl::string_view text, int lo,
                                              int hi);
// cpu | cuda | any.
absl::StatusOr<v1::DeviceKind> ParseDevice(absl::string_view text);
// queued | running | succeeded | failed | cancelled (any case).
absl::StatusOr<v1::JobState> ParseJobState(absl::string_view text);

// The SubmitJobRequest that `submit`/`quantize` flags describe (usage errors
// for bad values, or --budget with --weight_bits). request_id is copied from
// --request_id; the caller fills a random one when it is empty. A method flag
// (--activation_range, --reconstruct) takes the schema's words
// (common/config_schema.h), in any case; a flag not given leaves its field
// unset (the server's default).
absl::StatusOr<v1::SubmitJobRequest> BuildSubmitRequest(
    const ParsedArgs& parsed, const std::string& model_id);

// ------------------------------------------------------------ text

// Enum names without their prefix: "SUCCEEDED", "DISTILL", "READY", "CPU".
std::string JobStateName(v1::JobState state);
std::string StageName(v1::Stage stage);
std::string ModelStateName(v1::ModelState state);
std::string CodeName(int code);  // google.rpc.Code -> "NOT_FOUND"

// 75 -> "1:15", 3725 -> "1:02:05".
std::string FormatClock(double seconds);
// 1536 -> "1.5 KiB".
std::string FormatBytes(double bytes);
// A timestamp in local time, "2024-05-01 12:00:03"; "-" when unset.
std::string FormatTimestamp(const google::protobuf::Timestamp& t);

// The `models` and `jobs` tables (a header line, one row each).
std::string ModelsTable(const std::vector<v1::Model>& models);
std::string JobsTable(const std::vector<v1::Job>& jobs);
// One model as `upload` prints it.
std::string DescribeModel(const v1::Model& model);
// `get JOB`: the job's state and config, and for a SUCCEEDED job its report.
std::string DescribeJob(const v1::Job& job);
// The per-layer report of a SUCCEEDED job: layers, bits, sensitivities,
// weight size, the choice, distillation, stage times, artifacts.
std::string JobReport(const v1::Job& job);
// `frontier JOB`: size KiB, average bits, total sensitivity, "*" for the
// chosen point. Empty frontier: a one-line note.
std::string FrontierTable(const v1::JobResult& result);
// Whether `point` is the result's chosen point.
bool IsChosen(const v1::JobResult& result, const v1::ParetoPoint& point);

// Turns a job's events into text: a progress bar redrawn with \r on a
// terminal, one line per event otherwise (with its seq, so a reader can see
// that none is missing). Times come from the events, so a replay of a
// finished job shows the rates it ran at.
class ProgressView {
 public:
  explicit ProgressView(bool terminal, int width = 100)
      : terminal_(terminal), width_(width) {}
  // The text to write for this event (may be empty).
  std::string OnEvent(const v1::JobEvent& event);
  // Ends an open bar line.
  std::string Finish();

 private:
  std::string Bar(const v1::JobEvent& event, absl::Time now) const;
  std::string Line(const v1::JobEvent& event) const;

  bool terminal_;
  int width_;
  bool bar_open_ = false;
  v1::Stage stage_ = v1::STAGE_UNSPECIFIED;
  absl::Time run_start_ = absl::InfinitePast();    // last RUNNING event
  absl::Time stage_start_ = absl::InfinitePast();  // first event of stage_
  int64_t stage_first_step_ = 0;
  v1::JobEvent last_progress_;
};

}  // namespace zeroq::client

#endif  // ZEROQ_CLIENT_CLI_H_
