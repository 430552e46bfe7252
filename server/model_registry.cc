#include "server/model_registry.h"

#include <algorithm>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "server/log.h"
#include "server/records.h"
#include "server/sha256.h"
#include "server/validation.h"

namespace zeroq::server {

namespace fs = std::filesystem;

namespace {

// Models are named by what makes them the same model: the tenant, the bytes
// and the input shape, so an identical upload finds the existing record.
std::string ModelId(const std::string& tenant, const std::string& sha256,
                    const google::protobuf::RepeatedField<int64_t>& shape) {
  return "m-" + Sha256Hex(absl::StrCat(tenant, "\n", sha256, "\n",
                                       absl::StrJoin(shape, ",")))
                    .substr(0, 20);
}

}  // namespace

ModelRegistry::ModelRegistry(RegistryOptions options, JobStore* store,
                             BlobStore* blobs, TenantQuotas* quotas,
                             Launcher* launcher)
    : options_(std::move(options)),
      store_(store),
      blobs_(blobs),
      quotas_(quotas),
      launcher_(launcher) {}

ModelRegistry::~ModelRegistry() { Stop(); }

std::string ModelRegistry::InspectDir(const std::string& model_id) const {
  return (fs::path(options_.work_dir) / ("inspect-" + model_id)).string();
}

// ---------------------------------------------------------------- start/stop

absl::Status ModelRegistry::Start() {
  if (options_.work_dir.empty())
    return absl::InvalidArgumentError("RegistryOptions.work_dir is required");
  if (options_.redactor == nullptr)
    return absl::InvalidArgumentError("RegistryOptions.redactor is required");
  if (options_.max_concurrent_inspections < 1) {
    // 0 would leave every model INSPECTING for ever.
    return absl::InvalidArgumentError(
        "RegistryOptions.max_concurrent_inspections must be >= 1");
  }
  // Left INSPECTING by a previous run that died or was stopped mid-way.
  ZQ_ASSIGN_OR_RETURN(std::vector<v1::Model> inspecting,
                      store_->ModelsInState(v1::MODEL_INSPECTING));
  absl::MutexLock lock(&mu_);
  if (started_ || stopping_) {
    return absl::FailedPreconditionError(
        "ModelRegistry::Start called twice or after Stop");
  }
  started_ = true;
  for (const v1::Model& m : inspecting) {
    // A model registered before Start is queued already.
    if (std::find(pending_.begin(), pending_.end(), m.id()) == pending_.end())
      pending_.push_back(m.id());
  }
  thread_ = std::thread([this] { InspectionLoop(); });
  return absl::OkStatus();
}

void ModelRegistry::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    // Those waiting stay INSPECTING in the store: the next Start queues them.
    pending_.clear();
    wake_.SignalAll();
  }
  // Once the loop has returned nothing starts any more, and every started
  // worker's handle is in running_ or finished_.
  if (thread_.joinable()) thread_.join();
  std::vector<WorkerHandle*> to_cancel;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, handle] : running_) {
      if (handle) to_cancel.push_back(handle.get());
    }
  }
  // Outside mu_, in case a launcher reports the exit from inside Cancel.
  // The handles stay alive: only this thread destroys them now.
  for (WorkerHandle* handle : to_cancel) handle->Cancel();
  std::vector<std::unique_ptr<WorkerHandle>> reap;
  {
    absl::MutexLock lock(&mu_);
    auto all_exited = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return running_.empty();
    };
    mu_.AwaitWithTimeout(absl::Condition(&all_exited),
                         options_.kill_grace + absl::Seconds(10));
    reap.swap(finished_);
    // Workers that did not report in time: their handles go too (a
    // process's waits for it); a late on_exit finds nothing to erase.
    for (auto& [id, handle] : running_) {
      if (handle) reap.push_back(std::move(handle));
      LogWarning({"", "", id}, "the inspection did not stop in time");
    }
    running_.clear();
  }
  reap.clear();
}

// ---------------------------------------------------------------- models

