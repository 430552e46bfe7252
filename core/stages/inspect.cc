#include "core/stages/inspect.h"

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace zeroq::core {

absl::StatusOr<std::unique_ptr<Model>> InspectStage(
    const JobSpec& spec, const StageProgress& progress) {
  progress.Step(0, 1, absl::StrCat("loading ", spec.model_path));
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                      Model::LoadFromFile(spec.model_path, spec.device));
  std::vector<int64_t> shape = {1};
  shape.insert(shape.end(), spec.input_shape.begin(), spec.input_shape.end());
  ZQ_RETURN_IF_ERROR(model->CheckInputShape(shape));
  ZQ_RETURN_IF_ERROR(ValidateJobSpec(*model, spec));
  const ModelSummary& summary = model->summary();
  progress.Step(1, 1,
                absl::StrCat(summary.bn_layers.size(), " BatchNorm layers, ",
                             summary.layers.size(), " quantizable layers, ",
                             summary.quantizable_params, " weights"));
  return model;
}

}  // namespace zeroq::core
