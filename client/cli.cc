#include "client/cli.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/config_schema.h"
#include "proto/config_check.h"

namespace zeroq::client {

namespace {

constexpr char kUsagePayload[] = "type.zeroq.dev/cli.usage";
constexpr char kUnreachablePayload[] = "type.zeroq.dev/cli.unreachable";
constexpr char kJobPayload[] = "type.zeroq.dev/cli.job";

absl::Time ToTime(const google::protobuf::Timestamp& t) {
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

bool HasTime(const google::protobuf::Timestamp& t) {
  return t.seconds() != 0 || t.nanos() != 0;
}

// Edit distance, for "did you mean" on a misspelt flag or command.
int Distance(absl::string_view a, absl::string_view b) {
  std::vector<int> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    int diagonal = row[0];
    row[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      int up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1,
                         diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

const FlagSpec* FindFlag(const std::vector<const FlagSpec*>& flags,
                         absl::string_view name) {
  for (const FlagSpec* f : flags) {
    if (f->name == name) return f;
  }
  return nullptr;
}

const FlagSpec* FindShort(const std::vector<const FlagSpec*>& flags, char c) {
  for (const FlagSpec* f : flags) {
    if (f->short_name != 0 && f->short_name == c) return f;
  }
  return nullptr;
}

std::string FlagLines(const std::vector<FlagSpec>& flags) {
  std::string out;
  for (const FlagSpec& f : flags) {
    std::string head = absl::StrCat(
        "  ",
        f.short_name ? absl::StrCat("-", std::string(1, f.short_name), ", ")
                     : "",
        "--", f.name, f.value_name.empty() ? "" : " ", f.value_name);
    constexpr size_t kColumn = 30;
    if (head.size() < kColumn - 1) {
      head.resize(kColumn, ' ');
    } else {
      head += "\n" + std::string(kColumn, ' ');
    }
    // Long lines are wrapped at word boundaries; continuation lines line up
    // under the text's start.
    constexpr size_t kWidth = 50;
    std::string wrapped;
    for (absl::string_view line : absl::StrSplit(f.help, '\n')) {
      size_t used = 0;
      if (!wrapped.empty()) wrapped += "\n";
      for (absl::string_view word : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
        if (used > 0 && used + 1 + word.size() > kWidth) {
          wrapped += "\n";
          used = 0;
        } else if (used > 0) {
          wrapped += " ";
          ++used;
        }
        absl::StrAppend(&wrapped, word);
        used += word.size();
      }
    }
    out += head +
           absl::StrReplaceAll(wrapped,
                               {{"\n", "\n" + std::string(kColumn, ' ')}}) +
           "\n";
  }
  return out;
}

std::string Pad(absl::string_view s, size_t width) {
  std::string out(s);
  if (out.size() < width) out.resize(width, ' ');
  return out;
}

std::string ShapeText(const google::protobuf::RepeatedField<int64_t>& shape) {
  return absl::StrJoin(shape, "x");
}

}  // namespace

// ------------------------------------------------------------ errors

absl::Status UsageError(absl::string_view message) {
  absl::Status s = absl::InvalidArgumentError(message);
  s.SetPayload(kUsagePayload, absl::Cord("1"));
  return s;
}

bool IsUsageError(const absl::Status& status) {
  return status.GetPayload(kUsagePayload).has_value();
}

absl::Status UnreachableError(absl::string_view message) {
  absl::Status s = absl::UnavailableError(message);
  s.SetPayload(kUnreachablePayload, absl::Cord("1"));
  return s;
}

absl::Status JobFailedError(const v1::Job& job) {
  absl::StatusCode code = static_cast<absl::StatusCode>(job.error().code());
  if (code == absl::StatusCode::kOk) code = absl::StatusCode::kUnknown;
  std::string message =
      absl::StrCat("job ", job.id(), " ", JobStateName(job.state()));
  if (!job.error().message().empty()) {
    absl::StrAppend(&message, ": ", job.error().message());
  }
  absl::Status s(code, message);
  s.SetPayload(kJobPayload, absl::Cord("1"));
  return s;
}

int ExitCodeFor(const absl::Status& status) {
  if (status.ok()) return kExitOk;
  if (IsUsageError(status)) return kExitUsage;
  if (status.GetPayload(kJobPayload).has_value()) return kExitError;
  if (status.GetPayload(kUnreachablePayload).has_value() ||
      status.code() == absl::StatusCode::kUnavailable) {
    return kExitUnreachable;
  }
  return kExitError;
}

std::string FormatError(const absl::Status& status) {
  if (IsUsageError(status) ||
      status.GetPayload(kUnreachablePayload).has_value()) {
    return std::string(status.message());
  }
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ",
                      status.message());
}

// ------------------------------------------------------------ flags

std::string ParsedArgs::Get(const std::string& name,
                            const std::string& fallback) const {
  auto it = flags.find(name);
  return it == flags.end() ? fallback : it->second;
}

bool ParsedArgs::GetBool(const std::string& name) const {
  return Get(name, "false") == "true";
}

absl::StatusOr<ParsedArgs> ParseArgs(const CommandSpec& command,
                                     const std::vector<FlagSpec>& globals,
                                     const std::vector<std::string>& argv) {
  std::vector<const FlagSpec*> flags;
  for (const FlagSpec& f : command.flags) flags.push_back(&f);
  for (const FlagSpec& f : globals) flags.push_back(&f);
  const std::string where = absl::StrCat("zeroq ", command.name);

  ParsedArgs out;
  bool flags_done = false;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (flags_done || arg.size() < 2 || arg[0] != '-') {
      out.args.push_back(arg);
      continue;
    }
    if (arg == "--") {
      flags_done = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      out.help = true;
      continue;
    }
    const FlagSpec* flag = nullptr;
    std::string name;
    std::optional<std::string> value;
    if (arg[1] == '-') {
      absl::string_view body = absl::string_view(arg).substr(2);
      size_t eq = body.find('=');
      name = std::string(body.substr(0, eq));
      if (eq != absl::string_view::npos)
        value = std::string(body.substr(eq + 1));
      flag = FindFlag(flags, name);
    } else if (arg.size() == 2) {
      flag = FindShort(flags, arg[1]);
      name = arg.substr(1);
    }
    if (flag == nullptr) {
      std::string message = absl::StrCat(where, ": unknown flag ", arg);
      const FlagSpec* best = nullptr;
      int best_distance = 3;
      for (const FlagSpec* f : flags) {
        int d = Distance(name, f->name);
        if (d < best_distance) best = f, best_distance = d;
      }
      if (best != nullptr)
        absl::StrAppend(&message, " (did you mean --", best->name, "?)");
      return UsageError(message);
    }
    if (flag->value_name.empty()) {
      std::string v = value.value_or("true");
      if (v != "true" && v != "false") {
        return UsageError(absl::StrCat(where, ": --", flag->name,
                                       " is a switch; give it no value (or "
                                       "=true/=false), not \"",
                                       v, "\""));
      }
      out.flags[flag->name] = v;
      continue;
    }
    if (!value.has_value()) {
      if (i + 1 >= argv.size()) {
        return UsageError(absl::StrCat(where, ": --", flag->name, " needs a ",
                                       flag->value_name));
      }
      value = argv[++i];
    }
    out.flags[flag->name] = *value;
  }
  if (out.help) return out;
  const int n = static_cast<int>(out.args.size());
  if (n < command.min_args) {
    std::vector<std::string> names = absl::StrSplit(command.synopsis, ' ');
    std::string missing = n < static_cast<int>(names.size())
                              ? names[n]
                              : std::string("an argument");
    return UsageError(absl::StrCat(where, ": missing ", missing, " (usage: ",
                                   where, " ", command.synopsis, ")"));
  }
  if (command.max_args >= 0 && n > command.max_args) {
    return UsageError(absl::StrCat(
        where, ": unexpected argument \"", out.args[command.max_args],
        "\" (usage: ", where, " ", command.synopsis, ")"));
  }
  return out;
}

std::string CommandHelp(const CommandSpec& command,
                        const std::vector<FlagSpec>& globals) {
  std::string out = absl::StrCat(
      "usage: zeroq ", command.name, command.synopsis.empty() ? "" : " ",
      command.synopsis, command.flags.empty() ? "" : " [options]", "\n\n",
      command.summary, "\n");
  if (!command.description.empty()) {
    absl::StrAppend(&out, "\n", command.description, "\n");
  }
  if (!command.flags.empty()) {
    absl::StrAppend(&out, "\noptions:\n", FlagLines(command.flags));
  }
  absl::StrAppend(&out, "\nglobal options:\n", FlagLines(globals),
                  "  -h, --help                  this help\n");
  return out;
}

std::string MainHelp(const std::vector<CommandSpec>& commands,
                     const std::vector<FlagSpec>& globals) {
  std::string out =
      "zeroq: the command line of the ZeroQ quantization service.\n"
      "\n"
      "usage: zeroq [global options] COMMAND [arguments] [options]\n"
      "\n"
      "commands:\n";
  size_t width = 0;
  for (const CommandSpec& c : commands) width = std::max(width, c.name.size());
  for (const CommandSpec& c : commands) {
    absl::StrAppend(&out, "  ", Pad(c.name, width + 2), c.summary, "\n");
  }
  absl::StrAppend(
      &out, "\nglobal options (before or after the command):\n",
      FlagLines(globals),
      "  -h, --help                  this help; \"zeroq COMMAND --help\" for "
      "a\n"
      "                              command's options\n",
      "\nexit status: 0 ok, 1 the server refused the request or the job "
      "failed,\n",
      "2 bad usage, 3 the server cannot be reached.\n");
  return out;
}

// ------------------------------------------------------------ values

absl::StatusOr<std::vector<int64_t>> ParseShape(absl::string_view flag,
                                                absl::string_view text) {
  std::vector<int64_t> shape;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return UsageError(absl::StrCat("--", flag, ": \"", part,
                                     "\" is not a positive integer (want "
                                     "e.g. 3,224,224)"));
    }
    shape.push_back(v);
  }
  return shape;
}

