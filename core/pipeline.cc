#include "core/pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <malloc.h>
#include <sys/stat.h>

#include <chrono>
#include <algorithm>
#include <cmath>
#include <functional>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/distill.h"
#include "core/export.h"
#include "core/model.h"
#include "core/quantized_model.h"
#include "core/sensitivity.h"
#include "core/outputs.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

class StageTimer {
 public:
  explicit StageTimer(JobResult* result) : result_(result) {}
  void Start(const char* name) {
    Stop();
    name_ = name;
    start_ = std::chrono::steady_clock::now();
  }
  void Stop() {
    if (name_ == nullptr) return;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                             start_)
                   .count();
    result_->stage_seconds.emplace_back(name_, s);
    name_ = nullptr;
  }

 private:
  JobResult* result_;
  const char* name_ = nullptr;
  std::chrono::steady_clock::time_point start_;
};

std::vector<torch::Tensor> SplitBatches(const torch::Tensor& all, int batch) {
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < all.size(0); i += batch) {
    out.push_back(all.slice(0, i, std::min<int64_t>(i + batch, all.size(0))));
  }
  return out;
}

// The table with only the `widths` columns (all of them when empty).
absl::StatusOr<std::vector<LayerSensitivity>> KeepWidths(
    const std::vector<LayerSensitivity>& table, const std::vector<int>& widths) {
  if (widths.empty()) return table;
  std::vector<LayerSensitivity> out;
  for (const LayerSensitivity& row : table) {
    ZQ_RETURN_IF_ERROR(CheckReplanWidths(widths, row.bits));
    LayerSensitivity kept{row.name, row.params, {}, {}};
    for (size_t j = 0; j < row.bits.size(); ++j) {
      if (std::find(widths.begin(), widths.end(), row.bits[j]) != widths.end()) {
        kept.bits.push_back(row.bits[j]);
        kept.omega.push_back(row.omega[j]);
      }
    }
    out.push_back(std::move(kept));
  }
  return out;
}

// A stored table must describe this model's layers.
absl::Status CheckSensitivityTable(const std::vector<LayerSensitivity>& table,
                                   const ModelSummary& summary) {
  if (table.size() != summary.layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the stored sensitivity table has ", table.size(),
        " layers; this model has ", summary.layers.size()));
  }
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].name != summary.layers[i].name ||
        table[i].params != summary.layers[i].params) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the stored sensitivity table does not match this model at layer ", i,
          ": ", table[i].name, " (", table[i].params, " weights) vs ",
          summary.layers[i].name, " (", summary.layers[i].params, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void SetUpProcess(int threads) {
  at::set_num_threads(threads);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
}

const char* StageName(Stage stage) {
  switch (stage) {
    case Stage::kInspect: return "INSPECT";
    case Stage::kDistill: return "DISTILL";
    case Stage::kSensitivity: return "SENSITIVITY";
    case Stage::kPareto: return "PARETO";
    case Stage::kCalibrate: return "CALIBRATE";
    case Stage::kExport: return "EXPORT";
  }
  return "UNKNOWN";
}

