#include "server/service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/status_util.h"
#include "server/upload_assembler.h"
#include "server/validation.h"

namespace zeroq::server {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context,
                               const absl::Status& s) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

template <typename Request>
class RejectedWrite : public grpc::ServerWriteReactor<Request> {
 public:
  explicit RejectedWrite(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

grpc::Status Unavailable() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "the server is shutting down; retry shortly");
}

// ---------------------------------------------------------------- upload

class UploadReactor : public grpc::ServerReadReactor<v1::UploadModelRequest> {
 public:
  UploadReactor(JobManager* manager, Metrics* metrics, std::string tenant,
                v1::Model* response)
      : manager_(manager),
        metrics_(metrics),
        tenant_(std::move(tenant)),
        response_(response),
        upload_(manager->blobs(), manager->options().max_model_bytes,
                [this](const v1::ModelMetadata& m) {
                  return manager_->CheckUploadQuota(tenant_, m);
                }) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(ToGrpcStatus(Complete()));
      return;
    }
    absl::Status s = upload_.Add(request_);
    if (!s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Complete() {
    ZQ_ASSIGN_OR_RETURN(UploadAssembler::Result r, upload_.Finish());
    if (metrics_) metrics_->Uploaded(tenant_, r.blob.size_bytes);
    ZQ_ASSIGN_OR_RETURN(*response_,
                        manager_->RegisterModel(tenant_, r.metadata, r.blob));
    return absl::OkStatus();
  }

  JobManager* const manager_;
  Metrics* const metrics_;
  const std::string tenant_;
  v1::Model* const response_;
  v1::UploadModelRequest request_;
  UploadAssembler upload_;
};

// ---------------------------------------------------------------- download

