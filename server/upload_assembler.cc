#include "server/upload_assembler.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/validation.h"

namespace zeroq::server {

UploadAssembler::UploadAssembler(BlobStore* blobs, int64_t max_model_bytes,
                                 QuotaFn check_quota)
    : blobs_(blobs),
      max_model_bytes_(max_model_bytes),
      check_quota_(std::move(check_quota)) {}

absl::Status UploadAssembler::Add(const v1::UploadModelRequest& request) {
  if (failed_)
    return absl::FailedPreconditionError("the upload already failed");
  absl::Status s = [&]() -> absl::Status {
    if (request.has_metadata()) {
      if (writer_)
        return absl::InvalidArgumentError(
            "metadata: sent twice; send it once, first");
      ZQ_RETURN_IF_ERROR(
          ValidateModelMetadata(request.metadata(), max_model_bytes_));
      if (check_quota_) ZQ_RETURN_IF_ERROR(check_quota_(request.metadata()));
      metadata_ = request.metadata();
      ZQ_ASSIGN_OR_RETURN(writer_, blobs_->NewWriter());
      return absl::OkStatus();
    }
    if (!writer_) {
      return absl::InvalidArgumentError(
          "the first message must carry metadata (name, input shape, size, "
          "sha256)");
    }
    if (request.payload_case() != v1::UploadModelRequest::kChunk) {
      return absl::InvalidArgumentError(
          "a message with neither metadata nor a chunk");
    }
    const std::string& chunk = request.chunk();
    if (chunk.empty() || static_cast<int64_t>(chunk.size()) > kMaxChunkBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk: ", chunk.size(), " bytes; chunks hold 1 to ",
                       kMaxChunkBytes, " bytes"));
    }
    if (writer_->bytes_written() + static_cast<int64_t>(chunk.size()) >
        metadata_.size_bytes()) {
      return absl::DataLossError(
          absl::StrCat("received more than the ", metadata_.size_bytes(),
                       " bytes announced in metadata.size_bytes"));
    }
    return writer_->Append(chunk);
  }();
  if (!s.ok()) {
    failed_ = true;
    writer_.reset();  // removes the partial bytes
  }
  return s;
}

absl::StatusOr<UploadAssembler::Result> UploadAssembler::Finish() {
  if (failed_)
    return absl::FailedPreconditionError("the upload already failed");
  if (!writer_) {
    return absl::InvalidArgumentError(
        "no metadata received: send metadata, then the model in chunks");
  }
  absl::StatusOr<BlobInfo> blob =
      writer_->Commit(metadata_.size_bytes(), metadata_.sha256());
  writer_.reset();
  failed_ = true;  // one Finish
  if (!blob.ok()) return blob.status();
  return Result{metadata_, *blob};
}

}  // namespace zeroq::server