absl::StatusOr<v1::Model> ModelRegistry::Register(
    const std::string& tenant, const v1::ModelMetadata& metadata,
    const BlobInfo& blob) {
  const std::string id = ModelId(tenant, blob.sha256, metadata.input_shape());
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      return absl::UnavailableError(
          "the server is shutting down; upload again later");
    }
  }
  v1::Model model;
  {
    // From the existence check until the model's reference to the blob is
    // stored: a RemoveBlobIfUnused of the same bytes (another tenant's
    // delete) runs wholly before (the check fails) or after (it sees the
    // reference).
    absl::MutexLock blob_lock(&quotas_->blob_mutex());
    if (!blobs_->Exists(blob.sha256)) {
      return absl::AbortedError(
          "the uploaded bytes were removed by a concurrent DeleteModel; "
          "upload again");
    }
    absl::StatusOr<v1::Model> existing = store_->GetModel(id);
    if (existing.ok()) {
      existing->set_deduplicated(true);
      return existing;
    }
    if (existing.status().code() != absl::StatusCode::kNotFound)
      return existing.status();
    model.set_id(id);
    model.set_tenant(tenant);
    model.set_name(metadata.name());
    model.set_sha256(blob.sha256);
    model.set_size_bytes(blob.size_bytes);
    *model.mutable_input_shape() = metadata.input_shape();
    model.set_state(v1::MODEL_INSPECTING);
    SetNow(model.mutable_create_time());
    ZQ_RETURN_IF_ERROR(store_->PutModel(model));
  }
  quotas_->RefreshStoredBytes(tenant);
  LogInfo({tenant, "", id},
          absl::StrCat("uploaded \"", model.name(), "\", ", model.size_bytes(),
                       " bytes; inspecting"));
  absl::MutexLock lock(&mu_);
  // Even when Stop came in between: the model is stored INSPECTING, and the
  // next Start inspects it.
  pending_.push_back(id);
  wake_.Signal();
  return model;
}

absl::StatusOr<v1::Model> ModelRegistry::Get(const std::string& tenant,
                                             const std::string& id) {
  return OwnedBy(store_->GetModel(id), tenant, "model", id);
}

absl::StatusOr<Page<v1::Model>> ModelRegistry::List(
    const std::string& tenant, int page_size, const std::string& page_token) {
  ZQ_ASSIGN_OR_RETURN(int size, NormalizePageSize(page_size));
  return store_->ListModels(tenant, size, page_token);
}

absl::Status ModelRegistry::Delete(const std::string& tenant,
                                   const std::string& id) {
  ZQ_ASSIGN_OR_RETURN(v1::Model model, Get(tenant, id));
  if (model.state() == v1::MODEL_INSPECTING) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model ", id,
        " is being inspected; delete it once it is READY or INVALID"));
  }
  ZQ_ASSIGN_OR_RETURN(int64_t active, store_->CountActiveJobsForModel(id));
  if (active > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(active, " queued or running job(s) use model ", id,
                     "; cancel them or wait for them to finish"));
  }
  absl::Status deleted = store_->DeleteModel(id);
  if (absl::IsNotFound(deleted)) {
    // A concurrent Delete won: answer as for any missing model.
    return absl::NotFoundError(absl::StrCat("model \"", id, "\" not found"));
  }
  ZQ_RETURN_IF_ERROR(deleted);
  LogInfo({tenant, "", id}, "deleted");
  absl::Status removed = quotas_->RemoveBlobIfUnused(model.sha256());
  quotas_->RefreshStoredBytes(tenant);
  return removed;
}

int ModelRegistry::inspections_in_flight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(running_.size() + pending_.size());
}

// ---------------------------------------------------------------- inspections