class DownloadReactor : public grpc::ServerWriteReactor<v1::ArtifactChunk> {
 public:
  DownloadReactor(ArtifactRef ref, int64_t offset, int chunk_bytes)
      : ref_(std::move(ref)), offset_(offset), chunk_bytes_(chunk_bytes) {
    fd_ = open(ref_.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) {
      Finish(
          grpc::Status(grpc::StatusCode::DATA_LOSS,
                       absl::StrCat("the artifact's stored bytes are missing (",
                                    ref_.path, ")")));
      return;
    }
    Next();
  }
  ~DownloadReactor() override {
    if (fd_ >= 0) close(fd_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    chunk_.Clear();
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Next() {
    if (sent_first_ && offset_ >= ref_.size_bytes) {
      Finish(grpc::Status::OK);
      return;
    }
    if (!sent_first_) {
      chunk_.set_size_bytes(ref_.size_bytes);
      chunk_.set_sha256(ref_.sha256);
      sent_first_ = true;
    }
    int64_t n = std::min<int64_t>(chunk_bytes_, ref_.size_bytes - offset_);
    std::string* data = chunk_.mutable_data();
    data->resize(n);
    int64_t got = 0;
    while (got < n) {
      ssize_t r = pread(fd_, data->data() + got, n - got, offset_ + got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        Finish(grpc::Status(grpc::StatusCode::DATA_LOSS,
                            "reading the stored artifact failed"));
        return;
      }
      got += r;
    }
    chunk_.set_offset(offset_);
    offset_ += n;
    StartWrite(&chunk_);
  }

  const ArtifactRef ref_;
  int64_t offset_;
  const int chunk_bytes_;
  int fd_ = -1;
  bool sent_first_ = false;
  v1::ArtifactChunk chunk_;
};

}  // namespace

// ---------------------------------------------------------------- watch

// Streams a job's events. Owned by itself through self_ until OnDone; the
// EventLog and the service's heartbeat hold only weak references, so a wake
// that races with the end of the stream finds either a live reactor (that
// ignores it once finished) or nothing.
class WatchReactor : public grpc::ServerWriteReactor<v1::JobEvent>,
                     public EventListener,
                     public std::enable_shared_from_this<WatchReactor> {
 public:
  WatchReactor(std::shared_ptr<EventLog> log, int64_t after_seq)
      : log_(std::move(log)), cursor_(after_seq) {}

  void Begin(std::shared_ptr<WatchReactor> self) {
    {
      absl::MutexLock lock(&mu_);
      self_ = std::move(self);
      last_write_ = absl::Now();
    }
    Pump();
  }

  void OnEvents() override { Pump(); }
  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      last_write_ = absl::Now();
      if (!ok)
        finish_with_ =
            grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    Pump();
  }
  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      if (!finish_with_)
        finish_with_ = grpc::Status(grpc::StatusCode::CANCELLED,
                                    "cancelled by the client");
    }
    Pump();
  }
  void OnDone() override {
    std::shared_ptr<WatchReactor> self;
    absl::MutexLock lock(&mu_);
    self.swap(self_);  // freed when this returns, unless a wake holds it
  }

  // At shutdown: ends the stream, after the write in flight, with
  // UNAVAILABLE naming where to resume.
  void AbortForShutdown() {
    {
      absl::MutexLock lock(&mu_);
      if (!finish_with_) {
        finish_with_ = grpc::Status(
            grpc::StatusCode::UNAVAILABLE,
            absl::StrCat("the server is stopping; resume with after_seq=",
                         cursor_));
      }
    }
    Pump();
  }

  void Heartbeat(absl::Time now, absl::Duration interval) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || writing_ || now - last_write_ < interval) return;
      heartbeat_due_ = true;
    }
    Pump();
  }

 private:
  // Decides under the lock, acts without it: gRPC may run reactions inline.
  void Pump() {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || writing_ || self_ == nullptr) return;
      if (finish_with_) {
        action = kFinish;
        status = *finish_with_;
      } else {
        if (buffer_.empty()) {
          std::vector<v1::JobEvent> batch;
          switch (log_->ReadAfter(cursor_, 64, &batch, shared_from_this())) {
            case EventLog::Read::kEvents:
              buffer_.insert(buffer_.end(),
                             std::make_move_iterator(batch.begin()),
                             std::make_move_iterator(batch.end()));
              break;
            case EventLog::Read::kDone:
              action = kFinish;
              status = grpc::Status::OK;
              break;
            case EventLog::Read::kWait:
              break;
          }
        }
        if (!buffer_.empty()) {
          out_ = std::move(buffer_.front());
          buffer_.pop_front();
          cursor_ = out_.seq();
          heartbeat_due_ = false;
          action = kWrite;
        } else if (action == kNothing && heartbeat_due_) {
          heartbeat_due_ = false;
          out_.Clear();
          out_.set_type(v1::EVENT_HEARTBEAT);
          out_.set_seq(cursor_);
          int64_t nanos = absl::ToUnixNanos(absl::Now());
          out_.mutable_time()->set_seconds(nanos / 1000000000);
          out_.mutable_time()->set_nanos(
              static_cast<int32_t>(nanos % 1000000000));
          action = kWrite;
        }
      }
      if (action == kWrite) writing_ = true;
      if (action == kFinish) finished_ = true;
    }
    if (action == kWrite) StartWrite(&out_);
    if (action == kFinish) Finish(status);
  }

  const std::shared_ptr<EventLog> log_;
  absl::Mutex mu_;
  std::shared_ptr<WatchReactor> self_ ABSL_GUARDED_BY(mu_);
  int64_t cursor_ ABSL_GUARDED_BY(mu_);  // seq of the last event handed to gRPC
  std::deque<v1::JobEvent> buffer_ ABSL_GUARDED_BY(mu_);
  v1::JobEvent out_;  // owned by gRPC while writing_
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool heartbeat_due_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> finish_with_ ABSL_GUARDED_BY(mu_);
  absl::Time last_write_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------- service

ZeroQService::ZeroQService(JobManager* manager, ServiceOptions options)
    : manager_(manager), options_(std::move(options)) {
  heartbeat_ = std::thread([this] { HeartbeatLoop(); });
}

ZeroQService::~ZeroQService() {
  Shutdown();
  if (heartbeat_.joinable()) heartbeat_.join();
}

void ZeroQService::Shutdown() {
  std::vector<std::weak_ptr<WatchReactor>> watches;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;
    shutdown_ = true;
    watches.swap(watches_);
    heartbeat_wake_.SignalAll();
  }
  for (const auto& w : watches) {
    if (auto r = w.lock()) r->AbortForShutdown();
  }
}

