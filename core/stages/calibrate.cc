#include "core/stages/calibrate.h"

#include "common/status_macros.h"

namespace zeroq::core {

absl::StatusOr<std::unique_ptr<QuantizedModel>> CalibrateStage(
    const Model& model, const QuantOptions& quant,
    const std::vector<torch::Tensor>& data, const StageProgress& progress,
    const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<QuantizedModel> qmodel,
                      QuantizedModel::QuantizeWeights(model, quant));
  ZQ_RETURN_IF_ERROR(qmodel->CalibrateActivations(
      data,
      [&](const CalibrationProgress& p) {
        progress.Step(p.site, p.sites, p.name);
      },
      cancel));
  return qmodel;
}

}  // namespace zeroq::core
