// quantized_model.h: a model with ZeroQ's simulated ("fake") quantization.
//
//   QuantOptions options;                          // W8A8, reference sites
//   ZQ_ASSIGN_OR_RETURN(auto qmodel,
//       QuantizedModel::Create(*model, options, distilled.batches));
//   ZQ_ASSIGN_OR_RETURN(std::vector<torch::Tensor> out, qmodel->Forward(x));
//   ZQ_RETURN_IF_ERROR(qmodel->Save("model.zeroq.pt"));
//
// Built from a copy of the frozen float graph in two steps, which Create()
// runs one after the other (the pipeline's CALIBRATE stage calls them
// itself):
//  1. QuantizeWeights(): each conv/linear weight constant is replaced, once,
//     by its per-channel quantized-dequantized value (quantizer.h, round to
//     nearest), and the activation sites are found: every ReLU/ReLU6 output
//     (and, optionally, every conv/linear input).
//  2. CalibrateActivations(): per-tensor activation quantizers (mul, sub,
//     round, clamp, add, div) are calibrated site by site in graph order,
//     each on the calibration batches with every upstream quantizer already
//     in the graph, by QuantOptions::activation_range (min/max,
//     percentiles, or the clip with the least quantization error), and
//     inserted.
// Learned weights (reconstruct.h) may replace the rounded ones through
// SetLearnedWeight() any time before the first Forward(). The result is an
// ordinary TorchScript module with the input model's call signature: Save()
// writes exactly what Forward() runs.
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
  // QuantizeWeights() then CalibrateActivations(). INVALID_ARGUMENT for bad
  // options (unknown layer names, widths outside 2..8 for weights or 2..16
  // for activations) and for activation quantization without calibration
  // batches; CANCELLED via the token.
  static absl::StatusOr<std::unique_ptr<QuantizedModel>> Create(
      const Model& model, const QuantOptions& options,
      const std::vector<torch::Tensor>& calibration,
      const CalibrationProgressFn& progress = {},
      const CancellationToken* cancel = nullptr);

  // Step 1: the weights rounded to nearest at their widths and stored as
  // graph constants; the activation sites found but not yet calibrated
  // (sites() is empty until CalibrateActivations). INVALID_ARGUMENT for bad
  // options, as Create.
  static absl::StatusOr<std::unique_ptr<QuantizedModel>> QuantizeWeights(
      const Model& model, const QuantOptions& options);

  // Step 2: calibrates every site found by QuantizeWeights in graph order,
  // each with the quantizers upstream of it active, and inserts its
  // quantizer; `progress` once per site. Runs probe graphs, never the
  // module's forward, so SetLearnedWeight() still works afterwards.
  // INVALID_ARGUMENT without calibration batches when activations are
  // quantized (nothing changed: call again); CANCELLED via the token
  // (checked before each site). Past those checks it runs once: any later
  // call is FAILED_PRECONDITION, and after an error midway the model is
  // only partly calibrated and should be dropped.
  absl::Status CalibrateActivations(
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
  // Replaces layer i's weight constant by `dequantized` = (q + zp) / scale
  // (per output channel), with q the integer weights it came from, and
  // records `rounding`. FAILED_PRECONDITION once Forward() has run (its
  // executor has the old graph); INVALID_ARGUMENT for a float layer or a
  // shape mismatch.
  absl::Status SetLearnedWeight(size_t i, const torch::Tensor& dequantized,
                                const torch::Tensor& q,
                                const torch::Tensor& scale,
                                const torch::Tensor& zero_point,
                                const std::string& rounding);
  // Replaces input `input` of `node` (a node of graph(), e.g. a layer's
  // bias or its BatchNorm's shift) by a constant. Same preconditions.
  absl::Status SetConstantInput(torch::jit::Node* node, size_t input,
                                const torch::Tensor& value);
  // Site i's quantizer (sites() order): its first node (the mul) in
  // graph(), nullptr when none was inserted.
  torch::jit::Node* site_node(size_t i) const { return site_nodes_.at(i); }
  // Gives site i's quantizer the scale `scale` (its zero point and integer
  // range kept, so the range it represents stretches) in the graph and in
  // sites(). Same preconditions as SetLearnedWeight; INVALID_ARGUMENT for a
  // site without a quantizer or a scale that is not positive.
  absl::Status SetActivationScale(size_t i, double scale);

 private:
  // An activation site found by QuantizeWeights, waiting for calibration.
  struct PendingSite {
    torch::jit::Value* value = nullptr;
    bool all_uses = true;  // false: only uses by conv/linear layers
    ActivationSiteInfo info;
    torch::jit::Node* quant_node = nullptr;  // once inserted
  };

  QuantizedModel(torch::jit::Module module, torch::Device device,
                 const QuantOptions& options)
      : module_(std::move(module)), device_(device), options_(options) {}

  // The activation sites of the copied graph, in graph order. `nodes` is
  // Model::Nodes() of that graph before any rewrite: the model's node
  // indices point into it.
  void FindSites(const Model& model, torch::jit::Graph& g,
                 const std::vector<torch::jit::Node*>& nodes);
  // Each layer's weights at its width, as graph constants; layer_nodes_.
  absl::Status QuantizeLayerWeights(
      const Model& model, torch::jit::Graph& g,
      const std::vector<torch::jit::Node*>& nodes);
  // Calibrates `site` (the i-th) and inserts its quantizer.
  absl::Status CalibrateSite(size_t i, PendingSite& site,
                             const std::vector<torch::Tensor>& calibration);

  torch::jit::Module module_;
  torch::Device device_;
  QuantOptions options_;
  std::vector<LayerQuantInfo> layers_;
  // In module_'s graph. Node pointers stay valid while quantizers are
  // inserted, so these remain usable after calibration.
  std::vector<torch::jit::Node*> layer_nodes_;
  std::vector<PendingSite> pending_sites_;  // until CalibrateActivations
  std::vector<ActivationSiteInfo> sites_;
  std::vector<torch::jit::Node*> site_nodes_;  // parallel to sites_
  bool calibrated_ = false;
  bool ran_ = false;
};

// Checks a QuantOptions against a model (widths, layer names).
absl::Status ValidateQuantOptions(const Model& model,
                                  const QuantOptions& options);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_QUANTIZED_MODEL_H_
