#include "server/http_server.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"
#include "server/dashboard/assets.h"
#include "server/log.h"

namespace zeroq::server {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;

int HttpStatusOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return 200;
    case absl::StatusCode::kCancelled: return 499;
    case absl::StatusCode::kInvalidArgument: return 400;
    case absl::StatusCode::kFailedPrecondition: return 400;
    case absl::StatusCode::kOutOfRange: return 400;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kPermissionDenied: return 403;
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kAlreadyExists: return 409;
    case absl::StatusCode::kAborted: return 409;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kUnimplemented: return 501;
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    default: return 500;  // UNKNOWN, INTERNAL, DATA_LOSS
  }
}

namespace {

constexpr size_t kMaxJsonBody = 4 << 20;
constexpr size_t kUploadBuffer = 256 << 10;
constexpr auto kReadTimeout = std::chrono::seconds(60);

std::string ErrorJson(const absl::Status& s) {
  nlohmann::json j = {{"error",
                       {{"code", HttpStatusOf(s.code())},
                        {"status", absl::StatusCodeToString(s.code())},
                        {"message", std::string(s.message())}}}};
  return j.dump();
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  auto status = google::protobuf::util::MessageToJsonString(m, &out);
  if (!status.ok()) return "{}";  // our own messages always print
  return out;
}

absl::Status FromJson(absl::string_view json, google::protobuf::Message* m) {
  if (absl::StripAsciiWhitespace(json).empty()) return absl::OkStatus();
  google::protobuf::util::JsonParseOptions options;
  auto status = google::protobuf::util::JsonStringToMessage(
      std::string(json), m, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request body is not a ", m->GetDescriptor()->name(),
                     " in JSON: ", std::string(status.message())));
  }
  return absl::OkStatus();
}

// %XX and '+' decoding of one query component or path segment.
std::string Unescape(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%' && i + 2 < s.size() &&
               absl::ascii_isxdigit(static_cast<unsigned char>(s[i + 1])) &&
               absl::ascii_isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      int v = 0;
      absl::SimpleHexAtoi(s.substr(i + 1, 2), &v);
      out += static_cast<char>(v);
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

struct Target {
  std::vector<std::string> segments;  // "/v1/jobs/j-1" -> v1, jobs, j-1
  std::vector<std::pair<std::string, std::string>> query;
};

Target ParseTarget(absl::string_view target) {
  Target t;
  std::pair<absl::string_view, absl::string_view> parts =
      absl::StrSplit(target, absl::MaxSplits('?', 1));
  for (absl::string_view seg : absl::StrSplit(parts.first, '/', absl::SkipEmpty()))
    t.segments.push_back(Unescape(seg));
  for (absl::string_view kv : absl::StrSplit(parts.second, '&', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> p =
        absl::StrSplit(kv, absl::MaxSplits('=', 1));
    t.query.emplace_back(Unescape(p.first), Unescape(p.second));
  }
  return t;
}

// Sets a request message's fields from query parameters by their proto (or
// JSON) names, through the JSON parser: numbers, enums by name, strings.
absl::Status QueryInto(const Target& t,
                       const std::vector<std::string>& skip,
                       google::protobuf::Message* m) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : t.query) {
    if (std::find(skip.begin(), skip.end(), k) != skip.end()) continue;
    j[k] = v;
  }
  if (j.empty()) return absl::OkStatus();
  google::protobuf::util::JsonParseOptions options;
  auto status = google::protobuf::util::JsonStringToMessage(j.dump(), m, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query parameters: ", std::string(status.message())));
  }
  return absl::OkStatus();
}

std::optional<std::string> QueryValue(const Target& t, absl::string_view key) {
  for (const auto& [k, v] : t.query)
    if (k == key) return v;
  return std::nullopt;
}

// The event's SSE type: its EventType name, lower case, without EVENT_.
std::string EventName(v1::EventType type) {
  absl::string_view name = v1::EventType_Name(type);
  absl::ConsumePrefix(&name, "EVENT_");
  return absl::AsciiStrToLower(name);
}

}  // namespace

// ---------------------------------------------------------------- server

struct HttpServer::Impl {
  Impl(Api* api, HttpOptions options)
      : api(api), options(std::move(options)), acceptor(ioc) {}

