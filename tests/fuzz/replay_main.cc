// Runs request_fuzz.cc's target over files and folders of inputs, without
// libFuzzer (any compiler), so the corpus is a regression test in CI:
//   request_fuzz_replay tests/fuzz/corpus
// With --write_seeds DIR, writes the seed inputs the corpus started from.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "server/sha256.h"
#include "zeroq/v1/zeroq.pb.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

namespace v1 = ::zeroq::v1;

void Write(const std::filesystem::path& path, char target,
           const std::string& body) {
  std::ofstream(path, std::ios::binary) << target << body;
}

std::string Delimited(const std::vector<v1::UploadModelRequest>& messages) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream raw(&out);
    google::protobuf::io::CodedOutputStream coded(&raw);
    for (const auto& m : messages) {
      coded.WriteVarint32(static_cast<uint32_t>(m.ByteSizeLong()));
      m.SerializeToCodedStream(&coded);
    }
  }
  return out;
}

void WriteSeeds(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  v1::ModelMetadata meta;
  meta.set_name("net");
  meta.add_input_shape(3);
  meta.add_input_shape(32);
  meta.add_input_shape(32);
  std::string model = "a small model's bytes";
  meta.set_size_bytes(static_cast<int64_t>(model.size()));
  meta.set_sha256(zeroq::server::Sha256Hex(model));
  Write(dir / "metadata", 0, meta.SerializeAsString());

  v1::SubmitJobRequest job;
  job.set_model_id("m-fuzz");
  job.set_priority(3);
  job.mutable_config()->set_budget("MP4");
  job.mutable_config()->add_candidate_bits(2);
  job.mutable_config()->add_candidate_bits(4);
  (*job.mutable_config()->mutable_layer_bits())["layer1"] = 8;
  job.mutable_config()->mutable_distillation()->set_iterations(10);
  Write(dir / "submit", 1, job.SerializeAsString());

  std::vector<v1::UploadModelRequest> upload(3);
  *upload[0].mutable_metadata() = meta;
  upload[1].set_chunk(model.substr(0, 7));
  upload[2].set_chunk(model.substr(7));
  Write(dir / "upload_ok", 2, Delimited(upload));
  upload[2].set_chunk(model.substr(7) + "!");
  Write(dir / "upload_too_long", 2, Delimited(upload));
  upload.pop_back();
  Write(dir / "upload_short", 2, Delimited(upload));

  Write(dir / "tenants", 3,
        R"({"tenants": [{"name": "a", "api_key_sha256": [")" +
            zeroq::server::Sha256Hex("k") +
            R"("], "quotas": {"running_jobs": 2}}]})");
  Write(dir / "budget", 4, "1.5MiB");
}

int RunFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()),
                         bytes.size());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--write_seeds") {
    WriteSeeds(argv[2]);
    return 0;
  }
  int runs = 0;
  for (int i = 1; i < argc; ++i) {
    std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) runs += RunFile(e.path());
      }
    } else {
      runs += RunFile(p);
    }
  }
  std::printf("replayed %d inputs, no invariant broken\n", runs);
  return runs > 0 ? 0 : 1;
}
