// plan.h: the PARETO stage of a mixed-precision job: the frontier of the
// sensitivity table and the widths chosen within the budget, by measuring
// the few candidates nearest the budget end to end (core-internal).
//
//   ZQ_ASSIGN_OR_RETURN(PlannedWidths planned,
//       PlanStage(model, data.batches, table, spec, progress, cancel));
//   // planned.quant: spec.quant with every layer's chosen width
#ifndef ZEROQ_CORE_STAGES_PLAN_H_
#define ZEROQ_CORE_STAGES_PLAN_H_

#include <optional>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/pareto.h"
#include "core/pipeline.h"
#include "core/stages/stage.h"

namespace zeroq::core {

struct PlannedWidths {
  Plan plan;  // plan.chosen: the configuration taken
  // The candidates measured end to end, in the order measured (empty when
  // spec.measured_points is 0).
  std::vector<MeasuredPoint> measured;
  // spec.quant with every layer's chosen width in layer_bits.
  QuantOptions quant;
  // The uniform candidate, when it was measured and not chosen: its index
  // in `measured` and spec.quant with its widths. The choice is made before
  // any reconstruction, which can recover more of one configuration's
  // error than of another's; RECONSTRUCT, when it runs, learns this one's
  // rounding too and keeps whichever ends closer to float.
  std::optional<size_t> runner_up;
  QuantOptions runner_up_quant;
};

// PlanMixedPrecision() of `table` (one row per layer, in the model's order)
// within *spec.budget, with the layers spec.quant.layer_bits pins kept at
// their width. Then, unless spec.measured_points is 0, the candidates (the
// spec.measured_points frontier points within the budget nearest to it, and
// every unpinned layer at the widest candidate width that fits) are each
// quantized and calibrated on `data`, and the one with the lowest mean
// KL(softmax float || softmax quantized) on `data` becomes plan.chosen
// (ties: the lower sensitivity sum).
// Events: one per measured candidate (its KL in the message), one per
// frontier point (size_bits, omega = its total sensitivity, bits = 1 for
// the chosen point, if it is on the frontier), then the choice in words
// with its size and Omega (and the uniform runner-up, if any). REQUIRES:
// spec.budget. CANCELLED via the token.
absl::StatusOr<PlannedWidths> PlanStage(
    const Model& model, const std::vector<torch::Tensor>& data,
    const std::vector<LayerSensitivity>& table, const JobSpec& spec,
    const StageProgress& progress, const CancellationToken* cancel);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_PLAN_H_
