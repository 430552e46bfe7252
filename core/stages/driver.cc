// driver.cc: the stage list of a job and RunJob, which runs it.
//
// Each stage is one row of kStages: its enum value, its name, what it was
// doing (for the cancellation message), whether it runs for a spec, and a
// step that hands the stage function (core/stages/<stage>.h) what it reads
// from the job's state and stores what it returns. Adding a stage: its
// enum value (stage.h, equal to the proto's), its file and a row here.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <iterator>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/model.h"
#include "core/pipeline.h"
#include "core/quantized_model.h"
#include "core/stages/calibrate.h"
#include "core/stages/distill.h"
#include "core/stages/export.h"
#include "core/stages/inspect.h"
#include "core/stages/plan.h"
#include "core/stages/reconstruct.h"
#include "core/stages/sensitivity.h"
#include "core/stages/stage.h"

namespace zeroq::core {
namespace {

// What the stages of one job hand on to each other. Each field is written
// by one stage (named) and read by later ones.
struct JobState {
  explicit JobState(const JobSpec& spec) : spec(spec), quant(spec.quant) {}

  const JobSpec& spec;
  std::unique_ptr<Model> model;            // INSPECT
  CalibrationData data;                    // DISTILL, or INSPECT (ablations)
  QuantOptions quant;                      // spec.quant; PARETO's widths
  // PARETO's uniform runner-up (an index in result.measured_points), which
  // RECONSTRUCT compares with the choice after learning both.
  std::optional<size_t> runner_up;
  QuantOptions runner_up_quant;
  std::unique_ptr<QuantizedModel> qmodel;  // CALIBRATE
  JobResult result;                        // every stage adds to it
};

using StageStep = absl::Status (*)(JobState&, const StageProgress&,
                                   const CancellationToken*);

struct StageEntry {
  Stage stage;
  const char* name;      // StageName()
  const char* activity;  // "cancelled during <activity>"
  // Asked just before the stage would start, so it may look at what the
  // stages before it produced.
  bool (*runs)(const JobState&);
  StageStep step;
};

bool Always(const JobState&) { return true; }
bool Distills(const JobState& s) {
  return s.spec.calibration == CalibrationSource::kDistilled;
}
bool HasBudget(const JobState& s) { return s.spec.budget.has_value(); }
bool Reconstructs(const JobState& s) {
  return s.qmodel != nullptr &&
         ResolvedReconstructMethod(s.spec.reconstruct, *s.qmodel) !=
             ReconstructMethod::kNone;
}

void RecordData(const CalibrationData& data, JobResult* result) {
  result->calibration = data.source;
  result->samples = data.samples;
  result->distill_initial_loss = data.initial_loss;
  result->distill_final_loss = data.final_loss;
  result->distill_iterations = data.iterations;
}

absl::Status RunInspect(JobState& s, const StageProgress& progress,
                        const CancellationToken*) {
  ZQ_ASSIGN_OR_RETURN(s.model, InspectStage(s.spec, progress));
  const ModelSummary& summary = s.model->summary();
  s.result.bn_layers = static_cast<int>(summary.bn_layers.size());
  s.result.quantizable_params = summary.quantizable_params;
  s.result.float_weight_bytes = summary.quantizable_params * 4.0;
  // Noise or a file replaces DISTILL, which then does not run: reading
  // them is part of INSPECT, as their time always was.
  if (!Distills(s)) {
    ZQ_ASSIGN_OR_RETURN(s.data, GivenCalibrationData(s.spec));
    RecordData(s.data, &s.result);
  }
  return absl::OkStatus();
}

absl::Status RunDistill(JobState& s, const StageProgress& progress,
                        const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(s.data, DistillStage(*s.model, s.spec, progress, cancel));
  RecordData(s.data, &s.result);
  s.result.distill_tv_weight = s.spec.distill.tv_weight;
  return absl::OkStatus();
}

absl::Status RunSensitivity(JobState& s, const StageProgress& progress,
                            const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(
      s.result.sensitivity,
      SensitivityStage(*s.model, s.data.batches, s.spec, progress, cancel));
  return absl::OkStatus();
}

absl::Status RunPareto(JobState& s, const StageProgress& progress,
                       const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(PlannedWidths planned,
                      PlanStage(*s.model, s.data.batches, s.result.sensitivity,
                                s.spec, progress, cancel));
  s.quant = std::move(planned.quant);
  s.runner_up = planned.runner_up;
  s.runner_up_quant = std::move(planned.runner_up_quant);
  s.result.measured_points = std::move(planned.measured);
  s.result.frontier = std::move(planned.plan.frontier);
  s.result.chosen = std::move(planned.plan.chosen);
  s.result.budget_bits = planned.plan.budget_bits;
  s.result.bound_bits = planned.plan.bound_bits;
  return absl::OkStatus();
}

absl::Status RunCalibrate(JobState& s, const StageProgress& progress,
                          const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(
      s.qmodel,
      CalibrateStage(*s.model, s.quant, s.data.batches, progress, cancel));
  return absl::OkStatus();
}

// With a runner-up, both finalists are learned and the one closer to float
// after it replaces PARETO's choice (model, widths and result.chosen).
absl::Status RunFinalists(JobState& s, const StageProgress& progress,
                          const CancellationToken* cancel, Reconstruction* r) {
  std::vector<MeasuredPoint>& measured = s.result.measured_points;
  MeasuredPoint& other = measured[*s.runner_up];
  auto chosen = std::find_if(measured.begin(), measured.end(),
                             [&](const MeasuredPoint& m) {
                               return m.point.bits == s.result.chosen->bits;
                             });
  const double params = static_cast<double>(s.result.quantizable_params);
  ZQ_ASSIGN_OR_RETURN(
      Finalists f,
      ReconstructFinalists(*s.model, s.qmodel.get(), s.runner_up_quant,
                           s.result.chosen->size_bits / params,
                           other.point.size_bits / params, s.data.batches,
                           s.spec.reconstruct, progress, cancel));
  if (chosen != measured.end()) chosen->reconstructed_kl = f.chosen_kl;
  other.reconstructed_kl = f.runner_up_kl;
  if (f.runner_up_model != nullptr) {
    s.qmodel = std::move(f.runner_up_model);
    s.quant = s.runner_up_quant;
    s.result.chosen = other.point;
  }
  *r = std::move(f.kept);
  return absl::OkStatus();
}

absl::Status RunReconstruct(JobState& s, const StageProgress& progress,
                            const CancellationToken* cancel) {
  Reconstruction r;
  if (s.runner_up && s.result.chosen) {
    ZQ_RETURN_IF_ERROR(RunFinalists(s, progress, cancel, &r));
  } else {
    ZQ_ASSIGN_OR_RETURN(r, ReconstructStage(*s.model, s.qmodel.get(),
                                            s.data.batches, s.spec.reconstruct,
                                            progress, cancel));
  }
  s.result.reconstruction = std::move(r.method);
  s.result.reconstruction_iterations = s.spec.reconstruct.iterations;
  s.result.reconstructed = std::move(r.units);
  return absl::OkStatus();
}

absl::Status RunExport(JobState& s, const StageProgress& progress,
                       const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(ExportOutput out, ExportStage(s.spec, *s.model, *s.qmodel,
                                                    s.data, progress, cancel));
  JobResult& r = s.result;
  r.top1_agreement = out.agreement.top1;
  r.mean_kl = out.agreement.mean_kl;
  r.layers = std::move(out.layers);
  r.activations = std::move(out.activations);
  r.weight_bytes = out.weight_bytes;
  r.model_artifact = std::move(out.model_artifact);
  r.recipe_artifact = std::move(out.recipe_artifact);
  r.data_artifact = std::move(out.data_artifact);
  r.report_artifact = std::move(out.report_artifact);
  return absl::OkStatus();
}

// The stage list, in the order a job runs it.
constexpr StageEntry kStages[] = {
    {Stage::kInspect, "INSPECT", "inspection", Always, RunInspect},
    {Stage::kDistill, "DISTILL", "distillation", Distills, RunDistill},
    {Stage::kSensitivity, "SENSITIVITY", "the sensitivity sweep", HasBudget,
     RunSensitivity},
    {Stage::kPareto, "PARETO", "planning", HasBudget, RunPareto},
    {Stage::kCalibrate, "CALIBRATE", "calibration", Always, RunCalibrate},
    {Stage::kReconstruct, "RECONSTRUCT", "reconstruction", Reconstructs,
     RunReconstruct},
    {Stage::kExport, "EXPORT", "export", Always, RunExport},
};

// Every value from kFirstStage to kLastStage has exactly one row (the rows
// are in run order, which is not the enum's: values are never renumbered).
constexpr bool EveryStageOnce() {
  constexpr int n = static_cast<int>(kLastStage) - static_cast<int>(kFirstStage) + 1;
  if (std::size(kStages) != n) return false;
  for (int value = static_cast<int>(kFirstStage); value <= static_cast<int>(kLastStage);
       ++value) {
    int rows = 0;
    for (const StageEntry& entry : kStages) rows += static_cast<int>(entry.stage) == value;
    if (rows != 1) return false;
  }
  return true;
}
static_assert(EveryStageOnce(), "kStages must list every Stage exactly once");

const StageEntry* Find(Stage stage) {
  for (const StageEntry& entry : kStages) {
    if (entry.stage == stage) return &entry;
  }
  return nullptr;
}

// RunJob's checks and set-up before any stage: result.threads and device.
absl::Status Prepare(const JobSpec& spec, JobResult* result) {
  result->threads =
      spec.threads > 0
          ? spec.threads
          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  SetUpProcess(result->threads);
  result->device = spec.device;
  if (spec.output_dir.empty()) {
    return absl::InvalidArgumentError("output_dir is required");
  }
  struct stat st;
  if (::stat(spec.output_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("output folder ", spec.output_dir, " does not exist"));
  }
  if (spec.input_shape.empty()) {
    return absl::InvalidArgumentError(
        "input_shape is required: one sample without the batch dimension, "
        "e.g. 3,224,224");
  }
  return absl::OkStatus();
}

// Runs the stages that apply to the spec, in order, each timed; between two
// stages a cancelled token ends the job, naming what the earlier one did.
absl::Status RunStages(JobState& state, const ProgressFn& progress,
                       const CancellationToken* cancel) {
  const StageEntry* previous = nullptr;
  for (const StageEntry& entry : kStages) {
    if (!entry.runs(state)) continue;
    if (previous != nullptr) {
      ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, previous->activity));
    }
    const auto start = std::chrono::steady_clock::now();
    ZQ_RETURN_IF_ERROR(
        entry.step(state, StageProgress(entry.stage, progress), cancel));
    state.result.stage_seconds.emplace_back(
        entry.stage,
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count());
    previous = &entry;
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<Stage>& AllStages() {
  static const std::vector<Stage>* const stages = [] {
    auto* out = new std::vector<Stage>;
    for (const StageEntry& entry : kStages) out->push_back(entry.stage);
    return out;
  }();
  return *stages;
}

const char* StageName(Stage stage) {
  const StageEntry* entry = Find(stage);
  return entry != nullptr ? entry->name : "UNKNOWN";
}

absl::StatusOr<JobResult> RunJob(const JobSpec& spec,
                                 const ProgressFn& progress,
                                 const CancellationToken* cancel) {
  JobState state(spec);
  ZQ_RETURN_IF_ERROR(Prepare(spec, &state.result));
  ZQ_RETURN_IF_ERROR(RunStages(state, progress, cancel));
  ZQ_RETURN_IF_ERROR(
      WriteReport(state.result, StageProgress(Stage::kExport, progress)));
  return std::move(state.result);
}

}  // namespace zeroq::core
