// quantized_model.h: a model with ZeroQ's simulated ("fake") quantization.
//
//   QuantOptions options;                          // W8A8, reference sites
//   ZQ_ASSIGN_OR_RETURN(auto qmodel,
//       QuantizedModel::Create(*model, options, distilled.batches));
//   ZQ_ASSIGN_OR_RETURN(std::vector<torch::Tensor> out, qmodel->Forward(x));
//   ZQ_RETURN_IF_ERROR(qmodel->Save("model.zeroq.pt"));
//
// Built from a copy of the frozen float graph: each conv/linear weight
// constant is replaced, once, by its per-channel quantized-dequantized value
// (quantizer.h), and per-tensor activation quantizers (mul, sub, round,
// clamp, add, div) are inserted after every ReLU/ReLU6 (and, optionally, on
// every conv/linear input). Activation ranges are calibrated site by site in
// graph order, each on the calibration batches with every upstream
// quantizer already active, by QuantOptions::activation_range (min/max,
// percentiles, or the clip with the least quantization error). The result
// is an ordinary TorchScript module with the input model's call signature:
// Save() writes exactly what Forward() runs.
//
// Not thread-safe: one Forward() at a time.
#ifndef ZEROQ_CORE_QUANTIZED_MODEL_H_
#define ZEROQ_CORE_QUANTIZED_MODEL_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/script.h>

#include "absl/status/statusor.h"
#include "core/cancellation.h"
#include "core/model.h"
#include "core/options.h"
#include "core/quantizer.h"

namespace zeroq::core {

struct LayerQuantInfo {
  std::string name;
  int bits = 0;               // 0: kept in float
  int64_t params = 0;
  torch::Tensor scale;        // per output channel; undefined when float
  torch::Tensor zero_point;
  // How the weights were rounded: "nearest", or the reconstruction method
  // that learned them ("adaround"); "" when float.
  std::string rounding;
  // The integer weights q (quantizer.h) when learned; undefined for
  // round-to-nearest, whose q follows from the float weights.
  torch::Tensor learned_q;
};

struct ActivationSiteInfo {
  std::string name;           // e.g. "block/relu", "fc:input"
  std::string after;          // op or "input of <layer>"
  std::string range;          // "minmax", "percentile 99.99" or "mse"
  ActivationQuantization quant;
};

struct CalibrationProgress {
  int site = 0;               // 1-based
  int sites = 0;
  std::string name;
};
using CalibrationProgressFn = std::function<void(const CalibrationProgress&)>;

class QuantizedModel {
 public:
  // INVALID_ARGUMENT for bad options (unknown layer names, widths outside
  // 2..8 for weights or 2..16 for activations); CANCELLED via the token.
  static absl::StatusOr<std::unique_ptr<QuantizedModel>> Create(
      const Model& model, const QuantOptions& options,
      const std::vector<torch::Tensor>& calibration,
      const CalibrationProgressFn& progress = {},
      const CancellationToken* cancel = nullptr);

  // The output tensors (OutputTensors order: outputs.h).
  absl::StatusOr<std::vector<torch::Tensor>> Forward(const torch::Tensor& input);
  // Writes the module as a TorchScript archive with every tensor on the CPU
  // (it loads anywhere; torch.jit.load's map_location moves it to a GPU).
  absl::Status Save(const std::string& path) const;

  const std::vector<LayerQuantInfo>& layers() const { return layers_; }
  const std::vector<ActivationSiteInfo>& sites() const { return sites_; }
  // Bytes of conv/linear weights at their widths (float layers at 32 bits).
  double weight_bytes() const;
  const torch::jit::Module& module() const { return module_; }

  // For reconstruction (reconstruct.h): the forward graph being built, the
  // module's self, and layer i's conv/linear node in it (layers() order).
  torch::jit::Graph& graph() const;
  c10::IValue self() const { return module_._ivalue(); }
  torch::jit::Node* layer_node(size_t i) const { return layer_nodes_.at(i); }
  // Replaces layer i's weight constant by `dequantized` = (q + zp) / scale,
  // with q the integer weights it came from, and records `rounding`.
  // FAILED_PRECONDITION once Forward() has run (its executor has the old
  // graph); INVALID_ARGUMENT for a float layer or a shape mismatch.
  absl::Status SetLearnedWeight(size_t i, const torch::Tensor& dequantized,
                                const torch::Tensor& q,
                                const std::string& rounding);

 private:
  QuantizedModel(torch::jit::Module module, torch::Device device)
      : module_(std::move(module)), device_(device) {}

  torch::jit::Module module_;
  torch::Device device_;
  std::vector<LayerQuantInfo> layers_;
  std::vector<torch::jit::Node*> layer_nodes_;  // in module_'s graph
  std::vector<ActivationSiteInfo> sites_;
  bool ran_ = false;
};

// Checks a QuantOptions against a model (widths, layer names).
absl::Status ValidateQuantOptions(const Model& model,
                                  const QuantOptions& options);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_QUANTIZED_MODEL_H_
