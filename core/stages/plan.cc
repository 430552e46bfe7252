#include "core/stages/plan.h"

#include <algorithm>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "core/quantized_model.h"
#include "core/stages/export.h"

namespace zeroq::core {
namespace {

void ReportFrontier(const Plan& plan, const StageProgress& progress) {
  const int64_t n = static_cast<int64_t>(plan.frontier.size());
  for (int64_t i = 0; i < n; ++i) {
    const ParetoPoint& p = plan.frontier[i];
    ProgressEvent e;
    e.step = i + 1;
    e.total = n;
    e.size_bits = p.size_bits;
    e.omega = p.total_sensitivity;
    e.bits = p.bits == plan.chosen.bits ? 1 : 0;
    progress(std::move(e));
  }
}

void ReportChoice(const Plan& plan, int64_t quantizable_params, size_t measured,
                  const MeasuredPoint* runner_up, const StageProgress& progress) {
  ProgressEvent e;
  e.step = 1;
  e.total = 1;
  e.message = absl::StrFormat(
      "chose %.2f average bits (%.1f KiB of weights) within a budget of %.2f%s%s",
      double(plan.chosen.size_bits) / quantizable_params,
      plan.chosen.size_bits / 8192.0,
      double(plan.budget_bits) / quantizable_params,
      measured > 0 ? absl::StrFormat(", the closest to float of %d measured",
                                     measured)
                   : std::string(),
      runner_up != nullptr
          ? absl::StrFormat("; the uniform %.2f bits is the runner-up",
                            double(runner_up->point.size_bits) / quantizable_params)
          : std::string());
  e.size_bits = plan.chosen.size_bits;
  e.omega = plan.chosen.total_sensitivity;
  progress(std::move(e));
}

// Every layer at `width`, pinned layers at their pin: its size and
// sensitivity sum, or nothing if a layer lacks that width.
std::optional<ParetoPoint> UniformPoint(const std::vector<LayerCost>& costs,
                                        int width) {
  ParetoPoint p;
  for (const LayerCost& c : costs) {
    const int bits = c.pinned_bits.value_or(width);
    auto it = std::find(c.bits.begin(), c.bits.end(), bits);
    if (it == c.bits.end()) return std::nullopt;
    p.bits.push_back(bits);
    p.size_bits += c.params * bits;
    p.total_sensitivity += c.sensitivity[it - c.bits.begin()];
  }
  return p;
}

// What PARETO measures: the `n` frontier points within the budget nearest
// to it (the sensitivity sum's choice first), then the widest uniform
// configuration within the budget if it is not one of them. The sum is
// only a proxy: at equal size a uniform width can beat the mixed points,
// and nearby frontier points differ by less than its error.
std::vector<MeasuredPoint> Candidates(const Plan& plan,
                                      const std::vector<LayerCost>& costs,
                                      int n) {
  std::vector<MeasuredPoint> out;
  for (auto it = plan.frontier.rbegin();
       it != plan.frontier.rend() && static_cast<int>(out.size()) < n; ++it) {
    if (it->size_bits <= plan.budget_bits) out.push_back({*it, 0, false});
  }
  std::vector<int> widths = costs.empty() ? std::vector<int>() : costs[0].bits;
  std::sort(widths.rbegin(), widths.rend());
  for (int w : widths) {
    std::optional<ParetoPoint> u = UniformPoint(costs, w);
    if (!u || u->size_bits > plan.budget_bits) continue;
    auto same = [&](const MeasuredPoint& m) { return m.point.bits == u->bits; };
    auto found = std::find_if(out.begin(), out.end(), same);
    if (found != out.end()) {
      found->uniform = true;
    } else {
      out.push_back({*u, 0, true});
    }
    break;
  }
  return out;
}

// `quant` with layer i of `costs` at bits[i].
QuantOptions WithWidths(QuantOptions quant, const std::vector<LayerCost>& costs,
                        const std::vector<int>& bits) {
  for (size_t i = 0; i < costs.size(); ++i) quant.layer_bits[costs[i].name] = bits[i];
  return quant;
}

// Mean KL of the model quantized with `quant`, calibrated on `data`,
// against float on `data`.
absl::StatusOr<double> OutputKl(const Model& model,
                                const std::vector<torch::Tensor>& data,
                                const QuantOptions& quant,
                                const CancellationToken* cancel) {
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<QuantizedModel> q,
                      QuantizedModel::QuantizeWeights(model, quant));
  ZQ_RETURN_IF_ERROR(q->CalibrateActivations(data, {}, cancel));
  return MeanOutputKl(model, *q, data);
}

}  // namespace

absl::StatusOr<PlannedWidths> PlanStage(
    const Model& model, const std::vector<torch::Tensor>& data,
    const std::vector<LayerSensitivity>& table, const JobSpec& spec,
    const StageProgress& progress, const CancellationToken* cancel) {
  const int64_t params = model.summary().quantizable_params;
  PlannedWidths out;
  std::vector<LayerCost> costs;
  for (const LayerSensitivity& row : table) {
    LayerCost c{row.name, row.params, row.bits, row.omega, std::nullopt};
    auto pin = spec.quant.layer_bits.find(row.name);
    if (pin != spec.quant.layer_bits.end()) c.pinned_bits = pin->second;
    costs.push_back(std::move(c));
  }
  ZQ_ASSIGN_OR_RETURN(out.plan,
                      PlanMixedPrecision(costs, *spec.budget, spec.plan));
  if (spec.measured_points > 0 && !data.empty()) {
    out.measured = Candidates(out.plan, costs, spec.measured_points);
    const int64_t n = static_cast<int64_t>(out.measured.size());
    for (int64_t i = 0; i < n; ++i) {
      ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "planning"));
      MeasuredPoint& m = out.measured[i];
      ZQ_ASSIGN_OR_RETURN(
          m.output_kl,
          OutputKl(model, data, WithWidths(spec.quant, costs, m.point.bits),
                   cancel));
      ProgressEvent e;
      e.step = i + 1;
      e.total = n;
      e.size_bits = m.point.size_bits;
      e.omega = m.point.total_sensitivity;
      e.message = absl::StrFormat(
          "measured %.3f average bits%s: output KL %.4g on the calibration "
          "data",
          double(m.point.size_bits) / params, m.uniform ? " (uniform)" : "",
          m.output_kl);
      progress(std::move(e));
    }
    auto best = std::min_element(
        out.measured.begin(), out.measured.end(),
        [](const MeasuredPoint& a, const MeasuredPoint& b) {
          if (a.output_kl != b.output_kl) return a.output_kl < b.output_kl;
          return a.point.total_sensitivity < b.point.total_sensitivity;
        });
    if (best != out.measured.end()) out.plan.chosen = best->point;
    for (size_t i = 0; i < out.measured.size(); ++i) {
      const MeasuredPoint& m = out.measured[i];
      if (m.uniform && m.point.bits != out.plan.chosen.bits) {
        out.runner_up = i;
        out.runner_up_quant = WithWidths(spec.quant, costs, m.point.bits);
      }
    }
  }
  out.quant = WithWidths(spec.quant, costs, out.plan.chosen.bits);
  ReportFrontier(out.plan, progress);
  ReportChoice(out.plan, params, out.measured.size(),
               out.runner_up ? &out.measured[*out.runner_up] : nullptr, progress);
  return out;
}

}  // namespace zeroq::core
