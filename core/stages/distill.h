// distill.h: the DISTILL stage, and the calibration inputs of the ablations
// that replace it (core-internal; LibTorch types).
//
//   ZQ_ASSIGN_OR_RETURN(CalibrationData data,
//       spec.calibration == CalibrationSource::kDistilled
//           ? DistillStage(*model, spec, progress, cancel)
//           : GivenCalibrationData(spec));
#ifndef ZEROQ_CORE_STAGES_DISTILL_H_
#define ZEROQ_CORE_STAGES_DISTILL_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/pipeline.h"
#include "core/stages/stage.h"

namespace zeroq::core {

// The batches a job calibrates, measures and compares on, and where they
// came from.
struct CalibrationData {
  std::vector<torch::Tensor> batches;
  int64_t samples = 0;  // over all batches
  // JobResult::calibration: "distilled", "gaussian" or the file's path.
  std::string source;
  // Distilled data only: the loss of the first batch at its start, of the
  // last at its end, and the Adam steps of all batches.
  double initial_loss = std::numeric_limits<double>::quiet_NaN();
  double final_loss = std::numeric_limits<double>::quiet_NaN();
  int64_t iterations = 0;
};

// spec.distill.num_batches batches distilled from the model's BatchNorm
// statistics (distill.h), on the model's device. One event per Adam step;
// its step counts over all batches, of iterations x num_batches, and a
// batch stopped early jumps to the end of its share with the message
// "converged after N iterations". CANCELLED via the token.
absl::StatusOr<CalibrationData> DistillStage(const Model& model,
                                             const JobSpec& spec,
                                             const StageProgress& progress,
                                             const CancellationToken* cancel);

// The calibration inputs of the ablations, on the CPU: N(0, 1) noise
// (kGaussian: num_batches seeded batches of batch_size) or a tensor file cut
// into batches of batch_size (kFile: INVALID_ARGUMENT when its samples do not
// have spec.input_shape; LoadTensor's errors). REQUIRES:
// spec.calibration != kDistilled.
absl::StatusOr<CalibrationData> GivenCalibrationData(const JobSpec& spec);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_DISTILL_H_