  void Accept();

  Api* const api;
  const HttpOptions options;
  net::io_context ioc;
  tcp::acceptor acceptor;
  std::optional<ssl::context> tls;
  std::vector<std::thread> threads;
  std::atomic<int> sessions{0};
  int port = 0;
  std::atomic<bool> stopped{false};
};

namespace {

// One connection: requests one after another (keep-alive), a response each;
// an event stream or a download is the connection's last or streams on its
// own. Runs on its strand; WatchSink calls come from any thread and are
// posted to it.
template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>>,
                public WatchSink {
 public:
  Session(Stream stream, HttpServer::Impl* server)
      : stream_(std::move(stream)), server_(server) {
    server_->sessions++;
  }
  ~Session() override { server_->sessions--; }

  void Run() {
    if constexpr (std::is_same_v<Stream, beast::ssl_stream<beast::tcp_stream>>) {
      beast::get_lowest_layer(stream_).expires_after(kReadTimeout);
      stream_.async_handshake(
          ssl::stream_base::server,
          [self = this->shared_from_this()](beast::error_code ec) {
            if (ec) return;  // not TLS, or no acceptable certificate
            self->ReadHeader();
          });
    } else {
      ReadHeader();
    }
  }

  // ---- WatchSink (any thread)
  void Write(const v1::JobEvent& event) override {
    std::string frame;
    if (event.type() == v1::EVENT_HEARTBEAT) {
      frame = ": heartbeat\n\n";
    } else {
      if (event.type() == v1::EVENT_STATE) last_state_ = event.state();
      frame = absl::StrCat("id: ", event.seq(), "\nevent: ",
                           EventName(event.type()), "\ndata: ", ToJson(event),
                           "\n\n");
    }
    auto self = this->shared_from_this();
    auto data = std::make_shared<std::string>(std::move(frame));
    net::post(stream_.get_executor(), [self, data] {
      net::async_write(self->stream_, net::buffer(*data),
                       [self, data](beast::error_code ec, size_t) {
                         self->watch_->WriteDone(!ec);
                       });
    });
  }

  void Finish(const absl::Status& status) override {
    std::string frame;
    if (status.ok()) {
      nlohmann::json j = {{"state", v1::JobState_Name(last_state_)}};
      frame = absl::StrCat("event: end\ndata: ", j.dump(), "\n\n");
    } else if (status.code() != absl::StatusCode::kCancelled) {
      frame = absl::StrCat("event: error\ndata: ", ErrorJson(status), "\n\n");
    }
    auto self = this->shared_from_this();
    auto data = std::make_shared<std::string>(std::move(frame));
    net::post(stream_.get_executor(), [self, data] {
      auto done = [self, data](beast::error_code, size_t) {
        self->Record(200);
        self->watch_.reset();
        self->Close();
      };
      if (data->empty()) {
        done({}, 0);
      } else {
        net::async_write(self->stream_, net::buffer(*data), done);
      }
    });
  }

 private:
  // ---- requests
  void ReadHeader() {
    header_parser_.emplace();
    header_parser_->header_limit(16 << 10);
    beast::get_lowest_layer(stream_).expires_after(kReadTimeout);
    http::async_read_header(
        stream_, buffer_, *header_parser_,
        [self = this->shared_from_this()](beast::error_code ec, size_t) {
          self->OnHeader(ec);
        });
  }

  void OnHeader(beast::error_code ec) {
    if (ec) return Close();  // the client left, or a malformed request
    start_ = absl::Now();
    const auto& req = header_parser_->get();
    version_ = req.version();
    keep_alive_ = req.keep_alive();
    target_ = ParseTarget(std::string(req.target()));
    method_ = req.method();
    const auto& s = target_.segments;
    if (method_ == http::verb::post && s.size() == 2 && s[0] == "v1" &&
        s[1] == "models") {
      route_ = "POST /v1/models";
      return StartUpload();
    }
    body_parser_.emplace(std::move(*header_parser_));
    body_parser_->body_limit(kMaxJsonBody);
    http::async_read(stream_, buffer_, *body_parser_,
                     [self = this->shared_from_this()](beast::error_code ec,
                                                       size_t) {
                       if (ec) {
                         self->keep_alive_ = false;
                         return self->RespondError(absl::InvalidArgumentError(
                             absl::StrCat("reading the request: ", ec.message())));
                       }
                       self->Dispatch();
                     });
  }

  std::optional<std::string> Header(absl::string_view name) const {
    const auto& fields = body_parser_ ? body_parser_->get().base()
                         : upload_parser_ ? upload_parser_->get().base()
                                          : header_parser_->get().base();
    auto it = fields.find(beast::string_view(name.data(), name.size()));
    if (it == fields.end()) return std::nullopt;
    return std::string(it->value());
  }

  absl::StatusOr<std::string> Tenant() const {
    std::optional<std::string> auth = Header("authorization");
    return server_->api->Authenticate(
        auth ? std::optional<absl::string_view>(*auth) : std::nullopt);
  }

  void Dispatch() {
    const auto& s = target_.segments;
    const http::verb m = method_;
    Api* api = server_->api;
    // The dashboard: no key needed to fetch the page itself.
    if (m == http::verb::get && (s.empty() || s[0] == "dashboard")) {
      route_ = "GET /";
      std::string path = "/";
      for (const std::string& seg : s) absl::StrAppend(&path, seg, "/");
      if (!s.empty()) path.pop_back();
      const Asset* asset = FindAsset(path);
      if (asset == nullptr)
        return RespondError(absl::NotFoundError(absl::StrCat("no page ", path)));
      return Respond(200, std::string(asset->body), std::string(asset->content_type));
    }
    if (s.empty() || s[0] != "v1" || s.size() < 2) {
      route_ = "other";
      return RespondError(absl::NotFoundError("no such resource; the API is under /v1"));
    }
    absl::StatusOr<std::string> tenant_or = Tenant();
    const std::string body = body_parser_->get().body();
    auto unary = [&](const char* route, auto call) {
      route_ = route;
      if (!tenant_or.ok()) return RespondError(tenant_or.status());
      auto result = call(*tenant_or);
      if constexpr (std::is_same_v<decltype(result), absl::Status>) {
        if (!result.ok()) return RespondError(result);
        return Respond(200, "{}");
      } else {
        if (!result.ok()) return RespondError(result.status());
        return Respond(200, ToJson(*result));
      }
    };
    if (s[1] == "models") {
      if (s.size() == 2 && m == http::verb::get) {
        return unary("GET /v1/models", [&](const std::string& t)
                                           -> absl::StatusOr<v1::ListModelsResponse> {
          v1::ListModelsRequest r;
          ZQ_RETURN_IF_ERROR(QueryInto(target_, {}, &r));
          return api->ListModels(t, r);
        });
      }
      if (s.size() == 3 && m == http::verb::get) {
        return unary("GET /v1/models/{id}", [&](const std::string& t) {
          v1::GetModelRequest r;
          r.set_model_id(s[2]);
          return api->GetModel(t, r);
        });
      }
      if (s.size() == 3 && m == http::verb::delete_) {
        return unary("DELETE /v1/models/{id}", [&](const std::string& t) {
          v1::DeleteModelRequest r;
          r.set_model_id(s[2]);
          return api->DeleteModel(t, r);
        });
      }
    } else if (s[1] == "jobs") {
      if (s.size() == 2 && m == http::verb::get) {
        return unary("GET /v1/jobs", [&](const std::string& t)
                                         -> absl::StatusOr<v1::ListJobsResponse> {
          v1::ListJobsRequest r;
          ZQ_RETURN_IF_ERROR(QueryInto(target_, {}, &r));
          return api->ListJobs(t, r);
        });
      }
      if (s.size() == 2 && m == http::verb::post) {
        return unary("POST /v1/jobs",
                     [&](const std::string& t) -> absl::StatusOr<v1::Job> {
                       v1::SubmitJobRequest r;
                       ZQ_RETURN_IF_ERROR(FromJson(body, &r));
                       return api->SubmitJob(t, r);
                     });
      }
      if (s.size() == 3 && m == http::verb::post &&
          absl::EndsWith(s[2], ":cancel")) {
        return unary("POST /v1/jobs/{id}:cancel", [&](const std::string& t) {
          v1::CancelJobRequest r;
          r.set_job_id(s[2].substr(0, s[2].size() - 7));
          return api->CancelJob(t, r);
        });
      }
      if (s.size() == 3 && m == http::verb::get) {
        return unary("GET /v1/jobs/{id}", [&](const std::string& t) {
          v1::GetJobRequest r;
          r.set_job_id(s[2]);
          return api->GetJob(t, r);
        });
      }
      if (s.size() == 3 && m == http::verb::delete_) {
        return unary("DELETE /v1/jobs/{id}", [&](const std::string& t) {
          v1::DeleteJobRequest r;
          r.set_job_id(s[2]);
          return api->DeleteJob(t, r);
        });
      }
      if (s.size() == 4 && s[3] == "events" && m == http::verb::get) {
        route_ = "GET /v1/jobs/{id}/events";
        if (!tenant_or.ok()) return RespondError(tenant_or.status());
        return StartEvents(*tenant_or, s[2]);
      }
      if (s.size() == 5 && s[3] == "artifacts" && m == http::verb::get) {
        route_ = "GET /v1/jobs/{id}/artifacts/{name}";
        if (!tenant_or.ok()) return RespondError(tenant_or.status());
        return StartDownload(*tenant_or, s[2], s[4]);
      }
    }
    route_ = "other";
    return RespondError(absl::NotFoundError(absl::StrCat(
        "no route for ", std::string(http::to_string(m)), " ",
        std::string(body_parser_->get().target()))));
  }

  // ---- responses
  void RespondError(const absl::Status& status) {
    Respond(HttpStatusOf(status.code()), ErrorJson(status));
  }

  // `content_range`: the Content-Range header, when not empty.
  void Respond(int status, std::string body,
               std::string content_type = "application/json",
               std::string content_range = "") {
    auto res = std::make_shared<http::response<http::string_body>>(
        static_cast<http::status>(status), version_);
    res->set(http::field::server, "zeroq");
    res->set(http::field::content_type, content_type);
    if (status == 401) res->set(http::field::www_authenticate, "Bearer");
    if (!content_range.empty()) res->set(http::field::content_range, content_range);
    res->keep_alive(keep_alive_);
    res->body() = std::move(body);
    res->prepare_payload();
    http::async_write(stream_, *res,
                      [self = this->shared_from_this(), res, status](
                          beast::error_code ec, size_t) {
                        self->Record(status);
                        self->Next(ec || res->need_eof());
                      });
  }

  // After a response: the next request on this connection, or its end.
  void Next(bool close) {
    if (close) return Close();
    Reset();
    ReadHeader();
  }

  void Reset() {
    header_parser_.reset();
    body_parser_.reset();
    upload_parser_.reset();
    upload_.reset();
  }

  void Record(int status) {
    if (Metrics* m = server_->api->metrics()) {
      m->HttpRequest(route_, status, absl::ToDoubleSeconds(absl::Now() - start_));
    }
  }

  void Close() {
    beast::error_code ec;
    if constexpr (std::is_same_v<Stream, beast::ssl_stream<beast::tcp_stream>>) {
      beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(2));
      stream_.async_shutdown(
          [self = this->shared_from_this()](beast::error_code) {
            beast::error_code ignored;
            beast::get_lowest_layer(self->stream_).socket().close(ignored);
          });
    } else {
      stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
      stream_.socket().close(ec);
    }
  }

