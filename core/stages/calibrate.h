// calibrate.h: the CALIBRATE stage of a job (core-internal; LibTorch
// types).
//
//   ZQ_ASSIGN_OR_RETURN(std::unique_ptr<QuantizedModel> qmodel,
//       CalibrateStage(*model, quant, data.batches, progress, cancel));
#ifndef ZEROQ_CORE_STAGES_CALIBRATE_H_
#define ZEROQ_CORE_STAGES_CALIBRATE_H_

#include <memory>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/quantized_model.h"
#include "core/stages/stage.h"

namespace zeroq::core {

// The quantized model in two steps: the weights rounded to nearest at
// their widths in `quant` (QuantizedModel::QuantizeWeights), then every
// activation site calibrated on `data` (CalibrateActivations; one event per
// site, named in the message). The model has not run a forward yet, so a
// later stage may still replace its weights (SetLearnedWeight).
// INVALID_ARGUMENT for bad options; CANCELLED via the token.
absl::StatusOr<std::unique_ptr<QuantizedModel>> CalibrateStage(
    const Model& model, const QuantOptions& quant,
    const std::vector<torch::Tensor>& data, const StageProgress& progress,
    const CancellationToken* cancel);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_CALIBRATE_H_