absl::Status ValidateJobSpec(const Model& model, const JobSpec& spec) {
  ZQ_RETURN_IF_ERROR(ValidateQuantOptions(model, spec.quant));
  ZQ_RETURN_IF_ERROR(ValidateDistillOptions(spec.distill));
  if (!kThreads.Contains(spec.threads)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "threads = ", spec.threads, ": must be ", kThreads.Describe()));
  }
  if (spec.budget.has_value()) {
    if (spec.sensitivity.bits.empty()) {
      return absl::InvalidArgumentError("candidate_bits: none given");
    }
    std::set<int> seen;
    for (int k : spec.sensitivity.bits) {
      if (!kCandidateBits.Contains(k)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "candidate_bits: ", k, " is outside ", kCandidateBits.Describe()));
      }
      if (!seen.insert(k).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("candidate_bits: ", k, " is repeated"));
      }
    }
    // A re-plan without explicit widths plans with the stored table's.
    if (spec.precomputed_sensitivity.empty() || !spec.replan_widths.empty()) {
      std::vector<LayerSize> layers;
      for (const QuantLayer& l : model.summary().layers)
        layers.push_back({l.name, l.params});
      absl::Status reachable =
          CheckBudgetReachable(BudgetText(*spec.budget), *spec.budget, layers,
                               spec.sensitivity.bits, spec.quant.layer_bits);
      if (!reachable.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("budget: ", reachable.message()));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<JobResult> RunJob(const JobSpec& spec, const ProgressFn& progress,
                                 const CancellationToken* cancel) {
  auto emit = [&](ProgressEvent e) {
    if (progress) progress(e);
  };
  JobResult result;
  StageTimer timer(&result);
  result.threads = spec.threads > 0
                       ? spec.threads
                       : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  SetUpProcess(result.threads);
  result.device = spec.device;
  if (spec.output_dir.empty()) {
    return absl::InvalidArgumentError("output_dir is required");
  }
  struct stat st;
  if (::stat(spec.output_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output folder ", spec.output_dir, " does not exist"));
  }
  if (spec.input_shape.empty()) {
    return absl::InvalidArgumentError(
        "input_shape is required: one sample without the batch dimension, "
        "e.g. 3,224,224");
  }

  // INSPECT
  timer.Start("INSPECT");
  emit({Stage::kInspect, 0, 1, NAN, NAN, absl::StrCat("loading ", spec.model_path)});
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                      Model::LoadFromFile(spec.model_path, spec.device));
  std::vector<int64_t> shape = {1};
  shape.insert(shape.end(), spec.input_shape.begin(), spec.input_shape.end());
  ZQ_RETURN_IF_ERROR(model->CheckInputShape(shape));
  ZQ_RETURN_IF_ERROR(ValidateJobSpec(*model, spec));
  const ModelSummary& summary = model->summary();
  result.bn_layers = static_cast<int>(summary.bn_layers.size());
  result.quantizable_params = summary.quantizable_params;
  emit({Stage::kInspect, 1, 1, NAN, NAN,
        absl::StrCat(summary.bn_layers.size(), " BatchNorm layers, ",
                     summary.layers.size(), " quantizable layers, ",
                     summary.quantizable_params, " weights")});

  // DISTILL (or the ablation's calibration data)
  std::vector<torch::Tensor> data;
  const DistillOptions& d = spec.distill;
  switch (spec.calibration) {
    case CalibrationSource::kDistilled: {
      timer.Start("DISTILL");
      // The total is the most iterations the batches may take. A batch that
      // converges early reports its step as the end of its share, so the
      // steps still end at the total and never go back.
      const int64_t total = static_cast<int64_t>(d.iterations) * d.num_batches;
      ZQ_ASSIGN_OR_RETURN(
          DistilledData distilled,
          Distill(
              *model, spec.input_shape, d,
              [&](const DistillProgress& p) {
                const int64_t done =
                    static_cast<int64_t>(p.batch) * p.iterations;
                emit({Stage::kDistill,
                      done + (p.converged ? p.iterations : p.iteration), total,
                      p.loss, p.lr,
                      p.converged ? absl::StrCat("converged after ",
                                                 p.iteration, " iterations")
                                  : ""});
              },
              cancel));
      data = std::move(distilled.batches);
      result.distill_initial_loss = distilled.initial_loss.front();
      result.distill_final_loss = distilled.final_loss.back();
      for (int n : distilled.iterations) result.distill_iterations += n;
      result.calibration = "distilled";
      break;
    }
    case CalibrationSource::kGaussian: {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(d.seed);
      std::vector<int64_t> batch_shape = {d.batch_size};
      batch_shape.insert(batch_shape.end(), spec.input_shape.begin(),
                         spec.input_shape.end());
      for (int b = 0; b < d.num_batches; ++b) {
        data.push_back(torch::randn(batch_shape, gen, torch::kFloat));
      }
      result.calibration = "gaussian";
      break;
    }
    case CalibrationSource::kFile: {
      ZQ_ASSIGN_OR_RETURN(torch::Tensor all, LoadTensor(spec.calibration_file));
      std::vector<int64_t> want = spec.input_shape;
      std::vector<int64_t> got(all.sizes().begin() + (all.dim() > 0 ? 1 : 0),
                               all.sizes().end());
      if (all.dim() == 0 || got != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            "calibration file ", spec.calibration_file, " holds shape [",
            absl::StrJoin(all.sizes(), ","), "]; expected [N,",
            absl::StrJoin(want, ","), "]"));
      }
      data = SplitBatches(all.to(torch::kFloat), d.batch_size);
      result.calibration = spec.calibration_file;
      break;
    }
  }
  for (const torch::Tensor& b : data) result.samples += b.size(0);
  ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "distillation"));

  QuantOptions quant = spec.quant;
  if (spec.budget.has_value()) {
    // SENSITIVITY
    timer.Start("SENSITIVITY");
    if (!spec.precomputed_sensitivity.empty()) {
      ZQ_RETURN_IF_ERROR(CheckSensitivityTable(spec.precomputed_sensitivity, summary));
      ZQ_ASSIGN_OR_RETURN(result.sensitivity,
                          KeepWidths(spec.precomputed_sensitivity, spec.replan_widths));
      emit({Stage::kSensitivity, 1, 1, NAN, NAN,
            "using the stored sensitivity table"});
    } else {
      ZQ_ASSIGN_OR_RETURN(
          result.sensitivity,
          ComputeSensitivity(*model, data, spec.sensitivity,
                             [&](const SensitivityProgress& p) {
                               ProgressEvent e{Stage::kSensitivity, p.step, p.total,
                                               NAN, NAN, ""};
                               e.layer = p.layer;
                               e.bits = p.bits;
                               e.omega = p.omega;
                               emit(e);
                             },
                             cancel));
    }
    // PARETO
    timer.Start("PARETO");
    std::vector<LayerCost> costs;
    for (const LayerSensitivity& row : result.sensitivity) {
      LayerCost c{row.name, row.params, row.bits, row.omega, std::nullopt};
      auto pin = quant.layer_bits.find(row.name);
      if (pin != quant.layer_bits.end()) c.pinned_bits = pin->second;
      costs.push_back(std::move(c));
    }
    ZQ_ASSIGN_OR_RETURN(Plan plan, PlanMixedPrecision(costs, *spec.budget, spec.plan));
    result.frontier = plan.frontier;
    result.chosen = plan.chosen;
    result.budget_bits = plan.budget_bits;
    result.bound_bits = plan.bound_bits;
    for (size_t i = 0; i < plan.frontier.size(); ++i) {
      const ParetoPoint& p = plan.frontier[i];
      ProgressEvent e{Stage::kPareto, static_cast<int64_t>(i + 1),
                      static_cast<int64_t>(plan.frontier.size()), NAN, NAN, ""};
      e.size_bits = p.size_bits;
      e.omega = p.total_sensitivity;
      e.bits = p.size_bits == plan.chosen.size_bits ? 1 : 0;
      emit(e);
    }
    for (size_t i = 0; i < costs.size(); ++i) {
      quant.layer_bits[costs[i].name] = plan.chosen.bits[i];
    }
    ProgressEvent chosen{Stage::kPareto, 1, 1, NAN, NAN,
                         absl::StrFormat("chose %.2f average bits (%.1f KiB of weights) "
                                         "within a budget of %.2f",
                                         double(plan.chosen.size_bits) / summary.quantizable_params,
                                         plan.chosen.size_bits / 8192.0,
                                         double(plan.budget_bits) / summary.quantizable_params)};
    chosen.size_bits = plan.chosen.size_bits;
    chosen.omega = plan.chosen.total_sensitivity;
    emit(chosen);
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "planning"));
  }

  // CALIBRATE
  timer.Start("CALIBRATE");
  ZQ_ASSIGN_OR_RETURN(
      std::unique_ptr<QuantizedModel> qmodel,
      QuantizedModel::Create(*model, quant, data,
                             [&](const CalibrationProgress& p) {
                               emit({Stage::kCalibrate, p.site, p.sites, NAN,
                                     NAN, p.name});
                             },
                             cancel));
  // Agreement of quantized and float outputs on the calibration data.
  double kl_sum = 0;
  int64_t agree = 0;
  for (const torch::Tensor& b : data) {
    ZQ_ASSIGN_OR_RETURN(std::vector<torch::Tensor> fo, model->Forward(b));
    ZQ_ASSIGN_OR_RETURN(std::vector<torch::Tensor> qo, qmodel->Forward(b));
    ZQ_RETURN_IF_ERROR(CallTorch("comparing outputs", [&] {
      std::vector<torch::Tensor> lp = LogProbs(fo), lq = LogProbs(qo);
      kl_sum += OutputsKl(lp, lq);
      // Top-1 agreement on the first output (the logits of a model that
      // returns several).
      if (!lp.empty()) {
        // torch::eq, not ==: with LibTorch 2.15 under C++20, == on these two
        // tensors resolved to an overload that threw instead of comparing.
        agree += torch::eq(lp[0].argmax(1), lq[0].argmax(1)).sum().item<int64_t>();
      }
    }));
  }
  result.top1_agreement = result.samples ? double(agree) / result.samples : 0;
  result.mean_kl = result.samples ? kl_sum / result.samples : 0;
  for (size_t i = 0; i < qmodel->layers().size(); ++i) {
    const LayerQuantInfo& l = qmodel->layers()[i];
    const QuantLayer& s = summary.layers[i];
    result.layers.push_back({l.name, s.op, s.bn, l.params, l.bits});
  }
  for (const ActivationSiteInfo& s : qmodel->sites()) {
    result.activations.push_back(
        {s.name, s.quant.bits, s.quant.lo, s.quant.hi, s.range});
  }
  result.float_weight_bytes = summary.quantizable_params * 4.0;
  result.weight_bytes = qmodel->weight_bytes();
  ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "calibration"));

  // EXPORT
  timer.Start("EXPORT");
  emit({Stage::kExport, 0, 3, NAN, NAN, "writing artifacts"});
  const std::string dir = spec.output_dir + "/";
  result.model_artifact = dir + "model.zeroq.pt";
  result.recipe_artifact = dir + "recipe.json";
  result.data_artifact =
      dir + (spec.calibration == CalibrationSource::kDistilled ? "distilled.pt"
                                                               : "calibration.pt");
  result.report_artifact = dir + "report.json";
  {
    // TorchScript writes the archive itself: save beside, then rename.
    const std::string tmp = result.model_artifact + ".tmp";
    ZQ_RETURN_IF_ERROR(qmodel->Save(tmp));
    if (std::rename(tmp.c_str(), result.model_artifact.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("cannot write ", result.model_artifact));
    }
  }
  emit({Stage::kExport, 1, 3, NAN, NAN, result.model_artifact});
  ZQ_RETURN_IF_ERROR(WriteFileAtomic(
      result.recipe_artifact,
      RecipeJson(*model, *qmodel, {spec.input_shape, result.calibration})));
  emit({Stage::kExport, 2, 3, NAN, NAN, result.recipe_artifact});
  ZQ_RETURN_IF_ERROR(SaveTensor(result.data_artifact, data));
  timer.Stop();
  ZQ_RETURN_IF_ERROR(WriteFileAtomic(result.report_artifact, ResultJson(result)));
  emit({Stage::kExport, 3, 3, NAN, NAN, result.data_artifact});
  return result;
}

