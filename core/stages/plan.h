// plan.h: the PARETO stage of a mixed-precision job: the frontier of the
// sensitivity table and the widths chosen within the budget (core-internal).
//
//   ZQ_ASSIGN_OR_RETURN(PlannedWidths planned,
//       PlanStage(table, summary.quantizable_params, spec, progress));
//   // planned.quant: spec.quant with every layer's chosen width
#ifndef ZEROQ_CORE_STAGES_PLAN_H_
#define ZEROQ_CORE_STAGES_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/options.h"
#include "core/pareto.h"
#include "core/pipeline.h"
#include "core/stages/stage.h"

namespace zeroq::core {

struct PlannedWidths {
  Plan plan;
  // spec.quant with every layer's chosen width in layer_bits.
  QuantOptions quant;
};

// PlanMixedPrecision() of `table` (one row per layer, in the model's order)
// within *spec.budget, with the layers spec.quant.layer_bits pins kept at
// their width. Events: one per frontier point (size_bits, omega = its
// total sensitivity, bits = 1 for the chosen point), then the choice in
// words with its size and Omega. `quantizable_params` (the model's) turns
// sizes into average bits. REQUIRES: spec.budget.
absl::StatusOr<PlannedWidths> PlanStage(
    const std::vector<LayerSensitivity>& table, int64_t quantizable_params,
    const JobSpec& spec, const StageProgress& progress);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_PLAN_H_
