// export.h: the artifacts of a quantization run.
//
//   ZQ_RETURN_IF_ERROR(qmodel->Save(dir + "/model.zeroq.pt"));
//   ZQ_RETURN_IF_ERROR(WriteFile(dir + "/recipe.json",
//                                RecipeJson(*model, *qmodel, meta)));
//   ZQ_RETURN_IF_ERROR(SaveTensor(dir + "/distilled.pt", batches));
//
// Tensor files are written with torch::pickle_save: Python reads them with
// torch.load(path), LibTorch with LoadTensor(). Files are written to a
// temporary name and renamed, so a reader never sees a partial artifact.
#ifndef ZEROQ_CORE_EXPORT_H_
#define ZEROQ_CORE_EXPORT_H_

#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model.h"
#include "core/quantized_model.h"

namespace zeroq::core {

struct RecipeMeta {
  std::vector<int64_t> input_shape;  // one sample, no batch dimension
  std::string calibration;           // "distilled", "gaussian", a file
};

// The JSON quantization recipe: per layer bits, per-channel scale and zero
// point, how its weights were rounded ("nearest", "adaround", "block") and,
// when learned, its integer weights q; per activation site bits, range,
// scale and zero point.
std::string RecipeJson(const Model& model, const QuantizedModel& qmodel,
                       const RecipeMeta& meta);

// Concatenates `batches` along dimension 0 and writes them (on the CPU).
absl::Status SaveTensor(const std::string& path,
                        const std::vector<torch::Tensor>& batches);
// Reads a tensor written by SaveTensor or by Python's torch.save(tensor).
absl::StatusOr<torch::Tensor> LoadTensor(const std::string& path);

// Writes `contents` atomically (temporary file, fsync, rename).
absl::Status WriteFileAtomic(const std::string& path,
                             const std::string& contents);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_EXPORT_H_
