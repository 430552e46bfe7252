// zeroq: the command line of the ZeroQ quantization service.
//
//   zeroq quantize model.pt --input_shape 3,224,224 --budget MP4 -o out/
//   zeroq upload model.pt --input_shape 1,28,28
//   zeroq submit m-... --budget MP4 && zeroq watch j-...
//
// `zeroq help` lists the commands, `zeroq CMD --help` a command's options.
// Exit status: 0 ok, 1 the server refused the request or the job failed,
// 2 bad usage (nothing was sent), 3 the server cannot be reached.
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cli.h"
#include "client/client.h"
#include "client/svg.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"

namespace zeroq::client {
namespace {

namespace fs = std::filesystem;

// ------------------------------------------------------------ the commands

std::vector<FlagSpec> GlobalFlags() {
  return {
      {"server", "ADDR",
       "the server, host:port (default: $ZEROQ_SERVER,\n"
       "else 127.0.0.1:50051)"},
      {"api_key", "KEY", "your tenant's API key (default: $ZEROQ_API_KEY)"},
      {"tls_ca", "FILE", "TLS: the CA (PEM) of the server's certificate"},
      {"tls_cert", "FILE", "TLS: a client certificate (PEM), with --tls_key"},
      {"tls_key", "FILE", "TLS: the client certificate's key (PEM)"},
      {"connect_timeout", "SECONDS",
       "give up connecting after this long (default 10)"},
      {"json", "",
       "machine-readable output: one protobuf JSON\n"
       "object per line"},
      {"output", "FORMAT", "text (default) or json (the same as --json)"},
  };
}

std::vector<FlagSpec> SubmitFlags() {
  return {
      {"budget", "SPEC",
       "mixed precision within a weight budget: MP4 or 4\n"
       "(average bits), 8x (compression), 120KB, 1.5MiB"},
      // Ranges, defaults and help: common/config_schema.h.
      {"weight_bits", "N", kWeightBits.help},
      {"activation_bits", "N", kActivationBits.help},
      {"candidate_bits", "LIST", kCandidateBits.help},
      {"activation_range", "METHOD", kActivationRange.help},
      {"activation_percentile", "P", kActivationPercentile.help},
      {"iterations", "N", kIterations.help},
      {"batch_size", "N", kBatchSize.help},
      {"early_stop_window", "N", kEarlyStopWindow.help},
      {"early_stop_tolerance", "T", kEarlyStopTolerance.help},
      {"tv_weight", "W", kTvWeight.help},
      {"reconstruct", "METHOD", kReconstruct.help},
      {"reconstruct_iterations", "N", kReconstructIterations.help},
      {"seed", "N", "random seed (default 0)"},
      {"threads", "N", kThreads.help},
      {"priority", "N", "-100..100, higher runs first (default 0)"},
      {"device", "KIND", "cpu, cuda or any (default any)"},
      {"sensitivity_from", "JOB",
       "re-plan: reuse the sensitivities and calibration\n"
       "data of this SUCCEEDED mixed-precision job; only\n"
       "the new --budget is planned"},
      {"request_id", "ID",
       "makes the submission idempotent (default:\n"
       "a random one)"},
  };
}

std::vector<CommandSpec> Commands() {
  std::vector<CommandSpec> c;
  c.push_back(
      {"upload",
       "MODEL",
       "upload a TorchScript model and wait for its inspection",
       "MODEL is a scripted (torch.jit.script) classifier with BatchNorm\n"
       "layers. Uploading the same bytes and shape again returns the stored\n"
       "model. Exits 1 when the server finds the model INVALID.",
       {{"input_shape", "C,H,W",
         "one input without the batch dimension (required)"},
        {"name", "NAME", "a name for it (default: the file name)"},
        {"no_wait", "", "return once uploaded, before the inspection"}},
       1,
       1});
  c.push_back({"models", "", "list your models", "", {}, 0, 0});
  std::vector<FlagSpec> submit = SubmitFlags();
  c.push_back({"submit", "MODEL_ID", "submit a quantization job",
               "Prints the job's id; follow it with \"zeroq watch JOB\".",
               submit, 1, 1});
  c.push_back({"jobs",
               "",
               "list your jobs, newest first",
               "",
               {{"state", "STATE",
                 "only jobs in this state: queued, running,\n"
                 "succeeded, failed, cancelled"},
                {"model", "MODEL_ID", "only this model's jobs"},
                {"full", "", "whole results (per-layer tables, frontiers)\n"
                             "with --json; the default is a summary"}},
               0,
               0});
  c.push_back({"get",
               "JOB",
               "show a job; with its report once it succeeded",
               "",
               {},
               1,
               1});
  c.push_back(
      {"watch",
       "JOB",
       "follow a job's progress until it finishes",
       "Replays the job's events from the start, then follows them live. On\n"
       "a terminal one progress bar per stage (percent, loss, elapsed time,\n"
       "the stage's ETA), otherwise one line per event with its sequence\n"
       "number. A dropped connection is resumed where it stopped. Exits 1\n"
       "when the job ends FAILED or CANCELLED.",
       {},
       1,
       1});
  c.push_back({"cancel",
               "JOB",
               "cancel a queued or running job",
               "A finished job is left as it is.",
               {},
               1,
               1});
  c.push_back({"delete-job",
               "JOB",
               "delete a finished job and its artifacts",
               "Frees the job's artifacts from your stored bytes (the\n"
               "stored_bytes quota), except any that another of your jobs or\n"
               "models holds too. A queued or running job must be cancelled\n"
               "first.",
               {},
               1,
               1});
  c.push_back({"delete-model",
               "MODEL",
               "delete a model",
               "Its jobs stay. Refused while a queued or running job uses it.",
               {},
               1,
               1});
  c.push_back(
      {"download",
       "JOB [ARTIFACT...]",
       "download a succeeded job's artifacts",
       "Without ARTIFACT names, all of them: model.zeroq.pt (the quantized\n"
       "TorchScript model), recipe.json, distilled.pt, report.json. Each is\n"
       "verified against its SHA-256; an interrupted download resumes.",
       {{"out", "DIR", "the folder to write them to (required)", 'o'}},
       1,
       -1});
  c.push_back({"frontier",
               "JOB",
               "show a mixed-precision job's Pareto frontier",
               "A table of the frontier: weight size, average bits, total\n"
               "sensitivity, the chosen point marked with *.",
               {{"svg", "FILE",
                 "also plot it as SVG: size against sensitivity,\n"
                 "the chosen point and the uniform widths (W2,\n"
                 "W4, W8) marked"}},
               1,
               1});
  std::vector<FlagSpec> quantize = {
      {"input_shape", "C,H,W",
       "one input without the batch dimension (required)"},
      {"name", "NAME", "model name (default: the file name)"},
      {"out", "DIR", "the folder for the artifacts (required)", 'o'},
  };
  quantize.insert(quantize.end(), submit.begin(), submit.end());
  c.push_back(
      {"quantize", "MODEL",
       "all in one: upload, submit, watch, download, report",
       "Uploads MODEL, waits for its inspection, submits a job with the\n"
       "options below, follows its progress, downloads every artifact to\n"
       "--out and prints the per-layer report. Exits 1 when the job fails.",
       quantize, 1, 1});
  return c;
}

// ------------------------------------------------------------ connection

std::string Env(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

absl::StatusOr<std::string> ReadFile(const std::string& path,
                                     const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return UsageError(absl::StrCat("--", flag, ": cannot read ", path));
  return std::string((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
}

// True if something accepts a TCP connection at `target` ("host:port" or
// "[v6]:port") within `timeout_ms`: a server is there, so a failed channel
// means it refused the handshake (TLS), not that it cannot be reached.
bool AcceptsTcp(const std::string& target, int timeout_ms) {
  std::string host, port;
  if (!target.empty() && target[0] == '[') {
    const size_t close = target.find(']');
    if (close == std::string::npos || close + 1 >= target.size() ||
        target[close + 1] != ':') {
      return false;
    }
    host = target.substr(1, close - 1);
    port = target.substr(close + 2);
  } else {
    const size_t colon = target.rfind(':');
    if (colon == std::string::npos || target.find(':') != colon) return false;
    host = target.substr(0, colon);
    port = target.substr(colon + 1);
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return false;
  bool accepted = false;
  for (addrinfo* a = found; a != nullptr && !accepted; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                          a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      accepted = true;
    } else if (errno == EINPROGRESS) {
      pollfd pfd{fd, POLLOUT, 0};
      int error = 0;
      socklen_t len = sizeof(error);
      accepted = poll(&pfd, 1, timeout_ms) == 1 &&
                 getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 &&
                 error == 0;
    }
    close(fd);
  }
  freeaddrinfo(found);
  return accepted;
}

// Connects and waits for the connection, so that an unreachable server is
// reported as such (exit 3) before any work. Builds the channel here rather
// than with Client::Connect to tune reconnection: after a server restart a
// watch should be back within a second or two, not after gRPC's default
// backoff of up to two minutes.
absl::StatusOr<std::unique_ptr<Client>> ConnectToServer(const ParsedArgs& p) {
  const std::string target =
      p.Get("server", Env("ZEROQ_SERVER", "127.0.0.1:50051"));
  if (target.empty()) return UsageError("--server: empty address");
  ClientOptions options;
  options.api_key = p.Get("api_key", Env("ZEROQ_API_KEY", ""));
  options.tls_ca_file = p.Get("tls_ca");
  options.tls_cert_file = p.Get("tls_cert");
  options.tls_key_file = p.Get("tls_key");
  // A watch outlives a server restart of a few minutes.
  options.max_reconnects = 100;
  double timeout = 10;
  if (p.Has("connect_timeout") &&
      (!absl::SimpleAtod(p.Get("connect_timeout"), &timeout) ||
       !(timeout > 0))) {
    return UsageError(absl::StrCat("--connect_timeout: \"",
                                   p.Get("connect_timeout"),
                                   "\" is not a positive number of seconds"));
  }

  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::InsecureChannelCredentials();
  const bool tls =
      !options.tls_ca_file.empty() || !options.tls_cert_file.empty();
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return UsageError("--tls_cert and --tls_key go together");
  }
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      ZQ_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                          ReadFile(options.tls_ca_file, "tls_ca"));
    }
    if (!options.tls_cert_file.empty()) {
      ZQ_ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                          ReadFile(options.tls_cert_file, "tls_cert"));
      ZQ_ASSIGN_OR_RETURN(ssl.pem_private_key,
                          ReadFile(options.tls_key_file, "tls_key"));
    }
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(8 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(target, credentials, args);

  const auto deadline =
      absl::ToChronoTime(absl::Now() + absl::Seconds(timeout));
  grpc_connectivity_state state = channel->GetState(/*try_to_connect=*/true);
  while (state != GRPC_CHANNEL_READY) {
    // A refused connection (or TLS handshake) fails at once; waiting out
    // the timeout would only delay the answer.
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE ||
        state == GRPC_CHANNEL_SHUTDOWN) {
      // Something listens there: it refused the handshake. That is a TLS
      // mismatch (exit 1, saying so), not an unreachable server (exit 3).
      if (AcceptsTcp(target, 2000)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "TLS: the server at ", target,
            " accepted the connection but refused the handshake: ",
            tls ? "check that --tls_ca is the CA of its certificate, and "
                  "pass --tls_cert and --tls_key if it requires client "
                  "certificates (mutual TLS); or it does not use TLS (drop "
                  "the --tls_ options)"
                : "it speaks TLS; pass --tls_ca (the CA of its certificate), "
                  "and --tls_cert and --tls_key if it requires client "
                  "certificates"));
      }
      return UnreachableError(absl::StrCat(
          "cannot reach the server at ", target,
          tls ? ": the connection or the TLS handshake failed (is "
                "zeroq-server running there, with a certificate --tls_ca "
                "vouches for?)"
              : ": the connection failed (is zeroq-server running there? "
                "with TLS on, pass --tls_ca)",
          "; set the address with --server or ZEROQ_SERVER"));
    }
    if (!channel->WaitForStateChange(state, deadline)) {
      return UnreachableError(absl::StrCat("cannot reach the server at ",
                                           target, ": no connection within ",
                                           timeout, " s"));
    }
    state = channel->GetState(true);
  }
  return std::make_unique<Client>(std::move(channel), std::move(options));
}

