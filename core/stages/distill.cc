#include "core/stages/distill.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "core/distill.h"
#include "core/export.h"

namespace zeroq::core {
namespace {

std::vector<torch::Tensor> SplitBatches(const torch::Tensor& all, int batch) {
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < all.size(0); i += batch) {
    out.push_back(all.slice(0, i, std::min<int64_t>(i + batch, all.size(0))));
  }
  return out;
}

CalibrationData WithSamples(CalibrationData data) {
  for (const torch::Tensor& b : data.batches) data.samples += b.size(0);
  return data;
}

absl::StatusOr<CalibrationData> GaussianData(const JobSpec& spec) {
  const DistillOptions& d = spec.distill;
  CalibrationData data;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(d.seed);
  std::vector<int64_t> batch_shape = {d.batch_size};
  batch_shape.insert(batch_shape.end(), spec.input_shape.begin(),
                     spec.input_shape.end());
  for (int b = 0; b < d.num_batches; ++b) {
    data.batches.push_back(torch::randn(batch_shape, gen, torch::kFloat));
  }
  data.source = "gaussian";
  return WithSamples(std::move(data));
}

absl::StatusOr<CalibrationData> FileData(const JobSpec& spec) {
  ZQ_ASSIGN_OR_RETURN(torch::Tensor all, LoadTensor(spec.calibration_file));
  const std::vector<int64_t>& want = spec.input_shape;
  std::vector<int64_t> got(all.sizes().begin() + (all.dim() > 0 ? 1 : 0),
                           all.sizes().end());
  if (all.dim() == 0 || got != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration file ", spec.calibration_file,
                     " holds shape [", absl::StrJoin(all.sizes(), ","),
                     "]; expected [N,", absl::StrJoin(want, ","), "]"));
  }
  CalibrationData data;
  data.batches = SplitBatches(all.to(torch::kFloat), spec.distill.batch_size);
  data.source = spec.calibration_file;
  return WithSamples(std::move(data));
}

}  // namespace

absl::StatusOr<CalibrationData> DistillStage(const Model& model,
                                             const JobSpec& spec,
                                             const StageProgress& progress,
                                             const CancellationToken* cancel) {
  const DistillOptions& d = spec.distill;
  // The total is the most iterations the batches may take. A batch that
  // converges early reports its step as the end of its share, so the steps
  // still end at the total and never go back.
  const int64_t total = static_cast<int64_t>(d.iterations) * d.num_batches;
  auto on_step = [&](const DistillProgress& p) {
    const int64_t done = static_cast<int64_t>(p.batch) * p.iterations;
    ProgressEvent e;
    e.step = done + (p.converged ? p.iterations : p.iteration);
    e.total = total;
    e.loss = p.loss;
    e.lr = p.lr;
    if (p.converged) {
      e.message = absl::StrCat("converged after ", p.iteration, " iterations");
    }
    progress(std::move(e));
  };
  ZQ_ASSIGN_OR_RETURN(DistilledData distilled,
                      Distill(model, spec.input_shape, d, on_step, cancel));
  CalibrationData data;
  data.batches = std::move(distilled.batches);
  data.source = "distilled";
  data.initial_loss = distilled.initial_loss.front();
  data.final_loss = distilled.final_loss.back();
  for (int n : distilled.iterations) data.iterations += n;
  return WithSamples(std::move(data));
}

absl::StatusOr<CalibrationData> GivenCalibrationData(const JobSpec& spec) {
  switch (spec.calibration) {
    case CalibrationSource::kGaussian:
      return GaussianData(spec);
    case CalibrationSource::kFile:
      return FileData(spec);
    case CalibrationSource::kDistilled:
      break;
  }
  return absl::InternalError("distilled data comes from the DISTILL stage");
}

}  // namespace zeroq::core
