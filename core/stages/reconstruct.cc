#include "core/stages/reconstruct.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "core/reconstruct.h"

namespace zeroq::core {

ReconstructMethod ResolvedReconstructMethod(const ReconstructOptions& options,
                                            const QuantizedModel& qmodel) {
  if (options.method != ReconstructMethod::kAuto) return options.method;
  bool low = false;
  for (const LayerQuantInfo& l : qmodel.layers()) low |= l.bits > 0 && l.bits < 5;
  for (const ActivationSiteInfo& s : qmodel.sites()) low |= s.quant.bits < 5;
  return low ? ReconstructMethod::kBlock : ReconstructMethod::kNone;
}

absl::StatusOr<Reconstruction> ReconstructStage(
    const Model& model, QuantizedModel* qmodel,
    const std::vector<torch::Tensor>& data, const ReconstructOptions& options,
    const StageProgress& progress, const CancellationToken* cancel) {
  ReconstructOptions resolved = options;
  resolved.method = ResolvedReconstructMethod(options, *qmodel);
  Reconstruction out;
  out.method = resolved.method == ReconstructMethod::kBlock ? "block" : "adaround";
  progress.Step(0, 0,
                absl::StrFormat("learning the rounding %s, %d steps each",
                                resolved.method == ReconstructMethod::kBlock
                                    ? "block by block"
                                    : "layer by layer",
                                resolved.iterations));
  absl::StatusOr<ReconstructResult> learned =
      Reconstruct(
          model, qmodel, data, resolved,
          [&](const ReconstructProgress& p) {
            progress.Step(p.layer, p.layers,
                          absl::StrFormat("%s: output error %.4g -> %.4g, %.1f%% "
                                          "of weights rounded the other way",
                                          p.name, p.loss_before, p.loss_after,
                                          100.0 * p.flipped));
          },
          cancel);
  // Learned rounding is an improvement on a model that is already whole:
  // an op it cannot run leaves the remaining layers rounded to nearest
  // (each finished block kept its learned rounding only where it helped)
  // rather than failing the job. Cancellation and lack of memory still end it.
  if (!learned.ok() && learned.status().code() == absl::StatusCode::kInternal) {
    progress.Step(0, 0, absl::StrCat("reconstruction stopped, the rest keeps "
                                     "round-to-nearest: ",
                                     learned.status().message()));
    out.method += " (stopped)";
    return out;
  }
  ZQ_RETURN_IF_ERROR(learned.status());
  const ReconstructResult& result = *learned;
  out.method = result.method;
  for (const ReconstructProgress& p : result.layers) {
    out.units.push_back({p.name, p.loss_before, p.loss_after, p.flipped});
  }
  return out;
}

}  // namespace zeroq::core
