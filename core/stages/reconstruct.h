// reconstruct.h: the RECONSTRUCT stage of a job (core-internal; LibTorch
// types): learned weight rounding on the calibration data, after CALIBRATE
// and before EXPORT (reconstruct.h at the core's top level has the method).
//
//   if (ReconstructApplies(spec.reconstruct, *qmodel)) {
//     ZQ_ASSIGN_OR_RETURN(Reconstruction r, ReconstructStage(
//         *model, qmodel.get(), data.batches, spec.reconstruct, progress, cancel));
//   }
#ifndef ZEROQ_CORE_STAGES_RECONSTRUCT_H_
#define ZEROQ_CORE_STAGES_RECONSTRUCT_H_

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/quantized_model.h"
#include "core/report.h"
#include "core/stages/stage.h"

namespace zeroq::core {

// The method `options` stands for on a model quantized as `qmodel` is:
// kAuto is kBlock when some layer's weights or the activations have fewer
// than 5 bits (where learned rounding was measured to pay), else kNone.
ReconstructMethod ResolvedReconstructMethod(const ReconstructOptions& options,
                                            const QuantizedModel& qmodel);

struct Reconstruction {
  std::string method;  // "adaround" or "block"
  std::vector<ReconstructedUnit> units;
};

// Learns the rounding of every quantized layer of `qmodel` (in place) on
// `data` with the resolved method (not kNone). One event per layer or
// block: step/total and a message with its output error before and after.
absl::StatusOr<Reconstruction> ReconstructStage(
    const Model& model, QuantizedModel* qmodel,
    const std::vector<torch::Tensor>& data, const ReconstructOptions& options,
    const StageProgress& progress, const CancellationToken* cancel);

// Two configurations reconstructed and compared: PARETO's choice and its
// uniform runner-up.
struct Finalists {
  Reconstruction kept;  // of the model kept
  // Each model's mean KL(softmax float || softmax quantized) on the data
  // after its reconstruction.
  double chosen_kl = 0, runner_up_kl = 0;
  // The runner-up's model when it ended closer to float (it replaces the
  // chosen one), else null.
  std::unique_ptr<QuantizedModel> runner_up_model;
};

// ReconstructStage on `qmodel` (the chosen widths, calibrated), then on the
// widths of `runner_up` (quantized and calibrated here as CALIBRATE does;
// not reconstructed if they do not call for it), then each model's output
// KL against float on `data`; the runner-up is kept only when strictly
// closer. `chosen_bits` and `runner_up_bits` (average weight widths) name
// them in the events: both reconstructions' as one sequence (steps 1..2n
// of 2n), then the verdict in words. After it both models have run a
// forward.
absl::StatusOr<Finalists> ReconstructFinalists(
    const Model& model, QuantizedModel* qmodel, const QuantOptions& runner_up,
    double chosen_bits, double runner_up_bits,
    const std::vector<torch::Tensor>& data, const ReconstructOptions& options,
    const StageProgress& progress, const CancellationToken* cancel);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_RECONSTRUCT_H_
