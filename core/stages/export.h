// export.h: the EXPORT stage of a job: the quantized model compared with the
// float one, then written out with its recipe and calibration data; and the
// report, written once the stages' times are known (core-internal; LibTorch
// types).
//
//   ZQ_ASSIGN_OR_RETURN(ExportOutput out,
//       ExportStage(spec, *model, *qmodel, data, progress, cancel));
//   ...  // out into the JobResult, EXPORT's time included
//   ZQ_RETURN_IF_ERROR(WriteReport(result, progress));
#ifndef ZEROQ_CORE_STAGES_EXPORT_H_
#define ZEROQ_CORE_STAGES_EXPORT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/pipeline.h"
#include "core/quantized_model.h"
#include "core/stages/distill.h"
#include "core/stages/stage.h"

namespace zeroq::core {

// Quantized vs float outputs on the calibration data: the share of samples
// with the same top-1 class (first output tensor) and the mean
// KL(softmax float || softmax quantized) over every output.
struct Agreement {
  double top1 = 0;
  double mean_kl = 0;
};

// Runs both models on every batch. This is the quantized model's first
// forward: weights cannot be replaced afterwards (SetLearnedWeight), which
// is why it runs here and not where the model was built.
absl::StatusOr<Agreement> MeasureAgreement(const Model& model,
                                           QuantizedModel& qmodel,
                                           const CalibrationData& data);
// MeasureAgreement() on `batches`: its mean KL.
absl::StatusOr<double> MeanOutputKl(const Model& model, QuantizedModel& qmodel,
                                    const std::vector<torch::Tensor>& batches);

struct ExportOutput {
  Agreement agreement;
  // The exported model as the report shows it.
  std::vector<LayerReport> layers;
  std::vector<ActivationReport> activations;
  double weight_bytes = 0;
  // Paths inside spec.output_dir. The report's is only chosen here:
  // WriteReport writes it.
  std::string model_artifact, recipe_artifact, data_artifact, report_artifact;
};

// MeasureAgreement(), then the artifacts in spec.output_dir, each written to
// a temporary name and renamed: model.zeroq.pt (qmodel, its tensors on the
// CPU), recipe.json, and the calibration data (distilled.pt, or
// calibration.pt for the ablations). Events: "writing artifacts" (0/3),
// then each written file's path (1/3, 2/3). CANCELLED via the token before
// the first file; INTERNAL when a file cannot be written.
absl::StatusOr<ExportOutput> ExportStage(const JobSpec& spec,
                                         const Model& model,
                                         QuantizedModel& qmodel,
                                         const CalibrationData& data,
                                         const StageProgress& progress,
                                         const CancellationToken* cancel);

// Writes ResultJson(result) to result.report_artifact, then EXPORT's last
// event (3/3, naming the data artifact). The report holds every stage's
// time, EXPORT's own included, so it is written after the stage list ran.
absl::Status WriteReport(const JobResult& result,
                         const StageProgress& progress);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_EXPORT_H_