  // ---- upload: the body streams into the blob store
  void StartUpload() {
    absl::StatusOr<std::string> tenant = Tenant();
    keep_alive_ = false;  // on an error the rest of the body stays unread
    if (!tenant.ok()) return RespondError(tenant.status());
    tenant_ = *tenant;
    const auto& req = header_parser_->get();
    v1::ModelMetadata meta;
    auto param = [&](const char* query, const char* header) {
      std::optional<std::string> v = QueryValue(target_, query);
      if (!v) v = Header(header);
      return v.value_or("");
    };
    meta.set_name(param("name", "x-model-name"));
    meta.set_sha256(absl::AsciiStrToLower(param("sha256", "x-content-sha256")));
    for (absl::string_view part :
         absl::StrSplit(param("input_shape", "x-input-shape"), ',', absl::SkipEmpty())) {
      int64_t d = 0;
      if (!absl::SimpleAtoi(part, &d)) {
        return RespondError(absl::InvalidArgumentError(absl::StrCat(
            "input_shape: \"", part, "\" is not an integer")));
      }
      meta.add_input_shape(d);
    }
    if (!req.has_content_length()) {
      return RespondError(absl::InvalidArgumentError(
          "the model's bytes need a Content-Length (no chunked upload)"));
    }
    meta.set_size_bytes(static_cast<int64_t>(*header_parser_->content_length()));
    absl::StatusOr<std::unique_ptr<UploadAssembler>> upload =
        server_->api->StartUpload(tenant_);
    if (!upload.ok()) return RespondError(upload.status());
    upload_ = *std::move(upload);
    v1::UploadModelRequest first;
    *first.mutable_metadata() = meta;
    if (absl::Status s = upload_->Add(first); !s.ok()) return RespondError(s);
    upload_parser_.emplace(std::move(*header_parser_));
    upload_parser_->body_limit(boost::none);  // the announced size rules
    chunk_.resize(kUploadBuffer);
    ReadUploadChunk();
  }

