// A fuzz target for what the server does with untrusted bytes before any
// worker sees them: request validation, the upload assembler, the tenants
// file, budget strings. The first input byte picks the target; the rest is
// its input. Built for libFuzzer by scripts/fuzz.sh (clang, ASan, UBSan),
// and replayed over the committed corpus by the `fuzz_corpus` test.
//
// Beyond "does not crash", it checks invariants: an upload that succeeds is
// stored with exactly the announced size and SHA-256; one that fails leaves
// no partial file behind.
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "core/pareto.h"
#include "google/protobuf/io/coded_stream.h"
#include "server/blob_store.h"
#include "server/sha256.h"
#include "server/tenants.h"
#include "server/upload_assembler.h"
#include "server/validation.h"
#include "zeroq/v1/zeroq.pb.h"

namespace {

namespace v1 = ::zeroq::v1;
namespace zs = ::zeroq::server;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant broken: %s\n", what);
    abort();
  }
}

zs::BlobStore* Blobs() {
  static zs::BlobStore* blobs = [] {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "zeroq_fuzz_XXXXXX").string();
    std::string dir = mkdtemp(tmpl.data());
    return zs::FileBlobStore::Create(dir).value().release();
  }();
  return blobs;
}

v1::Model ReadyModel() {
  v1::Model m;
  m.set_id("m-fuzz");
  m.set_state(v1::MODEL_READY);
  for (int i = 0; i < 3; ++i) {
    v1::QuantizableLayer* l = m.mutable_summary()->add_layers();
    l->set_name("layer" + std::to_string(i));
    l->set_params(1000 * (i + 1));
  }
  m.mutable_summary()->set_quantizable_params(6000);
  m.mutable_summary()->add_bn_layers()->set_name("bn");
  return m;
}

void FuzzUpload(absl::string_view data) {
  google::protobuf::io::CodedInputStream in(
      reinterpret_cast<const uint8_t*>(data.data()),
      static_cast<int>(data.size()));
  zs::UploadAssembler upload(Blobs(), 1 << 20, [](const v1::ModelMetadata& m) {
    return m.name() == "over-quota" ? absl::ResourceExhaustedError("quota")
                                    : absl::OkStatus();
  });
  v1::ModelMetadata announced;
  bool ok = true;
  uint32_t size = 0;
  while (ok && in.ReadVarint32(&size)) {
    std::string bytes;
    if (!in.ReadString(&bytes, static_cast<int>(size))) break;
    v1::UploadModelRequest request;
    if (!request.ParseFromString(bytes)) continue;
    if (request.has_metadata()) announced = request.metadata();
    ok = upload.Add(request).ok();
  }
  if (ok) {
    absl::StatusOr<zs::UploadAssembler::Result> r = upload.Finish();
    if (r.ok()) {
      Check(r->blob.size_bytes == announced.size_bytes(),
            "stored size is the announced size");
      Check(r->blob.sha256 == announced.sha256(),
            "stored hash is the announced hash");
      Check(
          *zs::Sha256File(Blobs()->Path(r->blob.sha256)) == announced.sha256(),
          "stored bytes hash to the announced hash");
      Check(Blobs()->Delete(r->blob.sha256).ok(), "delete");
    }
  }
  // Nothing partial survives a failed or finished upload.
  absl::StatusOr<int> left = Blobs()->RemoveTemporaries();
  Check(left.ok() && *left == 0, "no temporary upload files are left behind");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  if (size == 0) return 0;
  absl::string_view data(reinterpret_cast<const char*>(bytes) + 1, size - 1);
  switch (bytes[0] % 5) {
    case 0: {
      v1::ModelMetadata m;
      if (m.ParseFromArray(data.data(), static_cast<int>(data.size()))) {
        absl::Status s = zs::ValidateModelMetadata(m, 1 << 30);
        Check(s.ok() || !s.message().empty(), "an error says what is wrong");
      }
      break;
    }
    case 1: {
      v1::SubmitJobRequest r;
      if (r.ParseFromArray(data.data(), static_cast<int>(data.size()))) {
        absl::Status s = zs::ValidateSubmitJob(r);
        Check(s.ok() || s.code() == absl::StatusCode::kInvalidArgument,
              "request errors are INVALID_ARGUMENT");
        if (s.ok()) {
          absl::Status m = zs::ValidateConfigForModel(r.config(), ReadyModel());
          Check(m.ok() || m.code() == absl::StatusCode::kInvalidArgument ||
                    m.code() == absl::StatusCode::kFailedPrecondition,
                "config errors are INVALID_ARGUMENT");
        }
      }
      break;
    }
    case 2:
      FuzzUpload(data);
      break;
    case 3: {
      absl::StatusOr<zs::TenantRegistry> t = zs::TenantRegistry::Parse(data);
      if (t.ok()) {
        Check(!t->open(), "a parsed file is never open");
        Check(!t->Authenticate(std::nullopt).ok(), "no key, no entry");
        (void)t->Authenticate(data);
      }
      break;
    }
    case 4:
      (void)zeroq::core::ParseBudget(std::string(data));
      break;
  }
  return 0;
}