absl::StatusOr<int64_t> ParseInt(absl::string_view flag, absl::string_view text,
                                 int64_t lo, int64_t hi) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) {
    return UsageError(
        absl::StrCat("--", flag, ": \"", text, "\" is not an integer"));
  }
  if (v < lo || v > hi) {
    return UsageError(
        absl::StrCat("--", flag, ": ", v, " is out of range ", lo, "..", hi));
  }
  return v;
}

absl::StatusOr<double> ParseReal(absl::string_view flag,
                                 absl::string_view text) {
  double v = 0;
  if (!absl::SimpleAtod(text, &v) || !std::isfinite(v)) {
    return UsageError(
        absl::StrCat("--", flag, ": \"", text, "\" is not a number"));
  }
  return v;
}

absl::StatusOr<std::vector<int>> ParseIntList(absl::string_view flag,
                                              absl::string_view text, int lo,
                                              int hi) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    absl::StatusOr<int64_t> v = ParseInt(flag, part, lo, hi);
    if (!v.ok()) return v.status();
    out.push_back(static_cast<int>(*v));
  }
  return out;
}

absl::StatusOr<v1::DeviceKind> ParseDevice(absl::string_view text) {
  std::string t = absl::AsciiStrToLower(text);
  if (t == "cpu") return v1::DEVICE_CPU;
  if (t == "cuda" || t == "gpu") return v1::DEVICE_CUDA;
  if (t == "any") return v1::DEVICE_ANY;
  return UsageError(
      absl::StrCat("--device: \"", text, "\" is not one of cpu, cuda, any"));
}