  void ReadUploadChunk() {
    auto& body = upload_parser_->get().body();
    body.data = chunk_.data();
    body.size = chunk_.size();
    beast::get_lowest_layer(stream_).expires_after(kReadTimeout);
    http::async_read_some(
        stream_, buffer_, *upload_parser_,
        [self = this->shared_from_this()](beast::error_code ec, size_t) {
          self->OnUploadChunk(ec);
        });
  }

  void OnUploadChunk(beast::error_code ec) {
    if (ec == http::error::need_buffer) ec = {};
    if (ec) {
      upload_.reset();  // removes the partial bytes
      return Close();
    }
    const size_t got = chunk_.size() - upload_parser_->get().body().size;
    if (got > 0) {
      v1::UploadModelRequest r;
      r.set_chunk(chunk_.data(), got);
      if (absl::Status s = upload_->Add(r); !s.ok()) return RespondError(s);
    }
    if (!upload_parser_->is_done()) return ReadUploadChunk();
    keep_alive_ = upload_parser_->get().keep_alive();
    absl::StatusOr<v1::Model> model = server_->api->FinishUpload(tenant_, *upload_);
    upload_.reset();
    if (!model.ok()) return RespondError(model.status());
    Respond(200, ToJson(*model));
  }

  // ---- event stream
  void StartEvents(const std::string& tenant, const std::string& job_id) {
    v1::WatchJobRequest r;
    r.set_job_id(job_id);
    std::optional<std::string> after = QueryValue(target_, "after_seq");
    if (!after) after = Header("last-event-id");
    if (after && !after->empty()) {
      int64_t seq = 0;
      if (!absl::SimpleAtoi(*after, &seq)) {
        return RespondError(absl::InvalidArgumentError(absl::StrCat(
            "after_seq (or Last-Event-ID): \"", *after, "\" is not a number")));
      }
      r.set_after_seq(seq);
    }
    absl::StatusOr<std::shared_ptr<WatchStream>> watch =
        server_->api->Watch(tenant, r, this, WatchTransport::kHttp);
    if (!watch.ok()) return RespondError(watch.status());
    auto res = std::make_shared<http::response<http::empty_body>>(http::status::ok,
                                                                  version_);
    res->set(http::field::server, "zeroq");
    res->set(http::field::content_type, "text/event-stream");
    res->set(http::field::cache_control, "no-cache");
    res->keep_alive(false);  // the stream ends with the connection
    auto sr = std::make_shared<http::response_serializer<http::empty_body>>(*res);
    beast::get_lowest_layer(stream_).expires_never();
    http::async_write_header(
        stream_, *sr,
        [self = this->shared_from_this(), res, sr,
         watch = *std::move(watch)](beast::error_code ec, size_t) mutable {
          if (ec) return self->Close();  // never started: nothing to end
          self->watch_ = std::move(watch);
          self->WatchForDisconnect();
          self->watch_->Start();
        });
  }

