// test_util.h: helpers shared by the core's tests (not part of the library).
//
//   std::unique_ptr<Model> m = LoadTestModel("fashion_cnn.pt");
//   TempDir dir;                        // removed with its contents
//   spec.output_dir = dir.path();
#ifndef ZEROQ_CORE_TEST_UTIL_H_
#define ZEROQ_CORE_TEST_UTIL_H_

#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <set>
#include <string>

#include "core/model.h"
#include "gtest/gtest.h"

namespace zeroq::core {

// A committed model under tests/models (made by scripts/make_models.py).
inline std::string ModelPath(const std::string& file) {
  return std::string(ZEROQ_TEST_MODELS_DIR) + "/" + file;
}

// The device the tests run on: $ZEROQ_TEST_DEVICE (scripts/gpu_check.sh sets
// cuda:0), else the CPU.
inline std::string TestDevice() {
  const char* d = getenv("ZEROQ_TEST_DEVICE");
  return d != nullptr && *d != '\0' ? d : "cpu";
}

// Loads a committed test model onto TestDevice(); nullptr (and a test
// failure) on error.
inline std::unique_ptr<Model> LoadTestModel(const std::string& file) {
  absl::StatusOr<std::unique_ptr<Model>> m =
      Model::LoadFromFile(ModelPath(file), TestDevice());
  if (!m.ok()) {
    ADD_FAILURE() << "loading " << file << ": " << m.status();
    return nullptr;
  }
  return std::move(*m);
}

// The first output tensor of a Forward() (the logits of the test models).
inline absl::StatusOr<torch::Tensor> First(
    absl::StatusOr<std::vector<torch::Tensor>> outputs) {
  if (!outputs.ok()) return outputs.status();
  if (outputs->empty()) return absl::InternalError("no output tensor");
  return outputs->front();
}

// A fresh folder under the system temp folder, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "zeroq_test_XXXXXX").string();
    if (char* p = ::mkdtemp(tmpl.data())) path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // Names of the files directly inside.
  std::set<std::string> Files() const {
    std::set<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path_)) {
      out.insert(e.path().filename().string());
    }
    return out;
  }

 private:
  std::string path_;
};

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_TEST_UTIL_H_