void ZeroQService::HeartbeatLoop() {
  absl::MutexLock lock(&mu_);
  while (!shutdown_) {
    heartbeat_wake_.WaitWithTimeout(
        &mu_, std::min(options_.heartbeat_interval / 4, absl::Seconds(1)));
    if (shutdown_) break;
    std::vector<std::shared_ptr<WatchReactor>> live;
    live.reserve(watches_.size());
    auto end =
        std::remove_if(watches_.begin(), watches_.end(), [&](const auto& w) {
          std::shared_ptr<WatchReactor> r = w.lock();
          if (r == nullptr) return true;  // the stream has ended
          live.push_back(std::move(r));
          return false;
        });
    watches_.erase(end, watches_.end());
    if (options_.metrics)
      options_.metrics->SetWatchStreams(static_cast<int64_t>(live.size()));
    mu_.Unlock();
    absl::Time now = absl::Now();
    for (const auto& r : live) r->Heartbeat(now, options_.heartbeat_interval);
    live.clear();
    mu_.Lock();
  }
}

absl::StatusOr<std::string> ZeroQService::TenantOf(
    grpc::CallbackServerContext* context) {
  if (options_.tenants == nullptr)
    return std::string(TenantRegistry::kOpenTenant);
  std::optional<absl::string_view> authorization;
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it != metadata.end())
    authorization = absl::string_view(it->second.data(), it->second.size());
  ZQ_ASSIGN_OR_RETURN(const Tenant* tenant,
                      options_.tenants->Authenticate(authorization));
  return tenant->name;
}

grpc::ServerReadReactor<v1::UploadModelRequest>* ZeroQService::UploadModel(
    grpc::CallbackServerContext* context, v1::Model* response) {
  class Rejected : public grpc::ServerReadReactor<v1::UploadModelRequest> {
   public:
    explicit Rejected(const grpc::Status& s) { Finish(s); }
    void OnDone() override { delete this; }
  };
  if (IsShutDown()) return new Rejected(Unavailable());
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return new Rejected(ToGrpcStatus(tenant.status()));
  return new UploadReactor(manager_, options_.metrics, *tenant, response);
}

// The unary handlers: authenticate, call the manager, translate.
#define ZQ_TENANT_OR_FINISH(tenant, context)                         \
  absl::StatusOr<std::string> tenant##_or = TenantOf(context);       \
  if (!tenant##_or.ok()) return Done(context, tenant##_or.status()); \
  const std::string& tenant = *tenant##_or

grpc::ServerUnaryReactor* ZeroQService::GetModel(
    grpc::CallbackServerContext* context, const v1::GetModelRequest* request,
    v1::Model* response) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  absl::StatusOr<v1::Model> m = manager_->GetModel(tenant, request->model_id());
  if (m.ok()) *response = *std::move(m);
  return Done(context, m.status());
}

grpc::ServerUnaryReactor* ZeroQService::ListModels(
    grpc::CallbackServerContext* context, const v1::ListModelsRequest* request,
    v1::ListModelsResponse* response) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  absl::StatusOr<Page<v1::Model>> page =
      manager_->ListModels(tenant, request->page_size(), request->page_token());
  if (page.ok()) {
    for (v1::Model& m : page->items) *response->add_models() = std::move(m);
    response->set_next_page_token(page->next_page_token);
  }
  return Done(context, page.status());
}

grpc::ServerUnaryReactor* ZeroQService::DeleteModel(
    grpc::CallbackServerContext* context, const v1::DeleteModelRequest* request,
    v1::DeleteModelResponse*) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  return Done(context, manager_->DeleteModel(tenant, request->model_id()));
}

grpc::ServerUnaryReactor* ZeroQService::SubmitJob(
    grpc::CallbackServerContext* context, const v1::SubmitJobRequest* request,
    v1::Job* response) {
  if (IsShutDown()) {
    return Done(context,
                absl::UnavailableError(
                    "the server is shutting down; submit again shortly"));
  }
  ZQ_TENANT_OR_FINISH(tenant, context);
  absl::StatusOr<v1::Job> job = manager_->SubmitJob(tenant, *request);
  if (job.ok()) *response = *std::move(job);
  return Done(context, job.status());
}

grpc::ServerUnaryReactor* ZeroQService::GetJob(
    grpc::CallbackServerContext* context, const v1::GetJobRequest* request,
    v1::Job* response) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  absl::StatusOr<v1::Job> job = manager_->GetJob(tenant, request->job_id());
  if (job.ok()) *response = *std::move(job);
  return Done(context, job.status());
}