  // A read that only ends when the client closes (or the stream is closed):
  // the client leaving ends the watch.
  void WatchForDisconnect() {
    stream_.async_read_some(
        net::buffer(discard_),
        [self = this->shared_from_this()](beast::error_code ec, size_t) {
          if (!ec) return self->WatchForDisconnect();
          if (self->watch_) self->watch_->Cancel();
        });
  }

  // ---- download, with Range
  void StartDownload(const std::string& tenant, const std::string& job_id,
                     const std::string& name) {
    v1::DownloadArtifactRequest r;
    r.set_job_id(job_id);
    r.set_artifact(name);
    absl::StatusOr<ArtifactRef> ref = server_->api->OpenArtifact(tenant, r);
    if (!ref.ok()) return RespondError(ref.status());
    const int64_t size = ref->size_bytes;
    int64_t first = 0, last = size - 1;
    bool partial = false;
    if (std::optional<std::string> range = Header("range")) {
      // One range: bytes=FIRST-[LAST] or bytes=-SUFFIX.
      absl::string_view spec = *range;
      bool ok = absl::ConsumePrefix(&spec, "bytes=") && !absl::StrContains(spec, ',');
      std::pair<absl::string_view, absl::string_view> p =
          absl::StrSplit(spec, absl::MaxSplits('-', 1));
      int64_t a = 0, b = 0;
      if (ok && p.first.empty() && absl::SimpleAtoi(p.second, &b) && b > 0) {
        first = std::max<int64_t>(0, size - b);
      } else if (ok && absl::SimpleAtoi(p.first, &a) &&
                 (p.second.empty() || (absl::SimpleAtoi(p.second, &b) && b >= a))) {
        first = a;
        if (!p.second.empty()) last = std::min(b, size - 1);
      } else {
        ok = false;
      }
      if (!ok || first >= size) {
        return Respond(416,
                       ErrorJson(absl::OutOfRangeError(absl::StrCat(
                           "Range \"", *range, "\" is outside the artifact's ",
                           size, " bytes"))),
                       "application/json", absl::StrCat("bytes */", size));
      }
      partial = true;
    }
    fd_ = open(ref->path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      LogWarning({tenant, job_id, ""}, absl::StrCat("artifact ", name, " missing at ", ref->path));
      return RespondError(absl::DataLossError("the artifact's stored bytes are missing"));
    }
    file_pos_ = first;
    file_end_ = last + 1;
    file_res_ = std::make_shared<http::response<http::buffer_body>>(
        partial ? http::status::partial_content : http::status::ok, version_);
    file_res_->set(http::field::server, "zeroq");
    file_res_->set(http::field::content_type, "application/octet-stream");
    file_res_->set(http::field::accept_ranges, "bytes");
    file_res_->set(http::field::etag, absl::StrCat("\"", ref->sha256, "\""));
    file_res_->set("X-Content-SHA256", ref->sha256);
    if (partial) {
      file_res_->set(http::field::content_range,
                     absl::StrCat("bytes ", first, "-", last, "/", size));
    }
    file_res_->content_length(file_end_ - file_pos_);
    file_res_->keep_alive(keep_alive_);
    file_res_->body().data = nullptr;
    file_res_->body().more = true;
    file_sr_ = std::make_shared<http::response_serializer<http::buffer_body>>(*file_res_);
    file_buf_.resize(server_->options.download_chunk_bytes);
    status_ = partial ? 206 : 200;
    http::async_write_header(
        stream_, *file_sr_,
        [self = this->shared_from_this()](beast::error_code ec, size_t) {
          if (ec) return self->EndDownload(true);
          self->WriteFileChunk();
        });
  }

