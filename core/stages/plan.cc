#include "core/stages/plan.h"

#include <optional>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"

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
    e.bits = p.size_bits == plan.chosen.size_bits ? 1 : 0;
    progress(std::move(e));
  }
}

void ReportChoice(const Plan& plan, int64_t quantizable_params,
                  const StageProgress& progress) {
  ProgressEvent e;
  e.step = 1;
  e.total = 1;
  e.message = absl::StrFormat(
      "chose %.2f average bits (%.1f KiB of weights) within a budget of %.2f",
      double(plan.chosen.size_bits) / quantizable_params,
      plan.chosen.size_bits / 8192.0,
      double(plan.budget_bits) / quantizable_params);
  e.size_bits = plan.chosen.size_bits;
  e.omega = plan.chosen.total_sensitivity;
  progress(std::move(e));
}

}  // namespace

absl::StatusOr<PlannedWidths> PlanStage(
    const std::vector<LayerSensitivity>& table, int64_t quantizable_params,
    const JobSpec& spec, const StageProgress& progress) {
  PlannedWidths out;
  out.quant = spec.quant;
  std::vector<LayerCost> costs;
  for (const LayerSensitivity& row : table) {
    LayerCost c{row.name, row.params, row.bits, row.omega, std::nullopt};
    auto pin = spec.quant.layer_bits.find(row.name);
    if (pin != spec.quant.layer_bits.end()) c.pinned_bits = pin->second;
    costs.push_back(std::move(c));
  }
  ZQ_ASSIGN_OR_RETURN(out.plan,
                      PlanMixedPrecision(costs, *spec.budget, spec.plan));
  ReportFrontier(out.plan, progress);
  for (size_t i = 0; i < costs.size(); ++i) {
    out.quant.layer_bits[costs[i].name] = out.plan.chosen.bits[i];
  }
  ReportChoice(out.plan, quantizable_params, progress);
  return out;
}

}  // namespace zeroq::core
