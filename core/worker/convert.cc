#include "core/worker/convert.h"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "proto/config_check.h"

namespace zeroq::worker {
namespace {

double Finite(double v) { return std::isfinite(v) ? v : 0.0; }

std::string Basename(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

absl::StatusOr<std::string> ReadWholeFile(absl::string_view field,
                                          const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Invalid(field, absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return Invalid(field, absl::StrCat("cannot read ", path));
  return text.str();
}

}  // namespace

absl::StatusOr<core::JobSpec> JobSpecFromRunRequest(
    const v1::RunRequest& request) {
  core::JobSpec spec;
  if (request.model_path().empty()) return Invalid("model_path", "is required");
  spec.model_path = request.model_path();
  if (request.input_shape().empty()) {
    return Invalid(
        "input_shape",
        "is required: one sample without the batch, e.g. [3, 224, 224]");
  }
  for (int64_t d : request.input_shape()) {
    if (d <= 0) {
      return Invalid(
          "input_shape",
          absl::StrCat("[", absl::StrJoin(request.input_shape(), ","),
                       "] must have positive sizes"));
    }
    spec.input_shape.push_back(d);
  }
  if (request.output_dir().empty()) return Invalid("output_dir", "is required");
  spec.output_dir = request.output_dir();

  const v1::QuantizationConfig& config = request.config();
  // The same check SubmitJob ran: the ranges are the core's own.
  if (absl::Status s = ValidateQuantizationConfig(config); !s.ok()) return s;
  core::QuantOptions& q = spec.quant;
  if (config.has_weight_bits()) q.weight_bits = config.weight_bits();
  if (config.has_activation_bits()) q.activation_bits = config.activation_bits();
  for (const auto& [name, bits] : config.layer_bits()) q.layer_bits[name] = bits;
  if (config.has_activation_percentile()) {
    q.activation_percentile = config.activation_percentile();
  }
  switch (config.activation_range()) {
    case v1::ACTIVATION_RANGE_UNSPECIFIED:
      q.activation_range = core::ActivationRange::kAuto;
      break;
    case v1::ACTIVATION_RANGE_MINMAX:
      q.activation_range = core::ActivationRange::kMinMax;
      break;
    case v1::ACTIVATION_RANGE_PERCENTILE:
      q.activation_range = core::ActivationRange::kPercentile;
      break;
    case v1::ACTIVATION_RANGE_MSE:
      q.activation_range = core::ActivationRange::kMse;
      break;
    default:
      return Invalid("config.activation_range",
                     absl::StrCat(static_cast<int>(config.activation_range()),
                                  " is not an ActivationRange"));
  }
  q.quantize_layer_inputs = config.quantize_layer_inputs();

  if (!config.budget().empty()) {
    absl::StatusOr<core::Budget> budget = core::ParseBudget(config.budget());
    if (!budget.ok())
      return Invalid("config.budget", budget.status().message());
    spec.budget = *budget;
  }
  if (!config.candidate_bits().empty()) {
    spec.sensitivity.bits.assign(config.candidate_bits().begin(),
                                 config.candidate_bits().end());
  }  // else the core's default, {2, 3, 4, 6, 8}
  spec.sensitivity.others_at_8bit = config.sensitivity_others_8bit();

  const v1::DistillationConfig& dc = config.distillation();
  core::DistillOptions& d = spec.distill;
  if (dc.has_batch_size()) d.batch_size = dc.batch_size();
  if (dc.has_num_batches()) d.num_batches = dc.num_batches();
  if (dc.has_lr()) d.lr = dc.lr();
  if (dc.has_seed()) d.seed = dc.seed();
  if (dc.has_early_stop_window()) d.early_stop_window = dc.early_stop_window();
  if (dc.has_early_stop_tolerance())
    d.early_stop_tolerance = dc.early_stop_tolerance();

  core::ReconstructOptions& rc = spec.reconstruct;
  switch (config.reconstruct()) {
    case v1::RECONSTRUCT_UNSPECIFIED:
      rc.method = core::kDefaultReconstruct;
      break;
    case v1::RECONSTRUCT_NONE:
      rc.method = core::ReconstructMethod::kNone;
      break;
    case v1::RECONSTRUCT_ADAROUND:
      rc.method = core::ReconstructMethod::kAdaRound;
      break;
    case v1::RECONSTRUCT_BLOCK:
      rc.method = core::ReconstructMethod::kBlock;
      break;
    case v1::RECONSTRUCT_AUTO:
      rc.method = core::ReconstructMethod::kAuto;
      break;
    default:
      return Invalid("config.reconstruct",
                     absl::StrCat(static_cast<int>(config.reconstruct()),
                                  " is not a ReconstructMethod"));
  }
  // Unset or 0: the core's default.
  if (config.reconstruction().iterations() != 0) {
    rc.iterations = config.reconstruction().iterations();
  }
  // After the widths, the budget and the method: the default depends on them.
  d.iterations = dc.has_iterations() ? dc.iterations()
                                     : core::DefaultDistillIterations(spec);
  d.tv_weight = dc.has_tv_weight() ? dc.tv_weight()
                                   : core::DefaultTvWeight(spec);

  switch (config.calibration()) {
    case v1::CALIBRATION_DISTILLED:
      spec.calibration = core::CalibrationSource::kDistilled;
      break;
    case v1::CALIBRATION_GAUSSIAN:
      spec.calibration = core::CalibrationSource::kGaussian;
      break;
    default:
      return Invalid("config.calibration",
                     absl::StrCat(static_cast<int>(config.calibration()),
                                  " is not a CalibrationSource"));
  }

  if (!request.sensitivity_report_path().empty()) {
    if (!spec.budget.has_value()) {
      return Invalid("sensitivity_report_path",
                     "re-planning needs config.budget");
    }
    std::string json;
    if (absl::StatusOr<std::string> text = ReadWholeFile(
            "sensitivity_report_path", request.sensitivity_report_path());
        text.ok()) {
      json = std::move(*text);
    } else {
      return text.status();
    }
    absl::StatusOr<std::vector<core::LayerSensitivity>> table =
        core::SensitivityFromReportJson(json);
    if (!table.ok()) {
      return Invalid("sensitivity_report_path",
                     absl::StrCat(request.sensitivity_report_path(), ": ",
                                  table.status().message()));
    }
    spec.precomputed_sensitivity = std::move(*table);
    // Widths asked for explicitly narrow the stored table's.
    if (!config.candidate_bits().empty()) {
      spec.replan_widths = spec.sensitivity.bits;
    }
  }
  if (!request.calibration_data_path().empty()) {
    spec.calibration = core::CalibrationSource::kFile;
    spec.calibration_file = request.calibration_data_path();
  }

  if (request.threads() < 0) {
    return Invalid("threads", absl::StrCat(request.threads(), " is negative"));
  }
  spec.threads = request.threads() > 0 ? request.threads()
                                       : config.threads();  // 0: all cores
  spec.device = request.device().empty() ? "cpu" : request.device();
  return spec;
}

// The core's stages are numbered as the protocol's, so a stage converts by
// a cast (core/stages/stage.h). The enums are contiguous on both sides, so
// equal ends mean equal values; the core's tests check the names too.
static_assert(static_cast<int>(core::kFirstStage) == v1::STAGE_INSPECT &&
                  static_cast<int>(core::kLastStage) == v1::Stage_MAX,
              "core::Stage and zeroq.v1.Stage must have the same values");

v1::Stage StageToProto(core::Stage stage) {
  const int value = static_cast<int>(stage);
  return value != v1::STAGE_UNSPECIFIED && v1::Stage_IsValid(value)
             ? static_cast<v1::Stage>(value)
             : v1::STAGE_UNSPECIFIED;
}

v1::JobEvent EventFromProgress(const core::ProgressEvent& e) {
  v1::JobEvent out;
  out.set_stage(StageToProto(e.stage));
  out.set_step(e.step);
  out.set_total(e.total);
  out.set_message(e.message);
  if (e.stage == core::Stage::kSensitivity && !e.layer.empty()) {
    out.set_type(v1::EVENT_SENSITIVITY);
    out.set_layer(e.layer);
    out.set_bits(e.bits);
    out.set_omega(Finite(e.omega));
  } else if (e.stage == core::Stage::kPareto && e.size_bits > 0 &&
             e.message.empty()) {
    out.set_type(v1::EVENT_PARETO);
    out.set_size_bits(e.size_bits);
    out.set_omega(Finite(e.omega));
    out.set_chosen(e.bits == 1);
  } else if (e.step != 0 || e.total != 0 || std::isfinite(e.loss)) {
    out.set_type(v1::EVENT_PROGRESS);
    out.set_loss(Finite(e.loss));
    out.set_lr(Finite(e.lr));
    // PARETO's closing event (the choice) carries its size and Omega too.
    if (e.size_bits > 0) {
      out.set_size_bits(e.size_bits);
      out.set_omega(Finite(e.omega));
    }
  } else {
    out.set_type(v1::EVENT_MESSAGE);
  }
  return out;
}

v1::JobResult ResultToProto(const core::JobResult& r) {
  v1::JobResult out;
  std::map<std::string, const core::LayerSensitivity*> sensitivity;
  for (const core::LayerSensitivity& row : r.sensitivity) {
    sensitivity.emplace(row.name, &row);
  }
  for (const core::LayerReport& l : r.layers) {
    v1::LayerResult* layer = out.add_layers();
    layer->set_name(l.name);
    layer->set_op(l.op);
    layer->set_bn(l.bn);
    layer->set_params(l.params);
    layer->set_bits(l.bits);
    auto it = sensitivity.find(l.name);
    if (it != sensitivity.end()) {
      for (int k : it->second->bits) layer->add_candidate_bits(k);
      for (double o : it->second->omega) layer->add_sensitivity(Finite(o));
    }
  }
  for (const core::ActivationReport& a : r.activations) {
    v1::ActivationResult* act = out.add_activations();
    act->set_name(a.name);
    act->set_bits(a.bits);
    act->set_min(Finite(a.min));
    act->set_max(Finite(a.max));
    act->set_range(a.range);
  }
  out.set_bn_layers(r.bn_layers);
  out.set_quantizable_params(r.quantizable_params);
  out.set_float_weight_bytes(r.float_weight_bytes);
  out.set_weight_bytes(r.weight_bytes);
  out.set_distill_initial_loss(Finite(r.distill_initial_loss));
  out.set_distill_final_loss(Finite(r.distill_final_loss));
  out.set_distill_iterations(r.distill_iterations);
  out.set_distill_tv_weight(Finite(r.distill_tv_weight));
  out.set_top1_agreement(Finite(r.top1_agreement));
  out.set_mean_kl(Finite(r.mean_kl));
  out.set_samples(r.samples);
  auto point = [](const core::ParetoPoint& p, v1::ParetoPoint* to) {
    to->set_size_bits(p.size_bits);
    to->set_sensitivity(Finite(p.total_sensitivity));
    for (int k : p.bits) to->add_bits(k);
  };
  for (const core::ParetoPoint& p : r.frontier) point(p, out.add_frontier());
  if (r.chosen.has_value()) point(*r.chosen, out.mutable_chosen());
  for (const core::MeasuredPoint& m : r.measured_points) {
    v1::MeasuredPoint* to = out.add_measured_points();
    point(m.point, to->mutable_point());
    to->set_output_kl(Finite(m.output_kl));
    to->set_uniform(m.uniform);
    if (m.reconstructed_kl) to->set_reconstructed_kl(Finite(*m.reconstructed_kl));
  }
  v1::ReconstructionResult* rec = out.mutable_reconstruction();
  rec->set_method(r.reconstruction);
  rec->set_iterations(r.reconstruction_iterations);
  for (const core::ReconstructedUnit& u : r.reconstructed) {
    v1::ReconstructedUnit* to = rec->add_units();
    to->set_name(u.name);
    to->set_error_before(Finite(u.error_before));
    to->set_error_after(Finite(u.error_after));
    to->set_flipped(Finite(u.flipped));
  }
  out.set_budget_bits(r.budget_bits);
  out.set_bound_bits(r.bound_bits);
  for (const auto& [stage, seconds] : r.stage_seconds) {
    v1::StageTime* t = out.add_stage_seconds();
    t->set_stage(StageToProto(stage));
    t->set_seconds(seconds);
  }
  out.set_threads(r.threads);
  out.set_device(r.device);
  out.set_calibration(r.calibration == "distilled" ||
                              r.calibration == "gaussian"
                          ? r.calibration
                          : Basename(r.calibration));
  for (const std::string* path : {&r.model_artifact, &r.recipe_artifact,
                                  &r.data_artifact, &r.report_artifact}) {
    struct stat st;
    if (path->empty() || ::stat(path->c_str(), &st) != 0 ||
        !S_ISREG(st.st_mode)) {
      continue;
    }
    v1::Artifact* a = out.add_artifacts();
    a->set_name(Basename(*path));
    a->set_size_bytes(static_cast<int64_t>(st.st_size));
  }
  return out;
}

int RpcCode(const absl::Status& status) {
  return static_cast<int>(status.code());
}

v1::JobError ErrorFromStatus(const absl::Status& status) {
  v1::JobError error;
  error.set_code(RpcCode(status));
  error.set_message(std::string(status.message()));
  return error;
}

}  // namespace zeroq::worker