void ModelRegistry::InspectionLoop() {
  while (true) {
    std::vector<std::string> ids;
    std::vector<std::unique_ptr<WorkerHandle>> reap;
    {
      absl::MutexLock lock(&mu_);
      while (!stopping_ &&
             static_cast<int>(running_.size()) <
                 options_.max_concurrent_inspections &&
             !pending_.empty()) {
        std::string id = std::move(pending_.front());
        pending_.pop_front();
        if (running_.contains(id)) continue;  // queued twice; once is enough
        running_.emplace(id, nullptr);  // counts against the limit from now
        ids.push_back(std::move(id));
      }
      reap.swap(finished_);
      if (ids.empty() && reap.empty()) {
        if (stopping_) return;
        wake_.WaitWithTimeout(&mu_, absl::Seconds(1));
        continue;
      }
    }
    reap.clear();  // may wait for the workers' threads: outside the lock
    // Reading the model, preparing its folder and starting the worker are
    // done without the lock: on_exit takes it, and may run before Start
    // returns.
    for (const std::string& id : ids) {
      auto release = [&] {
        absl::MutexLock lock(&mu_);
        running_.erase(id);
      };
      absl::StatusOr<v1::Model> model = store_->GetModel(id);
      if (!model.ok() || model->state() != v1::MODEL_INSPECTING) {
        if (!model.ok() && !absl::IsNotFound(model.status())) {
          LogWarning({"", "", id}, absl::StrCat("reading the model to inspect: ",
                                                model.status().message()));
        }
        release();
        continue;
      }
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) {
          // Left INSPECTING for the next Start.
          running_.erase(id);
          continue;
        }
      }
      // Inspections run beside jobs, on the CPU with one thread: loading a
      // model and one forward pass is small next to a job.
      WorkerLaunch launch;
      v1::InspectRequest* inspect = launch.request.mutable_inspect();
      inspect->set_model_path(blobs_->Path(model->sha256()));
      *inspect->mutable_input_shape() = model->input_shape();
      launch.worker_path = options_.worker_path;
      launch.work_dir = InspectDir(id);
      launch.env = {{"CUDA_VISIBLE_DEVICES", ""}};
      launch.time_limit = options_.inspect_time_limit;
      launch.kill_grace = options_.kill_grace;
      std::error_code ec;
      fs::remove_all(launch.work_dir, ec);  // a previous run's attempt
      fs::create_directories(launch.work_dir, ec);
      absl::StatusOr<std::unique_ptr<WorkerHandle>> worker = launcher_->Start(
          std::move(launch), [](const v1::JobEvent&) {},
          [this, id](WorkerOutcome o) { OnInspectionExit(id, std::move(o)); });
      if (!worker.ok()) {
        release();
        fs::remove_all(InspectDir(id), ec);
        model->set_state(v1::MODEL_INVALID);
        model->set_state_reason(options_.redactor->ForTenant(absl::StrCat(
            "could not start the worker: ", worker.status().message())));
        absl::Status s = store_->PutModel(*model);
        LogIds log_ids{model->tenant(), "", id};
        LogError(log_ids, absl::StrCat("could not start the worker: ",
                                       worker.status().ToString()));
        if (!s.ok()) {
          LogError(log_ids,
                   absl::StrCat("storing the inspection: ", s.ToString()));
        }
        continue;
      }
      absl::MutexLock lock(&mu_);
      auto it = running_.find(id);
      if (it != running_.end()) {
        it->second = *std::move(worker);
      } else {
        finished_.push_back(*std::move(worker));  // it has exited already
      }
    }
  }
}

void ModelRegistry::OnInspectionExit(const std::string& model_id,
                                     WorkerOutcome outcome) {
  using Kind = WorkerOutcome::Kind;
  bool stopping;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
  }
  // The model's new state is stored before the inspection stops counting as
  // in flight, so that whoever sees it finished reads the result.
  auto finish = [&] {
    absl::MutexLock lock(&mu_);
    auto it = running_.find(model_id);
    if (it != running_.end()) {
      if (it->second) finished_.push_back(std::move(it->second));
      running_.erase(it);
    }
    wake_.Signal();
  };
  std::error_code ec;
  fs::remove_all(InspectDir(model_id), ec);
  if (stopping && outcome.kind == Kind::kCancelled) {
    finish();
    return;  // inspected again at the next Start
  }
  absl::StatusOr<v1::Model> model = store_->GetModel(model_id);
  if (!model.ok()) {
    finish();
    return;
  }
  if (outcome.kind == Kind::kSucceeded && outcome.inspection) {
    model->set_state(v1::MODEL_READY);
    *model->mutable_summary() = *std::move(outcome.inspection);
    model->clear_state_reason();
  } else {
    model->set_state(v1::MODEL_INVALID);
    switch (outcome.kind) {
      case Kind::kTimedOut:
        model->set_state_reason(
            absl::StrCat("inspecting the model took longer than ",
                         absl::FormatDuration(options_.inspect_time_limit)));
        break;
      case Kind::kCrashed:
        model->set_state_reason(options_.redactor->ForTenant(absl::StrCat(
            "the model crashed the worker: ", outcome.error.message())));
        break;
      default:
        model->set_state_reason(
            outcome.error.message().empty()
                ? "inspection failed"
                : options_.redactor->ForTenant(outcome.error.message()));
    }
  }
  absl::Status s = store_->PutModel(*model);
  LogIds ids{model->tenant(), "", model_id};
  if (!s.ok())
    LogError(ids, absl::StrCat("storing the inspection: ", s.ToString()));
  // The log keeps the worker's full text.
  LogInfo(ids, absl::StrCat("inspected: ", v1::ModelState_Name(model->state()),
                            " ", outcome.error.message().empty()
                                     ? model->state_reason()
                                     : outcome.error.message()));
  if (options_.metrics)
    options_.metrics->InspectionFinished(model->state() == v1::MODEL_READY);
  finish();
}

}  // namespace zeroq::server