  void WriteFileChunk() {
    const int64_t n = std::min<int64_t>(file_buf_.size(), file_end_ - file_pos_);
    int64_t got = 0;
    while (got < n) {
      ssize_t r = pread(fd_, file_buf_.data() + got, n - got, file_pos_ + got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return EndDownload(true);  // cut: the client sees a short body
      got += r;
    }
    file_pos_ += n;
    file_res_->body().data = n > 0 ? file_buf_.data() : nullptr;
    file_res_->body().size = static_cast<size_t>(n);
    file_res_->body().more = file_pos_ < file_end_;
    beast::get_lowest_layer(stream_).expires_after(kReadTimeout);
    http::async_write(stream_, *file_sr_,
                      [self = this->shared_from_this()](beast::error_code ec, size_t) {
                        if (ec == http::error::need_buffer) ec = {};
                        if (ec) return self->EndDownload(true);
                        if (self->file_sr_->is_done()) return self->EndDownload(false);
                        self->WriteFileChunk();
                      });
  }

  void EndDownload(bool failed) {
    Record(status_);
    const bool close = failed || file_res_->need_eof();
    ::close(fd_);
    fd_ = -1;
    file_sr_.reset();
    file_res_.reset();
    Next(close);
  }

  Stream stream_;
  HttpServer::Impl* const server_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::empty_body>> header_parser_;
  std::optional<http::request_parser<http::string_body>> body_parser_;
  std::optional<http::request_parser<http::buffer_body>> upload_parser_;
  unsigned version_ = 11;
  bool keep_alive_ = true;
  http::verb method_ = http::verb::unknown;
  Target target_;
  std::string route_ = "other";
  absl::Time start_;
  int status_ = 200;
  // upload
  std::string tenant_;
  std::unique_ptr<UploadAssembler> upload_;
  std::vector<char> chunk_;
  // event stream
  std::shared_ptr<WatchStream> watch_;
  v1::JobState last_state_ = v1::JOB_STATE_UNSPECIFIED;
  char discard_[512];
  // download
  int fd_ = -1;
  int64_t file_pos_ = 0, file_end_ = 0;
  std::vector<char> file_buf_;
  std::shared_ptr<http::response<http::buffer_body>> file_res_;
  std::shared_ptr<http::response_serializer<http::buffer_body>> file_sr_;
};

}  // namespace

