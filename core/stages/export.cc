#include "core/stages/export.h"

#include <cstdio>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/export.h"
#include "core/outputs.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

void Describe(const ModelSummary& summary, const QuantizedModel& qmodel,
              ExportOutput* out) {
  for (size_t i = 0; i < qmodel.layers().size(); ++i) {
    const LayerQuantInfo& l = qmodel.layers()[i];
    const QuantLayer& s = summary.layers[i];
    out->layers.push_back({l.name, s.op, s.bn, l.params, l.bits});
  }
  for (const ActivationSiteInfo& s : qmodel.sites()) {
    out->activations.push_back(
        {s.name, s.quant.bits, s.quant.lo, s.quant.hi, s.range});
  }
  out->weight_bytes = qmodel.weight_bytes();
}

// TorchScript writes the archive itself: save beside, then rename.
absl::Status SaveModel(const QuantizedModel& qmodel, const std::string& path) {
  const std::string tmp = path + ".tmp";
  ZQ_RETURN_IF_ERROR(qmodel.Save(tmp));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Agreement> MeasureAgreement(const Model& model,
                                           QuantizedModel& qmodel,
                                           const CalibrationData& data) {
  double kl_sum = 0;
  int64_t agree = 0;
  for (const torch::Tensor& b : data.batches) {
    ZQ_ASSIGN_OR_RETURN(std::vector<torch::Tensor> fo, model.Forward(b));
    ZQ_ASSIGN_OR_RETURN(std::vector<torch::Tensor> qo, qmodel.Forward(b));
    ZQ_RETURN_IF_ERROR(CallTorch("comparing outputs", [&] {
      std::vector<torch::Tensor> lp = LogProbs(fo), lq = LogProbs(qo);
      kl_sum += OutputsKl(lp, lq);
      // Top-1 agreement on the first output (the logits of a model that
      // returns several).
      if (!lp.empty()) {
        // torch::eq, not ==: with LibTorch 2.15 under C++20, == on these two
        // tensors resolved to an overload that threw instead of comparing.
        agree +=
            torch::eq(lp[0].argmax(1), lq[0].argmax(1)).sum().item<int64_t>();
      }
    }));
  }
  Agreement out;
  out.top1 = data.samples ? double(agree) / data.samples : 0;
  out.mean_kl = data.samples ? kl_sum / data.samples : 0;
  return out;
}

absl::StatusOr<double> MeanOutputKl(const Model& model, QuantizedModel& qmodel,
                                    const std::vector<torch::Tensor>& batches) {
  CalibrationData data;
  data.batches = batches;
  for (const torch::Tensor& b : batches) data.samples += b.size(0);
  ZQ_ASSIGN_OR_RETURN(Agreement a, MeasureAgreement(model, qmodel, data));
  return a.mean_kl;
}

absl::StatusOr<ExportOutput> ExportStage(const JobSpec& spec,
                                         const Model& model,
                                         QuantizedModel& qmodel,
                                         const CalibrationData& data,
                                         const StageProgress& progress,
                                         const CancellationToken* cancel) {
  ExportOutput out;
  ZQ_ASSIGN_OR_RETURN(out.agreement, MeasureAgreement(model, qmodel, data));
  Describe(model.summary(), qmodel, &out);
  ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "the agreement check"));

  progress.Step(0, 3, "writing artifacts");
  const std::string dir = spec.output_dir + "/";
  out.model_artifact = dir + "model.zeroq.pt";
  out.recipe_artifact = dir + "recipe.json";
  out.data_artifact = dir + (spec.calibration == CalibrationSource::kDistilled
                                 ? "distilled.pt"
                                 : "calibration.pt");
  out.report_artifact = dir + "report.json";
  ZQ_RETURN_IF_ERROR(SaveModel(qmodel, out.model_artifact));
  progress.Step(1, 3, out.model_artifact);
  ZQ_RETURN_IF_ERROR(WriteFileAtomic(
      out.recipe_artifact,
      RecipeJson(model, qmodel, {spec.input_shape, data.source})));
  progress.Step(2, 3, out.recipe_artifact);
  ZQ_RETURN_IF_ERROR(SaveTensor(out.data_artifact, data.batches));
  return out;
}

absl::Status WriteReport(const JobResult& result,
                         const StageProgress& progress) {
  ZQ_RETURN_IF_ERROR(
      WriteFileAtomic(result.report_artifact, ResultJson(result)));
  progress.Step(3, 3, result.data_artifact);
  return absl::OkStatus();
}

}  // namespace zeroq::core
