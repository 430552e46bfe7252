// inspect.h: the INSPECT stage of a job (core-internal; LibTorch types).
//
//   StageProgress progress(Stage::kInspect, on_progress);
//   ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
//                       InspectStage(spec, progress));
#ifndef ZEROQ_CORE_STAGES_INSPECT_H_
#define ZEROQ_CORE_STAGES_INSPECT_H_

#include <memory>

#include "absl/status/statusor.h"
#include "core/model.h"
#include "core/pipeline.h"
#include "core/stages/stage.h"

namespace zeroq::core {

// The model at spec.model_path loaded onto spec.device, frozen and analysed
// (model.h), after one forward at [1] + spec.input_shape and
// ValidateJobSpec(). Events: "loading <path>" (0/1), then the counts of
// BatchNorm layers, quantizable layers and weights (1/1). INVALID_ARGUMENT
// for a bad shape or option, FAILED_PRECONDITION for a model without usable
// BatchNorm layers (Model::LoadFromFile says which).
absl::StatusOr<std::unique_ptr<Model>> InspectStage(
    const JobSpec& spec, const StageProgress& progress);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_INSPECT_H_