void HttpServer::Impl::Accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec,
                                                     tcp::socket socket) {
    if (stopped) return;
    if (!ec) {
      if (tls) {
        std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(
            beast::ssl_stream<beast::tcp_stream>(std::move(socket), *tls), this)
            ->Run();
      } else {
        std::make_shared<Session<beast::tcp_stream>>(
            beast::tcp_stream(std::move(socket)), this)
            ->Run();
      }
    }
    if (acceptor.is_open()) Accept();
  });
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

int HttpServer::port() const { return impl_->port; }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(
    Api* api, HttpOptions options) {
  auto impl = std::make_unique<Impl>(api, options);
  const std::string& listen = impl->options.listen;
  const size_t colon = listen.rfind(':');
  int port = 0;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_listen: \"", listen, "\" is not host:port"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() > 1 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  beast::error_code ec;
  net::ip::address address = net::ip::make_address(host.empty() ? "0.0.0.0" : host, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--http_listen: \"", host, "\" is not an IP address"));
  }
  if (!impl->options.tls_cert_file.empty()) {
    impl->tls.emplace(ssl::context::tls_server);
    impl->tls->set_options(ssl::context::default_workarounds |
                           ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                           ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
    impl->tls->use_certificate_chain_file(impl->options.tls_cert_file, ec);
    if (!ec)
      impl->tls->use_private_key_file(impl->options.tls_key_file, ssl::context::pem, ec);
    if (!ec && !impl->options.tls_client_ca_file.empty()) {
      impl->tls->load_verify_file(impl->options.tls_client_ca_file, ec);
      impl->tls->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
    }
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("HTTP TLS files: ", ec.message()));
    }
  }
  tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for HTTP on ", listen, ": ", ec.message()));
  }
  impl->port = impl->acceptor.local_endpoint().port();
  impl->Accept();
  const int threads = std::max(1, impl->options.threads);
  for (int i = 0; i < threads; ++i) {
    Impl* raw = impl.get();
    impl->threads.emplace_back([raw] { raw->ioc.run(); });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

void HttpServer::Stop() {
  if (impl_->stopped.exchange(true)) return;
  net::post(impl_->ioc, [impl = impl_.get()] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
  // Responses and the event streams' last frames in flight get a moment;
  // idle keep-alive connections are simply closed.
  const absl::Time deadline = absl::Now() + absl::Milliseconds(300);
  while (impl_->sessions > 0 && absl::Now() < deadline)
    absl::SleepFor(absl::Milliseconds(10));
  impl_->ioc.stop();
  for (std::thread& t : impl_->threads) t.join();
  impl_->threads.clear();
}

}  // namespace zeroq::server