absl::StatusOr<v1::JobState> ParseJobState(absl::string_view text) {
  std::string upper = absl::StrCat("JOB_", absl::AsciiStrToUpper(text));
  v1::JobState state;
  if (v1::JobState_Parse(upper, &state) && state != v1::JOB_STATE_UNSPECIFIED) {
    return state;
  }
  return UsageError(absl::StrCat("--state: \"", text,
                                 "\" is not one of queued, running, "
                                 "succeeded, failed, cancelled"));
}

absl::StatusOr<v1::SubmitJobRequest> BuildSubmitRequest(
    const ParsedArgs& p, const std::string& model_id) {
  v1::SubmitJobRequest r;
  r.set_model_id(model_id);
  v1::QuantizationConfig* c = r.mutable_config();
  if (p.Has("budget") && p.Has("weight_bits")) {
    return UsageError(
        "--budget (mixed precision) and --weight_bits (uniform) exclude each "
        "other");
  }
  if (p.Has("budget")) {
    if (p.Get("budget").empty()) return UsageError("--budget: empty");
    c->set_budget(p.Get("budget"));
  }
  // Ranges from common/config_schema.h (ParseInt bounds the number; the whole
  // config is then checked below, as the server does).
  auto int_flag = [&](const char* name, int64_t lo, int64_t hi,
                      auto set) -> absl::Status {
    if (!p.Has(name)) return absl::OkStatus();
    absl::StatusOr<int64_t> v = ParseInt(name, p.Get(name), lo, hi);
    if (!v.ok()) return v.status();
    set(*v);
    return absl::OkStatus();
  };
  auto field_flag = [&](const char* name, const IntField& field, auto set) {
    return int_flag(name, field.zero != nullptr ? 0 : field.lo, field.hi, set);
  };
  // Any finite number: the range is checked with the whole config below.
  auto real_flag = [&](const char* name, auto set) -> absl::Status {
    if (!p.Has(name)) return absl::OkStatus();
    absl::StatusOr<double> v = ParseReal(name, p.Get(name));
    if (!v.ok()) return v.status();
    set(*v);
    return absl::OkStatus();
  };
  // A method's word: its index from 1 is the proto enum's value.
  auto choice_flag = [&](const char* name, const ChoiceField& field,
                         auto set) -> absl::Status {
    if (!p.Has(name)) return absl::OkStatus();
    const std::string word = absl::AsciiStrToLower(p.Get(name));
    const int i = field.Find(word);
    if (i < 0) {
      return UsageError(absl::StrCat("--", name, ": \"", p.Get(name),
                                     "\" is not ", field.Describe()));
    }
    set(i + 1);
    return absl::OkStatus();
  };
  absl::Status s;
  if (!(s = field_flag("weight_bits", kWeightBits,
                       [&](int64_t v) { c->set_weight_bits(v); }))
           .ok() ||
      !(s = field_flag("activation_bits", kActivationBits,
                       [&](int64_t v) { c->set_activation_bits(v); }))
           .ok() ||
      !(s = field_flag(
            "iterations", kIterations,
            [&](int64_t v) { c->mutable_distillation()->set_iterations(v); }))
           .ok() ||
      !(s = field_flag(
            "batch_size", kBatchSize,
            [&](int64_t v) { c->mutable_distillation()->set_batch_size(v); }))
           .ok() ||
      !(s = int_flag(
            "seed", 0, std::numeric_limits<int64_t>::max(),
            [&](int64_t v) { c->mutable_distillation()->set_seed(v); }))
           .ok() ||
      !(s = field_flag("threads", kThreads,
                       [&](int64_t v) { c->set_threads(v); }))
           .ok() ||
      !(s = choice_flag("activation_range", kActivationRange,
                        [&](int v) {
                          c->set_activation_range(
                              static_cast<v1::ActivationRange>(v));
                        }))
           .ok() ||
      !(s = real_flag("activation_percentile",
                      [&](double v) { c->set_activation_percentile(v); }))
           .ok() ||
      !(s = field_flag("early_stop_window", kEarlyStopWindow,
                       [&](int64_t v) {
                         c->mutable_distillation()->set_early_stop_window(v);
                       }))
           .ok() ||
      !(s = real_flag("early_stop_tolerance",
                      [&](double v) {
                        c->mutable_distillation()->set_early_stop_tolerance(v);
                      }))
           .ok() ||
      !(s = real_flag("tv_weight",
                      [&](double v) {
                        c->mutable_distillation()->set_tv_weight(v);
                      }))
           .ok() ||
      !(s = choice_flag("reconstruct", kReconstruct,
                        [&](int v) {
                          c->set_reconstruct(
                              static_cast<v1::ReconstructMethod>(v));
                        }))
           .ok() ||
      !(s = field_flag("reconstruct_iterations", kReconstructIterations,
                       [&](int64_t v) {
                         c->mutable_reconstruction()->set_iterations(v);
                       }))
           .ok() ||
      !(s = int_flag("priority", -100, 100, [&](int64_t v) {
          r.set_priority(v);
        })).ok()) {
    return s;
  }
  if (p.Has("candidate_bits")) {
    absl::StatusOr<std::vector<int>> bits =
        ParseIntList("candidate_bits", p.Get("candidate_bits"), kCandidateBits.lo,
                     kCandidateBits.hi);
    if (!bits.ok()) return bits.status();
    for (int b : *bits) c->add_candidate_bits(b);
  }
  if (p.Has("device")) {
    absl::StatusOr<v1::DeviceKind> d = ParseDevice(p.Get("device"));
    if (!d.ok()) return d.status();
    r.set_device(*d);
  }
  if (p.Has("sensitivity_from")) {
    c->set_sensitivity_from_job(p.Get("sensitivity_from"));
  }
  r.set_request_id(p.Get("request_id"));
  // The server's own check of the ranges: a bad value is a usage error here,
  // before anything is sent.
  if (absl::Status check = ValidateQuantizationConfig(*c); !check.ok()) {
    return UsageError(check.message());
  }
  return r;
}