std::string FormatSummary(const JobResult& r) {
  std::string out;
  const bool mp = !r.sensitivity.empty();
  absl::StrAppendFormat(&out, "%-32s %-14s %10s %5s  %-16s", "layer", "op",
                        "weights", "bits", "bn");
  if (mp) {
    for (int k : r.sensitivity.front().bits) {
      absl::StrAppendFormat(&out, " %10s", absl::StrCat("omega@", k));
    }
  }
  out += "\n";
  for (size_t i = 0; i < r.layers.size(); ++i) {
    const LayerReport& l = r.layers[i];
    absl::StrAppendFormat(&out, "%-32s %-14s %10d %5s  %-16s", l.name, l.op,
                          l.params, l.bits ? absl::StrCat(l.bits) : "fp32",
                          l.bn.empty() ? "-" : l.bn);
    if (mp && i < r.sensitivity.size()) {
      for (double o : r.sensitivity[i].omega) absl::StrAppendFormat(&out, " %10.4g", o);
    }
    out += "\n";
  }
  if (mp && !r.frontier.empty()) {
    const double params = static_cast<double>(r.quantizable_params);
    absl::StrAppendFormat(&out,
                          "Pareto frontier: %d points (size bound %d bits); "
                          "budget %.2f average bits\n",
                          r.frontier.size(), r.bound_bits, r.budget_bits / params);
    absl::StrAppendFormat(&out, "  %12s %9s %14s\n", "weight KiB", "avg bits",
                          "sensitivity");
    // At most ~16 rows: evenly spaced, plus the chosen point.
    const size_t n = r.frontier.size();
    const size_t stride = std::max<size_t>(1, (n + 15) / 16);
    for (size_t i = 0; i < n; ++i) {
      const ParetoPoint& p = r.frontier[i];
      const bool chosen = r.chosen && p.size_bits == r.chosen->size_bits;
      if (i % stride != 0 && i + 1 != n && !chosen) continue;
      absl::StrAppendFormat(&out, "  %12.2f %9.3f %14.6g%s\n", p.size_bits / 8192.0,
                            p.size_bits / params, p.total_sensitivity,
                            chosen ? "  <- chosen" : "");
    }
  }
  int act_bits = r.activations.empty() ? 0 : r.activations.front().bits;
  absl::StrAppendFormat(&out, "activation quantizers: %d", r.activations.size());
  if (act_bits) {
    absl::StrAppendFormat(&out, " at %d bits, %s ranges", act_bits,
                          r.activations.front().range);
  }
  absl::StrAppendFormat(&out, "\nBatchNorm layers: %d\n", r.bn_layers);
  absl::StrAppendFormat(
      &out, "weights: %.1f KiB -> %.1f KiB (%.2fx smaller, %.2f bits average)\n",
      r.float_weight_bytes / 1024, r.weight_bytes / 1024,
      r.weight_bytes > 0 ? r.float_weight_bytes / r.weight_bytes : 0.0,
      r.quantizable_params ? r.weight_bytes * 8 / r.quantizable_params : 0.0);
  if (!std::isnan(r.distill_final_loss)) {
    absl::StrAppendFormat(
        &out, "distillation loss: %.4g -> %.4g (%d iterations)\n",
        r.distill_initial_loss, r.distill_final_loss, r.distill_iterations);
  }
  absl::StrAppendFormat(
      &out,
      "quantized vs float on %d %s samples: top-1 agreement %.2f%%, mean KL %.4g\n",
      r.samples, r.calibration, 100.0 * r.top1_agreement, r.mean_kl);
  std::vector<std::string> stages;
  for (const auto& [name, s] : r.stage_seconds) {
    stages.push_back(absl::StrFormat("%s %.2fs", name, s));
  }
  absl::StrAppendFormat(&out, "time: %s (%d threads, %s)\n",
                        absl::StrJoin(stages, ", "), r.threads, r.device);
  absl::StrAppendFormat(&out, "artifacts: %s %s %s\n", r.model_artifact,
                        r.recipe_artifact, r.data_artifact);
  return out;
}