// ------------------------------------------------------------ output

class Cli {
 public:
  explicit Cli(ParsedArgs p)
      : p_(std::move(p)),
        json_(p_.GetBool("json") || p_.Get("output") == "json") {}

  absl::Status Run(const std::string& command) {
    const std::string output = p_.Get("output");
    if (!output.empty() && output != "text" && output != "json") {
      return UsageError(absl::StrCat("--output: \"", output,
                                     "\" is not text or json"));
    }
    if (command == "upload") return Upload();
    if (command == "models") return Models();
    if (command == "submit") return Submit();
    if (command == "jobs") return Jobs();
    if (command == "get") return Get();
    if (command == "watch") return Watch();
    if (command == "cancel") return Cancel();
    if (command == "delete-job") return DeleteJob();
    if (command == "delete-model") return DeleteModel();
    if (command == "download") return Download();
    if (command == "frontier") return Frontier();
    if (command == "quantize") return Quantize();
    return UsageError(absl::StrCat("unknown command ", command));
  }

 private:
  absl::Status Connect() {
    ZQ_ASSIGN_OR_RETURN(client_, ConnectToServer(p_));
    return absl::OkStatus();
  }

  void PrintJson(const google::protobuf::Message& m) {
    std::string out;
    google::protobuf::util::JsonPrintOptions options;
    (void)google::protobuf::util::MessageToJsonString(m, &out, options);
    std::cout << out << "\n" << std::flush;
  }
  void Print(const std::string& text) { std::cout << text << std::flush; }

