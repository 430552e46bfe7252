#include "core/report.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace zeroq::core {

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
  if (mp && !r.measured_points.empty()) {
    const double params = static_cast<double>(r.quantizable_params);
    absl::StrAppendFormat(&out,
                          "measured end to end (output KL against float on "
                          "the calibration data):\n  %12s %9s %14s %12s %14s\n",
                          "weight KiB", "avg bits", "sensitivity", "output KL",
                          "reconstructed");
    for (const MeasuredPoint& m : r.measured_points) {
      const bool chosen = r.chosen && m.point.bits == r.chosen->bits;
      absl::StrAppendFormat(
          &out, "  %12.2f %9.3f %14.6g %12.6g %14s%s%s\n",
          m.point.size_bits / 8192.0, m.point.size_bits / params,
          m.point.total_sensitivity, m.output_kl,
          m.reconstructed_kl ? absl::StrFormat("%.6g", *m.reconstructed_kl)
                             : std::string("-"),
          m.uniform ? "  uniform" : "", chosen ? "  <- chosen" : "");
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
        &out,
        "distillation loss: %.4g -> %.4g (%d iterations), image prior "
        "weight %g\n",
        r.distill_initial_loss, r.distill_final_loss, r.distill_iterations,
        r.distill_tv_weight);
  }
  absl::StrAppendFormat(
      &out,
      "quantized vs float on %d %s samples: top-1 agreement %.2f%%, mean KL %.4g\n",
      r.samples, r.calibration, 100.0 * r.top1_agreement, r.mean_kl);
  if (!r.reconstructed.empty()) {
    double before = 0, after = 0;
    for (const ReconstructedUnit& u : r.reconstructed) {
      before += u.error_before;
      after += u.error_after;
    }
    absl::StrAppendFormat(
        &out, "reconstruction: %s, %d %s x %d steps, output error %.4g -> %.4g\n",
        r.reconstruction, r.reconstructed.size(),
        r.reconstruction == "block" ? "blocks" : "layers",
        r.reconstruction_iterations, before, after);
  }
  std::vector<std::string> stages;
  for (const auto& [stage, s] : r.stage_seconds) {
    stages.push_back(absl::StrFormat("%s %.2fs", StageName(stage), s));
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
  for (const auto& [stage, s] : r.stage_seconds) stages[StageName(stage)] = s;
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
  nlohmann::json units = nlohmann::json::array();
  for (const ReconstructedUnit& u : r.reconstructed) {
    units.push_back({{"name", u.name},
                     {"error_before", u.error_before},
                     {"error_after", u.error_after},
                     {"flipped", u.flipped}});
  }
  nlohmann::json reconstruction = {{"method", r.reconstruction},
                                   {"iterations", r.reconstruction_iterations},
                                   {"units", units}};
  nlohmann::json frontier = nlohmann::json::array();
  for (const ParetoPoint& p : r.frontier) frontier.push_back(point(p));
  nlohmann::json measured = nlohmann::json::array();
  for (const MeasuredPoint& m : r.measured_points) {
    nlohmann::json row = point(m.point);
    row["output_kl"] = m.output_kl;
    row["uniform"] = m.uniform;
    row["reconstructed_kl"] =
        m.reconstructed_kl ? num(*m.reconstructed_kl) : nlohmann::json(nullptr);
    measured.push_back(std::move(row));
  }
  j = {{"layers", layers},
       {"activations", acts},
       {"bn_layers", r.bn_layers},
       {"quantizable_params", r.quantizable_params},
       {"float_weight_bytes", r.float_weight_bytes},
       {"weight_bytes", r.weight_bytes},
       {"distill_initial_loss", num(r.distill_initial_loss)},
       {"distill_final_loss", num(r.distill_final_loss)},
       {"distill_iterations", r.distill_iterations},
       {"distill_tv_weight", num(r.distill_tv_weight)},
       {"top1_agreement", r.top1_agreement},
       {"mean_kl", r.mean_kl},
       {"samples", r.samples},
       {"reconstruction", reconstruction},
       {"stage_seconds", stages},
       {"sensitivity", sens},
       {"frontier", frontier},
       {"chosen", r.chosen ? point(*r.chosen) : nlohmann::json()},
       {"measured_points", measured},
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