std::string ResultJson(const JobResult& r) {
  nlohmann::json j;
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerReport& l : r.layers) {
    layers.push_back({{"name", l.name}, {"op", l.op}, {"bn", l.bn},
                      {"params", l.params}, {"bits", l.bits}});
  }
  nlohmann::json acts = nlohmann::json::array();
  for (const ActivationReport& a : r.activations) {
    acts.push_back({{"name", a.name},
                    {"bits", a.bits},
                    {"min", a.min},
                    {"max", a.max},
                    {"range", a.range}});
  }
  nlohmann::json stages = nlohmann::json::object();
  for (const auto& [name, s] : r.stage_seconds) stages[name] = s;
  auto num = [](double v) { return std::isnan(v) ? nlohmann::json() : nlohmann::json(v); };
  nlohmann::json sens = nlohmann::json::array();
  for (const LayerSensitivity& row : r.sensitivity) {
    sens.push_back({{"name", row.name}, {"params", row.params},
                    {"bits", row.bits}, {"omega", row.omega}});
  }
  auto point = [](const ParetoPoint& p) {
    return nlohmann::json{{"size_bits", p.size_bits},
                          {"total_sensitivity", p.total_sensitivity},
                          {"bits", p.bits}};
  };
  nlohmann::json frontier = nlohmann::json::array();
  for (const ParetoPoint& p : r.frontier) frontier.push_back(point(p));
  j = {{"layers", layers},
       {"activations", acts},
       {"bn_layers", r.bn_layers},
       {"quantizable_params", r.quantizable_params},
       {"float_weight_bytes", r.float_weight_bytes},
       {"weight_bytes", r.weight_bytes},
       {"distill_initial_loss", num(r.distill_initial_loss)},
       {"distill_final_loss", num(r.distill_final_loss)},
       {"distill_iterations", r.distill_iterations},
       {"top1_agreement", r.top1_agreement},
       {"mean_kl", r.mean_kl},
       {"samples", r.samples},
       {"stage_seconds", stages},
       {"sensitivity", sens},
       {"frontier", frontier},
       {"chosen", r.chosen ? point(*r.chosen) : nlohmann::json()},
       {"budget_bits", r.budget_bits},
       {"bound_bits", r.bound_bits},
       {"threads", r.threads},
       {"device", r.device},
       {"calibration", r.calibration},
       {"artifacts",
        {{"model", r.model_artifact},
         {"recipe", r.recipe_artifact},
         {"data", r.data_artifact},
         {"report", r.report_artifact}}}};
  return j.dump(1);
}

}  // namespace zeroq::core