grpc::ServerUnaryReactor* ZeroQService::ListJobs(
    grpc::CallbackServerContext* context, const v1::ListJobsRequest* request,
    v1::ListJobsResponse* response) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  if (!v1::JobView_IsValid(request->view())) {
    return Done(context, absl::InvalidArgumentError(absl::StrCat(
                             "view: ", request->view(), " is not a JobView")));
  }
  absl::StatusOr<Page<v1::Job>> page =
      manager_->ListJobs(tenant, request->state(), request->model_id(),
                         request->page_size(), request->page_token());
  if (page.ok()) {
    const bool full = request->view() == v1::JOB_VIEW_FULL;
    for (v1::Job& j : page->items) {
      if (!full) {
        v1::JobResult* r = j.mutable_result();
        r->clear_layers();
        r->clear_activations();
        r->clear_frontier();
        r->mutable_chosen()->clear_bits();
      }
      *response->add_jobs() = std::move(j);
    }
    response->set_next_page_token(page->next_page_token);
  }
  return Done(context, page.status());
}

grpc::ServerUnaryReactor* ZeroQService::CancelJob(
    grpc::CallbackServerContext* context, const v1::CancelJobRequest* request,
    v1::Job* response) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  absl::StatusOr<v1::Job> job = manager_->CancelJob(tenant, request->job_id());
  if (job.ok()) *response = *std::move(job);
  return Done(context, job.status());
}

grpc::ServerUnaryReactor* ZeroQService::DeleteJob(
    grpc::CallbackServerContext* context, const v1::DeleteJobRequest* request,
    v1::DeleteJobResponse* response) {
  ZQ_TENANT_OR_FINISH(tenant, context);
  absl::StatusOr<int64_t> freed =
      manager_->DeleteJob(tenant, request->job_id());
  if (freed.ok()) response->set_freed_bytes(*freed);
  return Done(context, freed.status());
}

#undef ZQ_TENANT_OR_FINISH

grpc::ServerWriteReactor<v1::JobEvent>* ZeroQService::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  using Rejected = RejectedWrite<v1::JobEvent>;
  if (IsShutDown()) return new Rejected(Unavailable());
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return new Rejected(ToGrpcStatus(tenant.status()));
  if (request->after_seq() < 0) {
    return new Rejected(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                     "after_seq: must be >= 0"));
  }
  absl::StatusOr<std::shared_ptr<EventLog>> log =
      manager_->Watch(*tenant, request->job_id());
  if (!log.ok()) return new Rejected(ToGrpcStatus(log.status()));
  auto reactor =
      std::make_shared<WatchReactor>(*std::move(log), request->after_seq());
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return new Rejected(Unavailable());
    watches_.push_back(reactor);
  }
  WatchReactor* raw = reactor.get();
  raw->Begin(std::move(reactor));
  return raw;
}

grpc::ServerWriteReactor<v1::ArtifactChunk>* ZeroQService::DownloadArtifact(
    grpc::CallbackServerContext* context,
    const v1::DownloadArtifactRequest* request) {
  using Rejected = RejectedWrite<v1::ArtifactChunk>;
  if (IsShutDown()) return new Rejected(Unavailable());
  absl::StatusOr<std::string> tenant = TenantOf(context);
  if (!tenant.ok()) return new Rejected(ToGrpcStatus(tenant.status()));
  absl::StatusOr<ArtifactRef> ref =
      manager_->GetArtifact(*tenant, request->job_id(), request->artifact());
  if (!ref.ok()) return new Rejected(ToGrpcStatus(ref.status()));
  if (request->offset() < 0 || request->offset() > ref->size_bytes) {
    return new Rejected(
        grpc::Status(grpc::StatusCode::OUT_OF_RANGE,
                     absl::StrCat("offset: ", request->offset(),
                                  " is outside 0..", ref->size_bytes)));
  }
  return new DownloadReactor(*std::move(ref), request->offset(),
                             options_.download_chunk_bytes);
}

bool ZeroQService::IsShutDown() {
  absl::MutexLock lock(&mu_);
  return shutdown_;
}

}  // namespace zeroq::server