// ------------------------------------------------------------ text

std::string JobStateName(v1::JobState state) {
  return std::string(absl::StripPrefix(v1::JobState_Name(state), "JOB_"));
}

std::string StageName(v1::Stage stage) {
  return std::string(absl::StripPrefix(v1::Stage_Name(stage), "STAGE_"));
}

std::string ModelStateName(v1::ModelState state) {
  return std::string(absl::StripPrefix(v1::ModelState_Name(state), "MODEL_"));
}

std::string CodeName(int code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

std::string FormatClock(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "-:--";
  int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) {
    return absl::StrFormat("%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60);
  }
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

std::string FormatBytes(double bytes) {
  if (bytes < 1024) return absl::StrFormat("%.0f B", bytes);
  if (bytes < 1024 * 1024) return absl::StrFormat("%.1f KiB", bytes / 1024);
  if (bytes < 1024.0 * 1024 * 1024) {
    return absl::StrFormat("%.1f MiB", bytes / (1024 * 1024));
  }
  return absl::StrFormat("%.2f GiB", bytes / (1024.0 * 1024 * 1024));
}

std::string FormatTimestamp(const google::protobuf::Timestamp& t) {
  if (!HasTime(t)) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S", ToTime(t),
                          absl::LocalTimeZone());
}

std::string ModelsTable(const std::vector<v1::Model>& models) {
  std::string out =
      absl::StrFormat("%-22s  %-10s  %-10s  %10s  %-19s  %s\n", "ID", "STATE",
                      "INPUT", "SIZE", "CREATED", "NAME");
  for (const v1::Model& m : models) {
    absl::StrAppendFormat(&out, "%-22s  %-10s  %-10s  %10s  %-19s  %s\n",
                          m.id(), ModelStateName(m.state()),
                          ShapeText(m.input_shape()),
                          FormatBytes(m.size_bytes()),
                          FormatTimestamp(m.create_time()), m.name());
  }
  return out;
}

std::string JobsTable(const std::vector<v1::Job>& jobs) {
  std::string out = absl::StrFormat(
      "%-22s  %-22s  %-9s  %-11s  %8s  %-10s  %s\n", "ID", "MODEL", "STATE",
      "STAGE", "PROGRESS", "DEVICE", "CREATED");
  for (const v1::Job& j : jobs) {
    std::string progress =
        j.total() > 0 ? absl::StrFormat("%.0f%%", 100.0 * j.step() / j.total())
                      : "-";
    absl::StrAppendFormat(
        &out, "%-22s  %-22s  %-9s  %-11s  %8s  %-10s  %s\n", j.id(),
        j.model_id(), JobStateName(j.state()),
        j.stage() == v1::STAGE_UNSPECIFIED ? "-" : StageName(j.stage()),
        progress, j.device().empty() ? "-" : j.device(),
        FormatTimestamp(j.create_time()));
  }
  return out;
}

std::string DescribeModel(const v1::Model& m) {
  std::string out = absl::StrFormat(
      "model %s: %s, input %s, %s, sha256 %s%s\n  state %s", m.id(), m.name(),
      ShapeText(m.input_shape()), FormatBytes(m.size_bytes()),
      m.sha256().substr(0, 16), m.deduplicated() ? " (already stored)" : "",
      ModelStateName(m.state()));
  if (!m.state_reason().empty()) absl::StrAppend(&out, ": ", m.state_reason());
  absl::StrAppend(&out, "\n");
  if (m.state() == v1::MODEL_READY) {
    const v1::ModelSummary& s = m.summary();
    absl::StrAppendFormat(
        &out,
        "  %d BatchNorm layers, %d quantizable layers, %d parameters "
        "(%d quantizable), output %s\n",
        s.bn_layers_size(), s.layers_size(), s.total_params(),
        s.quantizable_params(), ShapeText(s.output_shape()));
  }
  return out;
}

std::string DescribeJob(const v1::Job& j) {
  std::string out = absl::StrFormat("job %s (model %s, tenant %s)\n", j.id(),
                                    j.model_id(), j.tenant());
  absl::StrAppendFormat(&out, "  state     %s", JobStateName(j.state()));
  if (j.state() == v1::JOB_RUNNING && j.total() > 0) {
    absl::StrAppendFormat(&out, ", %s %d/%d", StageName(j.stage()), j.step(),
                          j.total());
  } else if (j.stage() != v1::STAGE_UNSPECIFIED) {
    absl::StrAppendFormat(&out, ", last stage %s", StageName(j.stage()));
  }
  if (j.cancel_requested() && j.state() == v1::JOB_RUNNING) {
    absl::StrAppend(&out, " (cancellation requested, the worker is stopping)");
  }
  absl::StrAppend(&out, "\n");
  if (j.error().code() != 0 || !j.error().message().empty()) {
    absl::StrAppendFormat(&out, "  error     %s: %s\n",
                          CodeName(j.error().code()), j.error().message());
  }
  absl::StrAppendFormat(
      &out, "  device    %s (wanted %s), attempts %d\n",
      j.device().empty() ? "-" : j.device(),
      absl::AsciiStrToLower(absl::StripPrefix(
          v1::DeviceKind_Name(j.device_preference()), "DEVICE_")),
      j.attempts());
  if (j.worker_crashes() > 0 || j.server_restarts() > 0) {
    absl::StrAppendFormat(&out, "  restarts  %d worker crash%s, %d server restart%s\n",
                          j.worker_crashes(), j.worker_crashes() == 1 ? "" : "es",
                          j.server_restarts(), j.server_restarts() == 1 ? "" : "s");
  }
  for (const v1::JobAttempt& a : j.attempt_history()) {
    absl::StrAppendFormat(&out, "  attempt %d on %s: %s", a.number(), a.device(),
                          a.outcome());
    if (a.end_time().seconds() > 0) {
      const double seconds =
          (a.end_time().seconds() - a.start_time().seconds()) +
          (a.end_time().nanos() - a.start_time().nanos()) / 1e9;
      absl::StrAppendFormat(&out, " after %.1f s", seconds);
    }
    if (!a.reason().empty()) absl::StrAppend(&out, " (", a.reason(), ")");
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppendFormat(&out, "  priority  %d%s\n", j.priority(),
                        j.request_id().empty()
                            ? ""
                            : absl::StrCat(", request id ", j.request_id()));
  absl::StrAppendFormat(&out, "  config    %s\n",
                        j.config().ShortDebugString().empty()
                            ? "(defaults)"
                            : j.config().ShortDebugString());
  absl::StrAppendFormat(&out, "  created   %s\n",
                        FormatTimestamp(j.create_time()));
  if (HasTime(j.start_time())) {
    absl::StrAppendFormat(&out, "  started   %s\n",
                          FormatTimestamp(j.start_time()));
  }
  if (HasTime(j.end_time())) {
    absl::StrAppendFormat(&out, "  ended     %s\n",
                          FormatTimestamp(j.end_time()));
  }
  if (j.state() == v1::JOB_SUCCEEDED) absl::StrAppend(&out, "\n", JobReport(j));
  return out;
}

std::string JobReport(const v1::Job& j) {
  const v1::JobResult& r = j.result();
  std::string out;
  double seconds = 0;
  if (HasTime(j.start_time()) && HasTime(j.end_time())) {
    seconds =
        absl::ToDoubleSeconds(ToTime(j.end_time()) - ToTime(j.start_time()));
  }
  absl::StrAppendFormat(&out, "job %s %s in %.1f s on %s, %d thread%s\n\n",
                        j.id(), JobStateName(j.state()), seconds, r.device(),
                        r.threads(), r.threads() == 1 ? "" : "s");
  absl::StrAppendFormat(&out, "%-28s %-13s %9s %4s  %s\n", "layer", "op",
                        "params", "bits", "sensitivity per width");
  for (const v1::LayerResult& l : r.layers()) {
    std::vector<std::string> sens;
    for (int i = 0; i < l.candidate_bits_size() && i < l.sensitivity_size();
         ++i) {
      sens.push_back(
          absl::StrFormat("%d:%.3g", l.candidate_bits(i), l.sensitivity(i)));
    }
    absl::StrAppendFormat(&out, "%-28s %-13s %9d %4s  %s\n", l.name(), l.op(),
                          l.params(),
                          l.bits() == 0 ? "fp" : absl::StrCat(l.bits()),
                          absl::StrJoin(sens, "  "));
  }
  const double avg_bits = r.quantizable_params() > 0
                              ? 8 * r.weight_bytes() / r.quantizable_params()
                              : 0;
  absl::StrAppendFormat(&out, "\nweights: %s float -> %s (%.2f bits average",
                        FormatBytes(r.float_weight_bytes()),
                        FormatBytes(r.weight_bytes()), avg_bits);
  if (r.budget_bits() > 0) {
    absl::StrAppendFormat(&out, "; budget %s",
                          FormatBytes(r.budget_bits() / 8.0));
  }
  absl::StrAppend(&out, ")\n");
  if (r.activations_size() > 0) {
    std::vector<std::string> widths;
    for (const v1::ActivationResult& a : r.activations()) {
      widths.push_back(a.bits() == 0 ? "fp" : absl::StrCat(a.bits()));
    }
    absl::StrAppendFormat(&out, "activations: %d quantized points, bits %s\n",
                          r.activations_size(), absl::StrJoin(widths, ","));
  }
  if (r.frontier_size() > 0) {
    absl::StrAppendFormat(
        &out, "Pareto frontier: %d points; chosen %s, total sensitivity %.4g",
        r.frontier_size(), FormatBytes(r.chosen().size_bits() / 8.0),
        r.chosen().sensitivity());
    if (r.measured_points_size() > 0) {
      absl::StrAppendFormat(&out, ", the closest to float of %d measured",
                            r.measured_points_size());
    }
    absl::StrAppend(&out, "\n");
  }
  const v1::ReconstructionResult& rec = r.reconstruction();
  if (!rec.method().empty() && rec.method() != "none") {
    double before = 0, after = 0;
    for (const v1::ReconstructedUnit& u : rec.units()) {
      before += u.error_before();
      after += u.error_after();
    }
    absl::StrAppendFormat(&out,
                          "learned rounding: %s, %d units x %d steps; output "
                          "error summed over them %.4g -> %.4g\n",
                          rec.method(), rec.units_size(), rec.iterations(),
                          before, after);
  }
  absl::StrAppendFormat(&out,
                        "calibration: %s, %d samples; distillation loss %.4g "
                        "-> %.4g, image prior weight %g\n",
                        r.calibration(), r.samples(), r.distill_initial_loss(),
                        r.distill_final_loss(), r.distill_tv_weight());
  absl::StrAppendFormat(&out,
                        "quantized vs float on the calibration data: top-1 "
                        "agreement %.1f%%, mean KL %.4g\n",
                        100 * r.top1_agreement(), r.mean_kl());
  std::vector<std::string> stages;
  for (const v1::StageTime& t : r.stage_seconds()) {
    stages.push_back(
        absl::StrFormat("%s %.2fs", StageName(t.stage()), t.seconds()));
  }
  if (!stages.empty()) {
    absl::StrAppend(&out, "stages: ", absl::StrJoin(stages, ", "), "\n");
  }
  std::vector<std::string> artifacts;
  for (const v1::Artifact& a : r.artifacts()) {
    artifacts.push_back(
        absl::StrFormat("%s (%s)", a.name(), FormatBytes(a.size_bytes())));
  }
  if (!artifacts.empty()) {
    absl::StrAppend(&out, "artifacts: ", absl::StrJoin(artifacts, ", "), "\n");
  }
  return out;
}

bool IsChosen(const v1::JobResult& result, const v1::ParetoPoint& point) {
  const v1::ParetoPoint& c = result.chosen();
  if (point.size_bits() != c.size_bits()) return false;
  if (point.bits_size() != c.bits_size()) return false;
  for (int i = 0; i < point.bits_size(); ++i) {
    if (point.bits(i) != c.bits(i)) return false;
  }
  return true;
}

std::string FrontierTable(const v1::JobResult& r) {
  if (r.frontier_size() == 0) {
    return "no Pareto frontier: the job was not a mixed-precision job\n";
  }
  const double params = std::max<double>(1, r.quantizable_params());
  std::string out =
      absl::StrFormat("%4s  %10s  %8s  %14s  %-6s  %s\n", "#", "size KiB",
                      "avg bits", "sensitivity", "chosen", "bits per layer");
  bool marked = false;
  for (int i = 0; i < r.frontier_size(); ++i) {
    const v1::ParetoPoint& p = r.frontier(i);
    marked = marked || IsChosen(r, p);
    absl::StrAppendFormat(&out, "%4d  %10.2f  %8.3f  %14.6g  %-6s  %s\n", i,
                          p.size_bits() / 8.0 / 1024, p.size_bits() / params,
                          p.sensitivity(), IsChosen(r, p) ? "*" : "",
                          absl::StrJoin(p.bits(), ","));
  }
  // The job measures the points nearest the budget and the uniform width
  // end to end; a uniform choice need not lie on the frontier.
  if (!marked && r.chosen().size_bits() > 0) {
    const v1::ParetoPoint& c = r.chosen();
    absl::StrAppendFormat(&out, "%4s  %10.2f  %8.3f  %14.6g  %-6s  %s\n", "-",
                          c.size_bits() / 8.0 / 1024, c.size_bits() / params,
                          c.sensitivity(), "*", absl::StrJoin(c.bits(), ","));
  }
  absl::StrAppendFormat(&out, "%d points; * marks the chosen one (budget %s)\n",
                        r.frontier_size(),
                        r.budget_bits() > 0 ? FormatBytes(r.budget_bits() / 8.0)
                                            : std::string("none"));
  if (r.measured_points_size() > 0) {
    absl::StrAppendFormat(&out,
                          "\nmeasured end to end (output KL against float on "
                          "the calibration data):\n%10s  %8s  %12s  %13s  %s\n",
                          "size KiB", "avg bits", "output KL", "after rounding",
                          "");
    for (const v1::MeasuredPoint& m : r.measured_points()) {
      const v1::ParetoPoint& p = m.point();
      absl::StrAppendFormat(
          &out, "%10.2f  %8.3f  %12.4g  %13s  %s\n", p.size_bits() / 8.0 / 1024,
          p.size_bits() / params, m.output_kl(),
          m.has_reconstructed_kl() ? absl::StrFormat("%.4g", m.reconstructed_kl())
                                   : std::string("-"),
          absl::StrCat(m.uniform() ? "uniform " : "", IsChosen(r, p) ? "*" : ""));
    }
  }
  return out;
}

// ------------------------------------------------------------ progress

std::string ProgressView::OnEvent(const v1::JobEvent& e) {
  const absl::Time now = ToTime(e.time());
  if (e.type() == v1::EVENT_STATE && e.state() == v1::JOB_RUNNING) {
    run_start_ = now;
    stage_ = v1::STAGE_UNSPECIFIED;  // a restarted attempt starts over
  }
  const bool staged = e.type() == v1::EVENT_PROGRESS ||
                      e.type() == v1::EVENT_SENSITIVITY ||
                      e.type() == v1::EVENT_PARETO;
  const bool new_stage = staged && e.stage() != stage_;
  if (new_stage) {
    stage_ = e.stage();
    stage_start_ = now;
    stage_first_step_ = e.step();
  }
  if (staged) last_progress_ = e;

  if (!terminal_) {
    return e.type() == v1::EVENT_HEARTBEAT ? "" : Line(e) + "\n";
  }
  std::string out;
  if (e.type() == v1::EVENT_HEARTBEAT) {
    // Only the clock moves: redraw the open bar with the heartbeat's time.
    if (bar_open_ && HasTime(e.time())) out = Bar(last_progress_, now);
    return out;
  }
  if (!staged) {
    // States and messages get their own line above the bar.
    if (bar_open_) out = "\n";
    bar_open_ = false;
    return out + Line(e) + "\n";
  }
  if (new_stage && bar_open_) out = "\n";  // keep the finished stage's bar
  bar_open_ = true;
  return out + Bar(e, now);
}

std::string ProgressView::Finish() {
  if (!terminal_ || !bar_open_) return "";
  bar_open_ = false;
  return "\n";
}

std::string ProgressView::Bar(const v1::JobEvent& e, absl::Time now) const {
  const double fraction =
      e.total() > 0
          ? std::clamp(static_cast<double>(e.step()) / e.total(), 0.0, 1.0)
          : 0.0;
  constexpr int kBarWidth = 20;
  const int filled = static_cast<int>(fraction * kBarWidth);
  std::string bar(filled, '#');
  bar.resize(kBarWidth, '.');
  std::string detail;
  if (e.type() == v1::EVENT_PROGRESS && e.loss() != 0) {
    detail = absl::StrFormat("loss %.4g", e.loss());
  } else if (e.type() == v1::EVENT_SENSITIVITY) {
    detail = absl::StrFormat("%s W%d", e.layer(), e.bits());
  } else if (e.type() == v1::EVENT_PARETO) {
    detail = absl::StrFormat("%.1f KiB", e.size_bits() / 8.0 / 1024);
  } else {
    detail = e.message();
  }
  std::string clock;
  if (run_start_ != absl::InfinitePast()) {
    clock = FormatClock(absl::ToDoubleSeconds(now - run_start_));
  }
  // ETA of the stage from its rate so far (steps per second since the
  // stage's first event).
  std::string eta;
  const double stage_secs = absl::ToDoubleSeconds(now - stage_start_);
  const int64_t done = e.step() - stage_first_step_;
  if (e.total() > 0 && e.step() < e.total() && done > 0 && stage_secs > 0) {
    eta = "  ETA " + FormatClock((e.total() - e.step()) * stage_secs / done);
  }
  std::string line = absl::StrFormat("\r%-11s [%s] %3.0f%%  %-28.28s  %s%s",
                                     StageName(e.stage()), bar, 100 * fraction,
                                     detail, clock, eta);
  if (static_cast<int>(line.size()) > width_ + 1) line.resize(width_ + 1);
  return line + "\x1b[K";  // clear what a longer previous line left
}

std::string ProgressView::Line(const v1::JobEvent& e) const {
  std::string head = absl::StrFormat("[%5d]", e.seq());
  switch (e.type()) {
    case v1::EVENT_STATE: {
      std::string line =
          absl::StrFormat("%s %s", head, JobStateName(e.state()));
      if (e.error().code() != 0) {
        absl::StrAppend(&line, " ", CodeName(e.error().code()), ": ",
                        e.error().message());
      } else if (!e.message().empty()) {
        absl::StrAppend(&line, ": ", e.message());
      }
      return line;
    }
    case v1::EVENT_PROGRESS: {
      std::string line = absl::StrFormat(
          "%s %-11s %d/%d", head, StageName(e.stage()), e.step(), e.total());
      if (e.loss() != 0) absl::StrAppendFormat(&line, " loss %.4g", e.loss());
      if (e.lr() != 0) absl::StrAppendFormat(&line, " lr %.3g", e.lr());
      if (!e.message().empty()) absl::StrAppend(&line, " ", e.message());
      return line;
    }
    case v1::EVENT_SENSITIVITY:
      return absl::StrFormat("%s %-11s %d/%d %s W%d omega %.4g", head,
                             StageName(e.stage()), e.step(), e.total(),
                             e.layer(), e.bits(), e.omega());
    case v1::EVENT_PARETO:
      return absl::StrFormat("%s %-11s frontier point %.2f KiB omega %.4g%s",
                             head, StageName(e.stage()),
                             e.size_bits() / 8.0 / 1024, e.omega(),
                             e.chosen() ? " (chosen)" : "");
    case v1::EVENT_MESSAGE:
      if (e.stage() == v1::STAGE_UNSPECIFIED) {
        return absl::StrCat(head, " ", e.message());
      }
      return absl::StrFormat("%s %-11s %s", head, StageName(e.stage()),
                             e.message());
    default:
      return absl::StrFormat("%s %s", head, e.message());
  }
}

}  // namespace zeroq::client