namespace zeroq::core {

absl::StatusOr<std::vector<LayerSensitivity>> SensitivityFromReportJson(
    const std::string& json) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("the report is not JSON");
  }
  auto it = j.find("sensitivity");
  if (it == j.end() || !it->is_array() || it->empty()) {
    return absl::InvalidArgumentError(
        "the report has no sensitivity table (was it a mixed-precision run?)");
  }
  std::vector<LayerSensitivity> table;
  for (const nlohmann::json& row : *it) {
    LayerSensitivity s;
    if (!row.is_object() || !row.contains("name") || !row["name"].is_string() ||
        !row.contains("params") || !row["params"].is_number_integer() ||
        !row.contains("bits") || !row["bits"].is_array() ||
        !row.contains("omega") || !row["omega"].is_array() ||
        row["bits"].size() != row["omega"].size()) {
      return absl::InvalidArgumentError("malformed sensitivity row in the report");
    }
    s.name = row["name"].get<std::string>();
    s.params = row["params"].get<int64_t>();
    for (const auto& b : row["bits"]) {
      if (!b.is_number_integer()) return absl::InvalidArgumentError("malformed bits");
      s.bits.push_back(b.get<int>());
    }
    for (const auto& o : row["omega"]) {
      if (!o.is_number()) return absl::InvalidArgumentError("malformed omega");
      s.omega.push_back(o.get<double>());
    }
    table.push_back(std::move(s));
  }
  return table;
}

}  // namespace zeroq::core