  absl::StatusOr<std::vector<int64_t>> Shape() {
    if (!p_.Has("input_shape")) {
      return UsageError(
          "--input_shape is required, e.g. --input_shape 3,224,224");
    }
    return ParseShape("input_shape", p_.Get("input_shape"));
  }

  absl::Status CheckReadable(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in || fs::is_directory(path)) {
      return UsageError(absl::StrCat("cannot read model file ", path));
    }
    return absl::OkStatus();
  }

  // Upload and inspection; the READY model, or an error for an INVALID one.
  absl::StatusOr<v1::Model> UploadAndInspect(const std::string& path,
                                             const std::vector<int64_t>& shape,
                                             bool wait) {
    const std::string name = p_.Get("name", fs::path(path).filename().string());
    ZQ_ASSIGN_OR_RETURN(v1::Model model,
                        client_->UploadModel(path, name, shape));
    if (!json_) {
      Print(absl::StrFormat("uploaded %s: model %s%s\n", path, model.id(),
                            model.deduplicated() ? " (already stored)" : ""));
    }
    if (!wait) return model;
    const bool deduplicated = model.deduplicated();
    ZQ_ASSIGN_OR_RETURN(model,
                        client_->WaitForModel(model.id(), absl::Minutes(10)));
    model.set_deduplicated(deduplicated);  // only the upload's reply says
    if (model.state() == v1::MODEL_INVALID) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model ", model.id(), " is INVALID: ", model.state_reason()));
    }
    return model;
  }

  absl::Status Upload() {
    const std::string path = p_.args[0];
    ZQ_ASSIGN_OR_RETURN(std::vector<int64_t> shape, Shape());
    ZQ_RETURN_IF_ERROR(CheckReadable(path));
    ZQ_RETURN_IF_ERROR(Connect());
    absl::StatusOr<v1::Model> model =
        UploadAndInspect(path, shape, !p_.GetBool("no_wait"));
    if (!model.ok()) return model.status();
    if (json_) {
      PrintJson(*model);
    } else {
      Print(DescribeModel(*model));
    }
    return absl::OkStatus();
  }

  absl::Status Models() {
    ZQ_RETURN_IF_ERROR(Connect());
    std::vector<v1::Model> all;
    std::string token;
    do {
      ZQ_ASSIGN_OR_RETURN(v1::ListModelsResponse page,
                          client_->ListModels(500, token));
      for (v1::Model& m : *page.mutable_models()) all.push_back(std::move(m));
      token = page.next_page_token();
    } while (!token.empty());
    if (json_) {
      for (const v1::Model& m : all) PrintJson(m);
    } else {
      Print(ModelsTable(all));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<v1::SubmitJobRequest> SubmitRequest(
      const std::string& model_id) {
    ZQ_ASSIGN_OR_RETURN(v1::SubmitJobRequest request,
                        BuildSubmitRequest(p_, model_id));
    if (request.request_id().empty()) {
      // A random id lets the client retry a submission that may have
      // reached the server without making a second job.
      std::random_device rd;
      request.set_request_id(absl::StrFormat("zeroq-cli-%08x%08x", rd(), rd()));
    }
    return request;
  }

  absl::Status Submit() {
    ZQ_ASSIGN_OR_RETURN(v1::SubmitJobRequest request,
                        SubmitRequest(p_.args[0]));
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, client_->SubmitJob(request));
    if (json_) {
      PrintJson(job);
    } else {
      // The id alone on stdout, for id=$(zeroq submit ...); words on stderr.
      Print(job.id() + "\n");
      std::cerr << absl::StrFormat(
          "submitted job %s (%s); follow it with: zeroq watch %s\n", job.id(),
          JobStateName(job.state()), job.id());
    }
    return absl::OkStatus();
  }

  absl::Status Jobs() {
    v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
    if (p_.Has("state")) {
      ZQ_ASSIGN_OR_RETURN(state, ParseJobState(p_.Get("state")));
    }
    ZQ_RETURN_IF_ERROR(Connect());
    std::vector<v1::Job> all;
    std::string token;
    do {
      ZQ_ASSIGN_OR_RETURN(
          v1::ListJobsResponse page,
          client_->ListJobs(state, p_.Get("model"), 500, token,
                            p_.GetBool("full") ? v1::JOB_VIEW_FULL
                                               : v1::JOB_VIEW_SUMMARY));
      for (v1::Job& j : *page.mutable_jobs()) all.push_back(std::move(j));
      token = page.next_page_token();
    } while (!token.empty());
    if (json_) {
      for (const v1::Job& j : all) PrintJson(j);
    } else {
      Print(JobsTable(all));
    }
    return absl::OkStatus();
  }

  absl::Status Get() {
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, client_->GetJob(p_.args[0]));
    if (json_) {
      PrintJson(job);
    } else {
      Print(DescribeJob(job));
    }
    return absl::OkStatus();
  }

  // Follows the job to its end through Client::WatchJob (which resumes a
  // dropped stream after the last event seen); the finished job.
  absl::StatusOr<v1::Job> Follow(const std::string& job_id) {
    const char* term = std::getenv("TERM");
    const bool terminal = !json_ && isatty(STDOUT_FILENO) &&
                          !(term != nullptr && std::strcmp(term, "dumb") == 0);
    int width = 100;
    struct winsize ws;
    if (terminal && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 &&
        ws.ws_col > 20) {
      width = ws.ws_col - 1;
    }
    ProgressView view(terminal, width);
    if (terminal) InstallInterruptNote(job_id);
    absl::StatusOr<v1::Job> job =
        client_->WatchJob(job_id, 0, [&](const v1::JobEvent& e) {
          if (json_) {
            if (e.type() != v1::EVENT_HEARTBEAT) PrintJson(e);
          } else {
            Print(view.OnEvent(e));
          }
          return true;
        });
    Print(view.Finish());
    return job;
  }

  // On a terminal, Ctrl-C ends the bar's line and says that the job goes
  // on (only the watch stops).
  static void InstallInterruptNote(const std::string& job_id) {
    static char note[160];
    std::snprintf(note, sizeof(note),
                  "\nzeroq: stopped watching; job %s goes on (zeroq cancel "
                  "%s stops it)\n",
                  job_id.c_str(), job_id.c_str());
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = [](int) {
      ssize_t unused = write(STDERR_FILENO, note, std::strlen(note));
      (void)unused;
      _exit(130);
    };
    sigaction(SIGINT, &sa, nullptr);
  }

  absl::Status Watch() {
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, Follow(p_.args[0]));
    if (!json_) {
      Print(
          absl::StrFormat("job %s %s\n", job.id(), JobStateName(job.state())));
    }
    if (job.state() != v1::JOB_SUCCEEDED) return JobFailedError(job);
    return absl::OkStatus();
  }

  absl::Status Cancel() {
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, client_->CancelJob(p_.args[0]));
    if (json_) {
      PrintJson(job);
    } else {
      Print(absl::StrFormat(
          "job %s is %s%s\n", job.id(), JobStateName(job.state()),
          job.cancel_requested() && job.state() == v1::JOB_RUNNING
              ? ": cancellation requested, the worker is stopping"
              : ""));
    }
    return absl::OkStatus();
  }

  absl::Status DeleteJob() {
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(int64_t freed, client_->DeleteJob(p_.args[0]));
    if (json_) {
      v1::DeleteJobResponse response;
      response.set_freed_bytes(freed);
      PrintJson(response);
    } else {
      Print(absl::StrFormat("deleted job %s; %s freed\n", p_.args[0],
                            FormatBytes(static_cast<double>(freed))));
    }
    return absl::OkStatus();
  }

  absl::Status DeleteModel() {
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_RETURN_IF_ERROR(client_->DeleteModel(p_.args[0]));
    if (!json_) Print(absl::StrFormat("deleted model %s\n", p_.args[0]));
    return absl::OkStatus();
  }

  absl::StatusOr<v1::Job> SucceededJob(const std::string& job_id) {
    ZQ_ASSIGN_OR_RETURN(v1::Job job, client_->GetJob(job_id));
    if (job.state() != v1::JOB_SUCCEEDED) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", job_id, " is ", JobStateName(job.state()),
                       "; it has results only once it has SUCCEEDED"));
    }
    return job;
  }

  absl::Status DownloadAll(const v1::Job& job,
                           const std::vector<std::string>& wanted,
                           const std::string& dir) {
    std::vector<std::string> names = wanted;
    std::vector<std::string> have;
    for (const v1::Artifact& a : job.result().artifacts()) {
      have.push_back(a.name());
    }
    if (names.empty()) names = have;
    for (const std::string& n : names) {
      if (std::find(have.begin(), have.end(), n) == have.end()) {
        return absl::NotFoundError(
            absl::StrCat("job ", job.id(), " has no artifact \"", n,
                         "\"; it has ", absl::StrJoin(have, ", ")));
      }
    }
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot create ", dir, ": ", ec.message()));
    }
    for (const std::string& n : names) {
      const std::string path = (fs::path(dir) / n).string();
      ZQ_ASSIGN_OR_RETURN(v1::Artifact a,
                          client_->DownloadArtifact(job.id(), n, path));
      if (json_) {
        PrintJson(a);
      } else {
        Print(absl::StrFormat("  %-40s %10s  sha256 %s\n", path,
                              FormatBytes(a.size_bytes()),
                              a.sha256().substr(0, 16)));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Download() {
    if (!p_.Has("out") || p_.Get("out").empty()) {
      return UsageError("-o/--out DIR is required");
    }
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, SucceededJob(p_.args[0]));
    std::vector<std::string> wanted(p_.args.begin() + 1, p_.args.end());
    return DownloadAll(job, wanted, p_.Get("out"));
  }

  absl::Status Frontier() {
    ZQ_RETURN_IF_ERROR(Connect());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, SucceededJob(p_.args[0]));
    const v1::JobResult& r = job.result();
    if (r.frontier_size() == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", job.id(),
          " has no Pareto frontier: it was not a mixed-precision job (submit "
          "with --budget)"));
    }
    if (json_) {
      // The points, each with "chosen" added; a chosen point off the
      // frontier (a uniform width measured closer to float) as a last line
      // with "offFrontier" too.
      auto line = [&](const v1::ParetoPoint& point, bool chosen,
                      bool off_frontier) {
        std::string out;
        (void)google::protobuf::util::MessageToJsonString(point, &out);
        out.pop_back();  // the closing brace
        absl::StrAppend(&out, out.size() > 1 ? "," : "",
                        "\"chosen\":", chosen ? "true" : "false",
                        off_frontier ? ",\"offFrontier\":true" : "", "}");
        Print(out + "\n");
      };
      bool marked = false;
      for (const v1::ParetoPoint& point : r.frontier()) {
        marked = marked || IsChosen(r, point);
        line(point, IsChosen(r, point), false);
      }
      if (!marked && r.has_chosen()) line(r.chosen(), true, true);
    } else {
      Print(FrontierTable(r));
    }
    if (p_.Has("svg")) {
      std::string model_name = job.model_id();
      if (absl::StatusOr<v1::Model> m = client_->GetModel(job.model_id());
          m.ok() && !m->name().empty()) {
        model_name = m->name();
      }
      const std::string title = absl::StrCat(
          "Pareto frontier of job ", job.id(), " (", model_name,
          job.config().budget().empty() ? ""
                                        : ", budget " + job.config().budget(),
          ")");
      const std::string path = p_.Get("svg");
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << FrontierSvg(r, title);
      out.close();
      if (!out) {
        return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
      }
      if (!json_) Print(absl::StrCat("plot written to ", path, "\n"));
    }
    return absl::OkStatus();
  }

  absl::Status Quantize() {
    const std::string path = p_.args[0];
    // Every usage error before anything is sent.
    ZQ_ASSIGN_OR_RETURN(std::vector<int64_t> shape, Shape());
    if (!p_.Has("out") || p_.Get("out").empty()) {
      return UsageError("-o/--out DIR is required");
    }
    ZQ_RETURN_IF_ERROR(CheckReadable(path));
    ZQ_ASSIGN_OR_RETURN(v1::SubmitJobRequest request, SubmitRequest(""));
    ZQ_RETURN_IF_ERROR(Connect());

    ZQ_ASSIGN_OR_RETURN(v1::Model model, UploadAndInspect(path, shape, true));
    if (json_) {
      PrintJson(model);
    } else {
      Print(DescribeModel(model));
    }
    request.set_model_id(model.id());
    ZQ_ASSIGN_OR_RETURN(v1::Job job, client_->SubmitJob(request));
    if (json_) {
      PrintJson(job);
    } else {
      Print(absl::StrFormat("submitted job %s\n", job.id()));
    }
    ZQ_ASSIGN_OR_RETURN(job, Follow(job.id()));
    if (job.state() != v1::JOB_SUCCEEDED) return JobFailedError(job);
    if (!json_) Print(absl::StrCat("artifacts in ", p_.Get("out"), ":\n"));
    ZQ_RETURN_IF_ERROR(DownloadAll(job, {}, p_.Get("out")));
    if (json_) {
      PrintJson(job);
    } else {
      Print("\n" + JobReport(job));
    }
    return absl::OkStatus();
  }

  ParsedArgs p_;
  bool json_;
  std::unique_ptr<Client> client_;
};

