// sensitivity.h: ZeroQ's per-layer sensitivity sweep (ZEROQ.md section 3).
//
//   SensitivityOptions options;                    // widths {2, 3, 4, 6, 8}
//   ZQ_ASSIGN_OR_RETURN(std::vector<LayerSensitivity> table,
//       ComputeSensitivity(*model, distilled.batches, options, on_layer));
//   // table[i].omega[j]: layer i with its weights at table[i].bits[j] bits
//
// Omega_i(k) = mean over the samples of KL(softmax(float model(x)) ||
// softmax(model with only layer i's weights at k bits)(x)); every other layer
// stays in float, or at 8 bits with others_at_8bit.
//
// Graph slicing. Quantizing layer i changes nothing upstream of it, so the
// sweep runs the (base) model once per batch and keeps every value that the
// part of the graph downstream of layer i reads from outside that part: the
// layer's input and every value still live past it (residual branches,
// shapes). For each layer it builds a slice graph of just the nodes that
// depend on the layer's output, whose inputs are those kept values and the
// layer's weight; each (layer, width) pair then costs only that suffix.
// The slice runs the same ops on the same values as the full model, so the
// Omega values equal the naive sweep's (slice_graph = false: one full
// forward per layer and width), which tests and bench/ check.
//
// Not thread-safe for one Model (LibTorch runs the graphs).
#ifndef ZEROQ_CORE_SENSITIVITY_H_
#define ZEROQ_CORE_SENSITIVITY_H_

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"

namespace zeroq::core {

struct SensitivityProgress {
  int step = 0;                       // 1-based (layer, width) pairs done
  int total = 0;
  std::string layer;
  int bits = 0;
  double omega = 0;                   // final only on the last batch
};
using SensitivityProgressFn = std::function<void(const SensitivityProgress&)>;

// INVALID_ARGUMENT for empty data or widths outside 2..8; CANCELLED via the
// token (checked before each layer).
absl::StatusOr<std::vector<LayerSensitivity>> ComputeSensitivity(
    const Model& model, const std::vector<torch::Tensor>& data,
    const SensitivityOptions& options,
    const SensitivityProgressFn& progress = {},
    const CancellationToken* cancel = nullptr);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_SENSITIVITY_H_
