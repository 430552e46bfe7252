// report.h: what a ZeroQ job found (JobResult), as a readable summary and as
// the JSON of report.json, and the sensitivity table read back from such a
// report for re-planning. Free of LibTorch types; pipeline.h includes it.
//
//   ZQ_ASSIGN_OR_RETURN(JobResult r, RunJob(spec));
//   std::cout << FormatSummary(r);              // layer table, sizes, timings
//   std::string json = ResultJson(r);           // what report.json holds
//   ZQ_ASSIGN_OR_RETURN(std::vector<LayerSensitivity> table,
//                       SensitivityFromReportJson(json));
#ifndef ZEROQ_CORE_REPORT_H_
#define ZEROQ_CORE_REPORT_H_

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/options.h"
#include "core/pareto.h"
#include "core/stages/stage.h"

namespace zeroq::core {

struct LayerReport {
  std::string name, op, bn;
  int64_t params = 0;
  int bits = 0;                      // 0: float
};

struct ActivationReport {
  std::string name;
  int bits = 0;
  double min = 0, max = 0;
  std::string range;  // how min/max were set: "minmax", "percentile P", "mse"
};

// One layer (adaround) or block (block) of the reconstruction: its output
// error on the calibration data with round-to-nearest and with the learned
// rounding (the same when learning did not help: then nearest is kept).
struct ReconstructedUnit {
  std::string name;      // a layer, or "first .. last" layer of a block
  double error_before = 0, error_after = 0;
  double flipped = 0;    // share of its weights rounded the other way
};

// A mixed-precision configuration PARETO measured end to end: the mean
// KL(softmax float || softmax quantized) of its outputs on the calibration
// data, before any reconstruction, and after it for the two RECONSTRUCT
// compared (PARETO's choice and the uniform runner-up).
struct MeasuredPoint {
  ParetoPoint point;
  double output_kl = 0;
  bool uniform = false;  // every unpinned layer at one width
  std::optional<double> reconstructed_kl;
};

struct JobResult {
  std::vector<LayerReport> layers;
  std::vector<ActivationReport> activations;
  int bn_layers = 0;
  int64_t quantizable_params = 0;
  double float_weight_bytes = 0;     // conv/linear weights at 32 bits
  double weight_bytes = 0;           // at their chosen widths
  double distill_initial_loss = std::numeric_limits<double>::quiet_NaN();
  double distill_final_loss = std::numeric_limits<double>::quiet_NaN();
  // Adam steps run over all distilled batches: iterations x num_batches, or
  // fewer after an early stop; 0 without distillation.
  int64_t distill_iterations = 0;
  // The image prior's weight the distillation ran with (the options' value,
  // after the job's default was resolved); NaN without distillation.
  double distill_tv_weight = std::numeric_limits<double>::quiet_NaN();
  // Quantized vs float on the calibration data: share of samples with the
  // same top-1 class, and mean KL(softmax float || softmax quantized).
  double top1_agreement = 0;
  double mean_kl = 0;
  int64_t samples = 0;
  // RECONSTRUCT: the method used ("adaround", "block"; "none" when the stage
  // did not run), its steps per unit, and each layer or block.
  std::string reconstruction = "none";
  int reconstruction_iterations = 0;
  std::vector<ReconstructedUnit> reconstructed;
  // Mixed precision only.
  std::vector<LayerSensitivity> sensitivity;
  std::vector<ParetoPoint> frontier;
  std::optional<ParetoPoint> chosen;
  std::vector<MeasuredPoint> measured_points;  // empty: chosen by the sum
  int64_t budget_bits = 0;
  int64_t bound_bits = 0;            // Plan::bound_bits
  // The stages that ran, in order, with their wall time.
  std::vector<std::pair<Stage, double>> stage_seconds;
  int threads = 0;
  std::string device;
  std::string calibration;           // "distilled", "gaussian", file path
  // Artifact paths inside output_dir.
  std::string model_artifact, recipe_artifact, data_artifact, report_artifact;
};

// A readable multi-line report (layer table, sizes, agreement, timings).
std::string FormatSummary(const JobResult& result);
// The same as JSON (also written to output_dir/report.json); stage_seconds
// is keyed by StageName().
std::string ResultJson(const JobResult& result);

// The sensitivity table of a report written by ResultJson (for re-planning).
// INVALID_ARGUMENT for text that is not such a report, or one without a
// table (a run without a budget).
absl::StatusOr<std::vector<LayerSensitivity>> SensitivityFromReportJson(
    const std::string& json);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_REPORT_H_
