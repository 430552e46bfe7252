#include "client/client.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "server/sha256.h"

namespace zeroq::client {

namespace fs = std::filesystem;

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

namespace {

bool Retryable(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::INTERNAL &&
             s.error_message().find("RST_STREAM") != std::string::npos;
}

void Backoff(int attempt) {
  std::this_thread::sleep_for(
      std::chrono::milliseconds(std::min(2000, 100 << std::min(attempt, 5))));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const std::string& target, ClientOptions options) {
  if (target.empty())
    return absl::InvalidArgumentError("no server address given");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(8 << 20);
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::InsecureChannelCredentials();
  if (!options.tls_ca_file.empty()) {
    auto read = [](const std::string& path, std::string* out) {
      std::ifstream in(path, std::ios::binary);
      if (!in) return false;
      out->assign(std::istreambuf_iterator<char>(in),
                  std::istreambuf_iterator<char>());
      return true;
    };
    grpc::SslCredentialsOptions ssl;
    if (!read(options.tls_ca_file, &ssl.pem_root_certs)) {
      return absl::NotFoundError(
          absl::StrCat("cannot read ", options.tls_ca_file));
    }
    if (!options.tls_cert_file.empty() &&
        (!read(options.tls_cert_file, &ssl.pem_cert_chain) ||
         !read(options.tls_key_file, &ssl.pem_private_key))) {
      return absl::NotFoundError(absl::StrCat(
          "cannot read ", options.tls_cert_file, " or ", options.tls_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
  }
  auto channel = grpc::CreateCustomChannel(target, credentials, args);
  return std::make_unique<Client>(std::move(channel), std::move(options));
}

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(std::move(channel)),
      stub_(v1::ZeroQ::NewStub(channel_)),
      options_(std::move(options)) {}

std::unique_ptr<grpc::ClientContext> Client::NewContext(bool deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (!options_.api_key.empty())
    ctx->AddMetadata("authorization", "Bearer " + options_.api_key);
  if (deadline)
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  return ctx;
}

absl::StatusOr<v1::Model> Client::UploadModel(
    const std::string& path, const std::string& name,
    const std::vector<int64_t>& input_shape) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  v1::ModelMetadata metadata;
  metadata.set_name(name);
  for (int64_t d : input_shape) metadata.add_input_shape(d);
  metadata.set_size_bytes(static_cast<int64_t>(bytes.size()));
  metadata.set_sha256(server::Sha256Hex(bytes));
  return UploadBytes(metadata, bytes);
}

absl::StatusOr<v1::Model> Client::UploadBytes(const v1::ModelMetadata& metadata,
                                              const std::string& bytes) {
  auto ctx = NewContext(false);
  v1::Model model;
  std::unique_ptr<grpc::ClientWriter<v1::UploadModelRequest>> writer =
      stub_->UploadModel(ctx.get(), &model);
  v1::UploadModelRequest req;
  *req.mutable_metadata() = metadata;
  bool ok = writer->Write(req);
  for (size_t off = 0; ok && off < bytes.size();
       off += options_.upload_chunk_bytes) {
    req.set_chunk(bytes.substr(off, options_.upload_chunk_bytes));
    ok = writer->Write(req);
  }
  writer->WritesDone();
  ZQ_RETURN_IF_ERROR(FromGrpc(writer->Finish()));
  return model;
}

absl::StatusOr<v1::Model> Client::GetModel(const std::string& id) {
  auto ctx = NewContext();
  v1::GetModelRequest req;
  req.set_model_id(id);
  v1::Model model;
  ZQ_RETURN_IF_ERROR(FromGrpc(stub_->GetModel(ctx.get(), req, &model)));
  return model;
}

absl::StatusOr<v1::Model> Client::WaitForModel(const std::string& id,
                                               absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  while (true) {
    ZQ_ASSIGN_OR_RETURN(v1::Model model, GetModel(id));
    if (model.state() != v1::MODEL_INSPECTING) return model;
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("model ", id, " is still being inspected after ",
                       absl::FormatDuration(timeout)));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

absl::StatusOr<v1::ListModelsResponse> Client::ListModels(
    int page_size, const std::string& token) {
  auto ctx = NewContext();
  v1::ListModelsRequest req;
  req.set_page_size(page_size);
  req.set_page_token(token);
  v1::ListModelsResponse resp;
  ZQ_RETURN_IF_ERROR(FromGrpc(stub_->ListModels(ctx.get(), req, &resp)));
  return resp;
}

absl::Status Client::DeleteModel(const std::string& id) {
  auto ctx = NewContext();
  v1::DeleteModelRequest req;
  req.set_model_id(id);
  v1::DeleteModelResponse resp;
  return FromGrpc(stub_->DeleteModel(ctx.get(), req, &resp));
}

absl::StatusOr<v1::Job> Client::SubmitJob(const v1::SubmitJobRequest& request) {
  v1::Job job;
  // Retried only when the request carries an id: then a retry cannot make a
  // second job.
  for (int attempt = 0;; ++attempt) {
    auto ctx = NewContext();
    grpc::Status s = stub_->SubmitJob(ctx.get(), request, &job);
    if (s.ok()) return job;
    if (request.request_id().empty() || !Retryable(s) || attempt >= 3)
      return FromGrpc(s);
    Backoff(attempt);
  }
}

absl::StatusOr<v1::Job> Client::GetJob(const std::string& id) {
  auto ctx = NewContext();
  v1::GetJobRequest req;
  req.set_job_id(id);
  v1::Job job;
  ZQ_RETURN_IF_ERROR(FromGrpc(stub_->GetJob(ctx.get(), req, &job)));
  return job;
}

absl::StatusOr<v1::ListJobsResponse> Client::ListJobs(
    v1::JobState state, const std::string& model_id, int page_size,
    const std::string& token, v1::JobView view) {
  auto ctx = NewContext();
  v1::ListJobsRequest req;
  req.set_view(view);
  req.set_state(state);
  req.set_model_id(model_id);
  req.set_page_size(page_size);
  req.set_page_token(token);
  v1::ListJobsResponse resp;
  ZQ_RETURN_IF_ERROR(FromGrpc(stub_->ListJobs(ctx.get(), req, &resp)));
  return resp;
}

absl::StatusOr<v1::Job> Client::CancelJob(const std::string& id) {
  auto ctx = NewContext();
  v1::CancelJobRequest req;
  req.set_job_id(id);
  v1::Job job;
  ZQ_RETURN_IF_ERROR(FromGrpc(stub_->CancelJob(ctx.get(), req, &job)));
  return job;
}

absl::StatusOr<int64_t> Client::DeleteJob(const std::string& id) {
  auto ctx = NewContext();
  v1::DeleteJobRequest req;
  req.set_job_id(id);
  v1::DeleteJobResponse resp;
  ZQ_RETURN_IF_ERROR(FromGrpc(stub_->DeleteJob(ctx.get(), req, &resp)));
  return resp.freed_bytes();
}

absl::StatusOr<v1::Job> Client::WatchJob(const std::string& id,
                                         int64_t after_seq,
                                         const EventFn& on_event) {
  int64_t cursor = after_seq;
  int failures = 0;
  while (true) {
    auto ctx = NewContext(false);
    v1::WatchJobRequest req;
    req.set_job_id(id);
    req.set_after_seq(cursor);
    std::unique_ptr<grpc::ClientReader<v1::JobEvent>> reader =
        stub_->WatchJob(ctx.get(), req);
    v1::JobEvent event;
    bool stopped = false;
    while (reader->Read(&event)) {
      failures = 0;
      if (event.type() != v1::EVENT_HEARTBEAT) cursor = event.seq();
      if (on_event && !on_event(event)) {
        stopped = true;
        ctx->TryCancel();
        break;
      }
    }
    grpc::Status s = reader->Finish();
    if (stopped || s.ok()) return GetJob(id);
    if (!Retryable(s) || ++failures > options_.max_reconnects)
      return FromGrpc(s);
    Backoff(failures);  // resume after `cursor`: nothing is missed or repeated
  }
}

absl::StatusOr<v1::Artifact> Client::DownloadArtifact(
    const std::string& job_id, const std::string& artifact,
    const std::string& path) {
  std::string part = path + ".part";
  int failures = 0;
  while (true) {
    std::error_code ec;
    int64_t have = fs::exists(part, ec)
                       ? static_cast<int64_t>(fs::file_size(part, ec))
                       : 0;
    auto ctx = NewContext(false);
    v1::DownloadArtifactRequest req;
    req.set_job_id(job_id);
    req.set_artifact(artifact);
    req.set_offset(have);
    std::unique_ptr<grpc::ClientReader<v1::ArtifactChunk>> reader =
        stub_->DownloadArtifact(ctx.get(), req);
    std::ofstream out(part, std::ios::binary | std::ios::app);
    if (!out)
      return absl::PermissionDeniedError(absl::StrCat("cannot write ", part));
    v1::ArtifactChunk chunk;
    v1::Artifact info;
    info.set_name(artifact);
    info.set_size_bytes(-1);
    while (reader->Read(&chunk)) {
      failures = 0;
      if (info.size_bytes() < 0) {
        info.set_size_bytes(chunk.size_bytes());
        info.set_sha256(chunk.sha256());
      }
      out.write(chunk.data().data(),
                static_cast<std::streamsize>(chunk.data().size()));
    }
    out.close();
    grpc::Status s = reader->Finish();
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::OUT_OF_RANGE && have > 0) {
        fs::remove(part, ec);  // a stale part longer than the artifact
        continue;
      }
      if (!Retryable(s) || ++failures > options_.max_reconnects)
        return FromGrpc(s);
      Backoff(failures);
      continue;
    }
    ZQ_ASSIGN_OR_RETURN(std::string sha, server::Sha256File(part));
    if (sha != info.sha256() ||
        static_cast<int64_t>(fs::file_size(part, ec)) != info.size_bytes()) {
      fs::remove(part, ec);
      return absl::DataLossError(
          absl::StrCat("downloaded ", artifact, " does not match its SHA-256 ",
                       info.sha256(), "; download it again"));
    }
    fs::rename(part, path, ec);
    if (ec)
      return absl::InternalError(
          absl::StrCat("renaming ", part, ": ", ec.message()));
    return info;
  }
}

}  // namespace zeroq::client
