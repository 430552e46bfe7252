// pipeline.h: one ZeroQ quantization job, start to finish, in the core.
// Free of LibTorch types: the worker and the offline tool include only this.
//
//   JobSpec spec;
//   spec.model_path = "model.pt";
//   spec.input_shape = {3, 224, 224};           // one sample, no batch
//   spec.output_dir = "/tmp/out";
//   ZQ_ASSIGN_OR_RETURN(JobResult r, RunJob(spec, on_progress, &cancel));
//   std::cout << FormatSummary(r);              // report.h
//
// A job is a list of stages (stages/stage.h; one file each under
// core/stages/, run in order by core/stages/driver.cc): INSPECT (load,
// analyse, one forward), DISTILL (BN-statistics data), with a budget
// SENSITIVITY (per-layer sweep) and PARETO (frontier and the chosen
// widths), CALIBRATE (quantize weights, calibrate activation ranges), EXPORT
// (agreement with the float model; quantized TorchScript model, JSON
// recipe, the calibration data, a JSON report). Progress callbacks run on
// the calling thread.
//
// RunJob sets LibTorch's process-wide intra-op thread count to
// spec.threads: run one job per process (the worker does) or accept that.
#ifndef ZEROQ_CORE_PIPELINE_H_
#define ZEROQ_CORE_PIPELINE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/options.h"
#include "core/pareto.h"
#include "core/report.h"
#include "core/stages/stage.h"

namespace zeroq::core {

class Model;

enum class CalibrationSource {
  kDistilled,  // ZeroQ: BN-statistics distilled data (default)
  kGaussian,   // N(0, 1) noise of the same shape (ablation)
  kFile,       // a tensor file of real inputs (ablation / comparison)
};

struct JobSpec {
  std::string model_path;            // TorchScript archive
  std::vector<int64_t> input_shape;  // one sample, e.g. {1, 28, 28}
  DistillOptions distill;
  QuantOptions quant;
  CalibrationSource calibration = CalibrationSource::kDistilled;
  std::string calibration_file;      // for kFile: [N, ...] tensor file
  // Mixed precision: when set, each layer's weight width is chosen from
  // `sensitivity.bits` to minimise total sensitivity within this budget
  // (quant.weight_bits is then unused); quant.layer_bits still pins layers.
  std::optional<Budget> budget;
  SensitivityOptions sensitivity;
  // Re-planning: a sensitivity table from an earlier run of the same model
  // (report.json's "sensitivity"); the sweep is skipped.
  std::vector<LayerSensitivity> precomputed_sensitivity;
  // With a precomputed table: plan with only these widths (each must be in
  // the table, else INVALID_ARGUMENT naming candidate_bits). Empty: every
  // width the table has.
  std::vector<int> replan_widths;
  PlanOptions plan;
  // PARETO: the sensitivity sum is only a proxy, so the `measured_points`
  // frontier points nearest the budget and the widest uniform width within
  // it are each quantized and calibrated, and the one whose outputs on the
  // calibration data are closest to the float model's (mean KL) is taken.
  // 0: the lowest sensitivity sum, unmeasured.
  int measured_points = 3;
  // Learned weight rounding after calibration (the RECONSTRUCT stage).
  ReconstructOptions reconstruct;
  std::string output_dir;            // must exist; artifacts go here
  int threads = 0;                   // intra-op threads; 0 = all cores
  std::string device = "cpu";        // "cpu", "cuda", "cuda:N"
};

// The distillation iterations of a job that did not set them (the service
// and zeroq-quantize apply it; DistillOptions itself defaults to 500):
// kEightBitIterations for an eight-bit job (every weight and activation
// width 8 bits or more or float, without a budget and without learned
// rounding asked for), else kIterations.def.
int DefaultDistillIterations(const JobSpec& spec);

// The image prior's weight of a job that did not set it (applied like
// DefaultDistillIterations; DistillOptions itself defaults to 10): 0 (the
// reference's loss) for an eight-bit job, where the prior changed nothing
// measurable, else kTvWeight.def.
double DefaultTvWeight(const JobSpec& spec);

// Process-wide set-up for running jobs: LibTorch's intra-op thread count,
// and glibc malloc kept from returning large blocks to the kernel. LibTorch's
// CPU allocator does not cache: every tensor over 128 KiB would otherwise be
// a fresh mmap whose pages fault in again on every iteration (that doubled
// the time of a distillation iteration on the example model). RunJob calls it.
void SetUpProcess(int threads);

// Every option of the spec against its range (common/config_schema.h) and
// the model's layers: quantization, distillation, candidate widths (with a
// budget; no repeats), threads. INVALID_ARGUMENT naming the option. RunJob
// runs it first; zeroq-quantize --check_config runs only this.
absl::Status ValidateJobSpec(const Model& model, const JobSpec& spec);

// Runs the stages that apply to `spec` (SENSITIVITY and PARETO only with a
// budget, DISTILL only for distilled data), each timed in
// JobResult::stage_seconds, and checks the token between them.
// INVALID_ARGUMENT / FAILED_PRECONDITION for bad models, shapes and options
// (Model, Distill, QuantizedModel say which); CANCELLED via the token.
absl::StatusOr<JobResult> RunJob(const JobSpec& spec,
                                 const ProgressFn& progress = {},
                                 const CancellationToken* cancel = nullptr);

// What the service shows of an uploaded model, without LibTorch types.
struct ModelInfo {
  // BatchNorm layers ZeroQ can distill from: name, channels. Empty for a
  // model without (usable) BatchNorm layers, which is still inspectable but
  // which RunJob rejects with FAILED_PRECONDITION.
  std::vector<std::pair<std::string, int64_t>> bn_layers;
  struct Layer {
    std::string name;                   // module path, e.g. "features.0"
    std::string kind;                   // "conv" or "linear"
    std::vector<int64_t> weight_shape;
    int64_t params = 0;
    std::string bn;                     // the BN consuming its output, if any
  };
  std::vector<Layer> layers;            // conv/linear layers, in graph order
  int64_t total_params = 0;
  int64_t quantizable_params = 0;
  std::vector<int64_t> output_shape;    // of one forward at [1] + input_shape
};

// Loads the TorchScript archive at `path`, analyses it and runs one forward
// on zeros of shape [1] + input_shape. INVALID_ARGUMENT, with the reason, for
// a file that is not a loadable TorchScript model with forward(Tensor) ->
// Tensor, and for an input shape the model rejects. For a model whose
// BatchNorm layers ZeroQ cannot use (none, no running statistics, inside
// control flow) the layers are found from its nn.Conv*/nn.Linear modules
// instead of its graph and bn_layers is empty. RESOURCE_EXHAUSTED when
// LibTorch runs out of memory.
absl::StatusOr<ModelInfo> InspectModel(const std::string& path,
                                       const std::vector<int64_t>& input_shape,
                                       const std::string& device = "cpu");

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_PIPELINE_H_