namespace zeroq::core {
namespace {

// Layers of a module ZeroQ's graph analysis rejected (no usable BatchNorm):
// its nn.Conv1d/2d/3d and nn.Linear submodules, found by class name. Only the
// service's model summary uses this; RunJob never runs such a model.
absl::Status ModuleLayers(const torch::jit::Module& module, ModelInfo* info) {
  return CallTorch("analysing the model", [&] {
    for (const auto& p : module.named_parameters(/*recurse=*/true)) {
      info->total_params += p.value.numel();
    }
    for (const auto& b : module.named_buffers(/*recurse=*/true)) {
      if (b.value.defined()) info->total_params += b.value.numel();
    }
    for (const auto& sub : module.named_modules()) {
      const auto& type_name = sub.value.type()->name();
      if (!type_name.has_value()) continue;
      const std::string cls = type_name->name();
      std::string kind;
      if (cls == "Conv1d" || cls == "Conv2d" || cls == "Conv3d") {
        kind = "conv";
      } else if (cls == "Linear") {
        kind = "linear";
      } else {
        continue;
      }
      if (!sub.value.hasattr("weight")) continue;
      c10::IValue w = sub.value.attr("weight");
      if (!w.isTensor() || !w.toTensor().defined()) continue;
      ModelInfo::Layer layer;
      layer.name = sub.name;
      layer.kind = kind;
      layer.weight_shape = w.toTensor().sizes().vec();
      layer.params = w.toTensor().numel();
      info->quantizable_params += layer.params;
      info->layers.push_back(std::move(layer));
    }
  });
}

}  // namespace

absl::StatusOr<ModelInfo> InspectModel(const std::string& path,
                                       const std::vector<int64_t>& input_shape,
                                       const std::string& device) {
  if (input_shape.empty()) {
    return absl::InvalidArgumentError(
        "input_shape is required: one sample without the batch dimension, "
        "e.g. 3,224,224");
  }
  std::vector<int64_t> shape = {1};
  shape.insert(shape.end(), input_shape.begin(), input_shape.end());
  for (int64_t d : shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input shape [", absl::StrJoin(input_shape, ","),
          "] must have positive sizes"));
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read model file ", path));
  }

