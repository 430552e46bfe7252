#include "core/stages/reconstruct.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "core/reconstruct.h"
#include "core/stages/calibrate.h"
#include "core/stages/export.h"

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

absl::StatusOr<Finalists> ReconstructFinalists(
    const Model& model, QuantizedModel* qmodel, const QuantOptions& runner_up,
    double chosen_bits, double runner_up_bits,
    const std::vector<torch::Tensor>& data, const ReconstructOptions& options,
    const StageProgress& progress, const CancellationToken* cancel) {
  const ProgressFn discard;
  ZQ_ASSIGN_OR_RETURN(
      std::unique_ptr<QuantizedModel> other,
      CalibrateStage(model, runner_up, data,
                     StageProgress(Stage::kReconstruct, discard), cancel));
  // Both reconstructions as one sequence of events: the second's steps
  // follow the first's, and each message says which configuration it is.
  auto relay = [&](int index, const std::string& name) {
    return [&progress, index, name](const ProgressEvent& e) {
      ProgressEvent out = e;
      if (out.total > 0) {
        out.step += index * out.total;
        out.total *= 2;
      }
      out.message = absl::StrCat(name, ": ", out.message);
      progress(std::move(out));
    };
  };
  const std::string chosen_name = absl::StrFormat("chosen %.2f bits", chosen_bits);
  const std::string other_name =
      absl::StrFormat("uniform %.2f bits", runner_up_bits);
  const ProgressFn first = relay(0, chosen_name), second = relay(1, other_name);

  Finalists out;
  ZQ_ASSIGN_OR_RETURN(out.kept,
                      ReconstructStage(model, qmodel, data, options,
                                       StageProgress(Stage::kReconstruct, first),
                                       cancel));
  // The runner-up's widths may not call for reconstruction (kAuto).
  Reconstruction other_rec;
  if (ResolvedReconstructMethod(options, *other) != ReconstructMethod::kNone) {
    ZQ_ASSIGN_OR_RETURN(other_rec,
                        ReconstructStage(model, other.get(), data, options,
                                         StageProgress(Stage::kReconstruct, second),
                                         cancel));
  }
  ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "reconstruction"));
  ZQ_ASSIGN_OR_RETURN(out.chosen_kl, MeanOutputKl(model, *qmodel, data));
  ZQ_ASSIGN_OR_RETURN(out.runner_up_kl, MeanOutputKl(model, *other, data));
  const bool switch_to_other = out.runner_up_kl < out.chosen_kl;
  progress.Step(0, 0,
                absl::StrFormat("kept the %s: output KL %.4g against %.4g of the %s",
                                switch_to_other ? other_name : chosen_name,
                                switch_to_other ? out.runner_up_kl : out.chosen_kl,
                                switch_to_other ? out.chosen_kl : out.runner_up_kl,
                                switch_to_other ? chosen_name : other_name));
  if (switch_to_other) {
    out.kept = std::move(other_rec);
    if (out.kept.method.empty()) out.kept.method = "none";
    out.runner_up_model = std::move(other);
  }
  return out;
}

}  // namespace zeroq::core