const CommandSpec* FindCommand(const std::vector<CommandSpec>& commands,
                               const std::string& name) {
  for (const CommandSpec& c : commands) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

int UsageFailure(const absl::Status& status, const std::string& command) {
  std::string message(status.message());
  if (!absl::StartsWith(message, "zeroq")) {
    message = absl::StrCat("zeroq", command.empty() ? "" : " ", command, ": ",
                           message);
  }
  std::cerr << message << "\n"
            << (command.empty()
                    ? std::string("Run \"zeroq help\" for the commands.")
                    : absl::StrCat("Run \"zeroq ", command,
                                   " --help\" for its options."))
            << "\n";
  return kExitUsage;
}

int Main(int argc, char** argv) {
  const std::vector<CommandSpec> commands = Commands();
  const std::vector<FlagSpec> globals = GlobalFlags();
  std::vector<std::string> args(argv + 1, argv + argc);

  // Global flags may come before the command: skip them (with their values)
  // to find it; they are parsed with the command's own flags.
  size_t i = 0;
  while (i < args.size() && absl::StartsWith(args[i], "-") && args[i] != "-") {
    if (args[i] == "--help" || args[i] == "-h") {
      std::cout << MainHelp(commands, globals);
      return kExitOk;
    }
    if (args[i].find('=') == std::string::npos) {
      for (const FlagSpec& f : globals) {
        if (args[i] == "--" + f.name && !f.value_name.empty()) ++i;
      }
    }
    ++i;
  }
  if (i >= args.size()) {
    std::cerr << MainHelp(commands, globals) << "\n";
    return UsageFailure(UsageError("no command given"), "");
  }
  const std::string name = args[i];
  std::vector<std::string> rest(args.begin(), args.begin() + i);
  rest.insert(rest.end(), args.begin() + i + 1, args.end());

  if (name == "help") {
    if (i + 1 >= args.size()) {
      std::cout << MainHelp(commands, globals);
      return kExitOk;
    }
    const std::string& topic = args[i + 1];
    const CommandSpec* c = FindCommand(commands, topic);
    if (c == nullptr) {
      return UsageFailure(
          UsageError(absl::StrCat("unknown command \"", topic, "\"")), "");
    }
    std::cout << CommandHelp(*c, globals);
    return kExitOk;
  }
  const CommandSpec* command = FindCommand(commands, name);
  if (command == nullptr) {
    std::string message = absl::StrCat("unknown command \"", name, "\"");
    for (const CommandSpec& c : commands) {
      if (absl::StartsWith(c.name, name.substr(0, 2))) {
        absl::StrAppend(&message, " (did you mean ", c.name, "?)");
        break;
      }
    }
    return UsageFailure(UsageError(message), "");
  }
  absl::StatusOr<ParsedArgs> parsed = ParseArgs(*command, globals, rest);
  if (!parsed.ok()) return UsageFailure(parsed.status(), name);
  if (parsed->help) {
    std::cout << CommandHelp(*command, globals);
    return kExitOk;
  }

  Cli cli(*std::move(parsed));
  absl::Status status = cli.Run(name);
  if (status.ok()) return kExitOk;
  const int code = ExitCodeFor(status);
  if (code == kExitUsage) return UsageFailure(status, name);
  std::cout << std::flush;
  std::cerr << "zeroq: " << FormatError(status) << "\n";
  return code;
}

}  // namespace
}  // namespace zeroq::client

int main(int argc, char** argv) {
  // The progress stream may outlive a reader such as `head`.
  signal(SIGPIPE, SIG_IGN);
  return zeroq::client::Main(argc, argv);
}
