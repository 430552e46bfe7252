// upload_assembler.h: turns an UploadModel request stream into a committed
// blob, message by message, independent of gRPC.
//
//   UploadAssembler upload(blobs, max_model_bytes, check_quota);
//   for (each request) ZQ_RETURN_IF_ERROR(upload.Add(request));
//   ZQ_ASSIGN_OR_RETURN(UploadAssembler::Result r, upload.Finish());
//
// Rules: the first message is the metadata (validated, then `check_quota`
// may refuse it), every later one a chunk of 1 byte to 1 MiB, never more
// bytes than announced; Finish checks the size and SHA-256 (DATA_LOSS) and
// publishes the blob. After any error, or when destroyed unfinished, the
// partial bytes are removed. Not thread-safe: one stream, one assembler.
#ifndef ZEROQ_SERVER_UPLOAD_ASSEMBLER_H_
#define ZEROQ_SERVER_UPLOAD_ASSEMBLER_H_

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "server/blob_store.h"
#include "zeroq/v1/zeroq.pb.h"

namespace zeroq::server {

class UploadAssembler {
 public:
  using QuotaFn = std::function<absl::Status(const v1::ModelMetadata&)>;
  struct Result {
    v1::ModelMetadata metadata;
    BlobInfo blob;
  };

  // `blobs` must outlive the assembler; `check_quota` may be empty.
  UploadAssembler(BlobStore* blobs, int64_t max_model_bytes,
                  QuotaFn check_quota = {});

  absl::Status Add(const v1::UploadModelRequest& request);
  // REQUIRES: every Add returned OK. Called once.
  absl::StatusOr<Result> Finish();

 private:
  BlobStore* const blobs_;
  const int64_t max_model_bytes_;
  const QuotaFn check_quota_;
  v1::ModelMetadata metadata_;
  std::unique_ptr<BlobWriter> writer_;
  bool failed_ = false;
};

}  // namespace zeroq::server

#endif  // ZEROQ_SERVER_UPLOAD_ASSEMBLER_H_
