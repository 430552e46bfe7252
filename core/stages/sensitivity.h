// sensitivity.h: the SENSITIVITY stage of a mixed-precision job
// (core-internal; LibTorch types).
//
//   ZQ_ASSIGN_OR_RETURN(std::vector<LayerSensitivity> table,
//       SensitivityStage(*model, data.batches, spec, progress, cancel));
#ifndef ZEROQ_CORE_STAGES_SENSITIVITY_H_
#define ZEROQ_CORE_STAGES_SENSITIVITY_H_

#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/pipeline.h"
#include "core/stages/stage.h"

namespace zeroq::core {

// Each layer's Omega at each of spec.sensitivity.bits, measured on `data`
// (sensitivity.h; one event per (layer, width) with its layer, bits and
// Omega). With spec.precomputed_sensitivity, that table instead, checked
// against the model's layers (INVALID_ARGUMENT when it does not match) and
// narrowed to spec.replan_widths; one event, 1/1. CANCELLED via the token.
absl::StatusOr<std::vector<LayerSensitivity>> SensitivityStage(
    const Model& model, const std::vector<torch::Tensor>& data,
    const JobSpec& spec, const StageProgress& progress,
    const CancellationToken* cancel);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_SENSITIVITY_H_