  ModelInfo info;
  // The forward to run: the analysed model's, or the raw module's when the
  // analysis rejected the model for want of usable BatchNorm layers.
  std::function<absl::StatusOr<std::vector<torch::Tensor>>(const torch::Tensor&)>
      forward;
  std::unique_ptr<Model> model;
  torch::jit::Module raw;
  absl::StatusOr<std::unique_ptr<Model>> loaded = Model::LoadFromFile(path, device);
  if (loaded.ok()) {
    model = std::move(*loaded);
    const ModelSummary& s = model->summary();
    for (const BnLayer& bn : s.bn_layers) info.bn_layers.emplace_back(bn.name, bn.channels);
    for (const QuantLayer& l : s.layers) {
      info.layers.push_back({l.name, l.kind == LayerKind::kLinear ? "linear" : "conv",
                             l.weight_shape, l.params, l.bn});
    }
    info.total_params = s.total_params;
    info.quantizable_params = s.quantizable_params;
    forward = [&](const torch::Tensor& x) { return model->Forward(x); };
  } else if (loaded.status().code() == absl::StatusCode::kFailedPrecondition) {
    // LoadFromFile has already checked that it is an archive with
    // forward(Tensor) returning tensors; only the BatchNorm analysis failed.
    ZQ_ASSIGN_OR_RETURN(
        raw, CallTorch("not a loadable TorchScript archive", [&] {
          torch::jit::Module m = torch::jit::load(path, torch::Device(device));
          m.eval();
          return m;
        }));
    ZQ_RETURN_IF_ERROR(ModuleLayers(raw, &info));
    forward = [&](const torch::Tensor& x) {
      return CallTorch("the model rejected the input", [&] {
        torch::NoGradGuard no_grad;
        return OutputTensors(raw.forward({x}));
      });
    };
  } else if (loaded.status().code() == absl::StatusCode::kResourceExhausted) {
    return loaded.status();
  } else {
    // Whatever else went wrong reading it, the upload is not a usable model.
    return absl::InvalidArgumentError(loaded.status().message());
  }

  absl::StatusOr<torch::Tensor> zeros = CallTorch("creating the input", [&] {
    return torch::zeros(shape, torch::TensorOptions().device(torch::Device(device)));
  });
  absl::StatusOr<std::vector<torch::Tensor>> out =
      zeros.ok() ? forward(*zeros) : zeros.status();
  if (!out.ok() && out.status().code() == absl::StatusCode::kResourceExhausted) {
    return out.status();
  }
  if (!out.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("input shape [", absl::StrJoin(input_shape, ","),
                     "] (batch [", absl::StrJoin(shape, ","),
                     "]) is rejected by the model: ", out.status().message()));
  }
  if (out->empty()) {
    return absl::InvalidArgumentError("the model returned no tensor");
  }
  // The first output tensor (the logits of a model that returns several).
  info.output_shape = out->front().sizes().vec();
  return info;
}

}  // namespace zeroq::core
