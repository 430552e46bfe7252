#include "core/stages/sensitivity.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/pareto.h"
#include "core/sensitivity.h"

namespace zeroq::core {
namespace {

// The table with only the `widths` columns (all of them when empty).
absl::StatusOr<std::vector<LayerSensitivity>> KeepWidths(
    const std::vector<LayerSensitivity>& table,
    const std::vector<int>& widths) {
  if (widths.empty()) return table;
  std::vector<LayerSensitivity> out;
  for (const LayerSensitivity& row : table) {
    ZQ_RETURN_IF_ERROR(CheckReplanWidths(widths, row.bits));
    LayerSensitivity kept{row.name, row.params, {}, {}};
    for (size_t j = 0; j < row.bits.size(); ++j) {
      if (std::find(widths.begin(), widths.end(), row.bits[j]) !=
          widths.end()) {
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
    return absl::InvalidArgumentError(
        absl::StrCat("the stored sensitivity table has ", table.size(),
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

absl::StatusOr<std::vector<LayerSensitivity>> SensitivityStage(
    const Model& model, const std::vector<torch::Tensor>& data,
    const JobSpec& spec, const StageProgress& progress,
    const CancellationToken* cancel) {
  if (!spec.precomputed_sensitivity.empty()) {
    ZQ_RETURN_IF_ERROR(
        CheckSensitivityTable(spec.precomputed_sensitivity, model.summary()));
    ZQ_ASSIGN_OR_RETURN(
        std::vector<LayerSensitivity> table,
        KeepWidths(spec.precomputed_sensitivity, spec.replan_widths));
    progress.Step(1, 1, "using the stored sensitivity table");
    return table;
  }
  auto on_measured = [&](const SensitivityProgress& p) {
    ProgressEvent e;
    e.step = p.step;
    e.total = p.total;
    e.layer = p.layer;
    e.bits = p.bits;
    e.omega = p.omega;
    progress(std::move(e));
  };
  return ComputeSensitivity(model, data, spec.sensitivity, on_measured, cancel);
}

}  // namespace zeroq::core
