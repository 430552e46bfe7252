// model.h: a TorchScript model loaded, frozen and analysed for ZeroQ.
//
//   ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
//                       Model::LoadFromFile("resnet18.pt", "cpu"));
//   ZQ_RETURN_IF_ERROR(model->CheckInputShape({1, 3, 224, 224}));
//   for (const BnLayer& bn : model->summary().bn_layers) ...
//
// Loading evaluates the module, freezes it (parameters and buffers become
// graph constants), inlines every call and rewrites in-place ops into their
// functional forms. The analysis then walks that graph: every aten::batch_norm
// node with the value that really flows into it (data flow, not module
// order), and every conv/linear node with its module path name, weight shape,
// parameter count and the BN that consumes its output.
//
// A Model is immutable after loading: its const methods are safe to call from
// several threads, except that LibTorch runs one forward at a time per
// graph executor, so concurrent Forward() calls serialise inside LibTorch.
#ifndef ZEROQ_CORE_MODEL_H_
#define ZEROQ_CORE_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/script.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace zeroq::core {

enum class LayerKind { kConv, kLinear };

// A conv or linear layer whose weights ZeroQ quantizes.
struct QuantLayer {
  std::string name;          // module path, e.g. "layer1.0.conv1"
  LayerKind kind;
  std::string op;            // graph op, e.g. "aten::conv2d"
  std::vector<int64_t> weight_shape;
  int64_t params = 0;        // weight elements (bias excluded: it stays float)
  std::string bn;            // BN that consumes its output, "" if none
  int node_index = -1;       // position in Model::Nodes(graph)
};

struct BnLayer {
  std::string name;          // module path, e.g. "layer1.0.bn1"
  int64_t channels = 0;
  // What produces the BN's input: the conv/linear layer's name if that is the
  // producer, else the op kind (e.g. "aten::cat" in a DenseNet).
  std::string input_from;
  int node_index = -1;       // position in Model::Nodes(graph)
};

struct ModelSummary {
  std::vector<BnLayer> bn_layers;
  std::vector<QuantLayer> layers;
  int64_t total_params = 0;        // every constant tensor's elements
  int64_t quantizable_params = 0;  // sum of QuantLayer::params
};

class Model {
 public:
  // Loads a TorchScript archive onto `device` ("cpu", "cuda", "cuda:1").
  // INVALID_ARGUMENT: not a TorchScript archive, no forward, forward does not
  // take exactly one tensor or returns something other than tensors (one, or
  // tuples, NamedTuples, lists or dicts of them; outputs.h). FAILED_PRECONDITION: no
  // BatchNorm layer (ZeroQ needs their statistics).
  static absl::StatusOr<std::unique_ptr<Model>> LoadFromFile(
      const std::string& path, const std::string& device = "cpu");
  static absl::StatusOr<std::unique_ptr<Model>> LoadFromBytes(
      absl::string_view bytes, const std::string& device = "cpu");
  // Freezes and analyses an already loaded module (it is put in eval mode).
  static absl::StatusOr<std::unique_ptr<Model>> FromModule(
      torch::jit::Module module, torch::Device device);

  const ModelSummary& summary() const { return summary_; }
  const torch::Device& device() const { return device_; }

  // Runs one forward on zeros of `shape` (batch included). INVALID_ARGUMENT
  // with the model's own message if the model rejects the shape.
  absl::Status CheckInputShape(const std::vector<int64_t>& shape) const;

  // The float model's output tensors for a batch (OutputTensors order).
  absl::StatusOr<std::vector<torch::Tensor>> Forward(
      const torch::Tensor& input) const;

  // The frozen float module. Its forward graph is the analysed graph.
  const torch::jit::Module& frozen() const { return frozen_; }
  std::shared_ptr<torch::jit::Graph> graph() const;

  // Every node of `graph` (nested blocks included) in a fixed depth-first
  // order. A copy of graph() lists its nodes in the same order, so the
  // node_index fields above address nodes in copies too.
  static std::vector<torch::jit::Node*> Nodes(torch::jit::Graph& graph);

 private:
  Model(torch::jit::Module frozen, torch::Device device)
      : frozen_(std::move(frozen)), device_(device) {}
  absl::Status Analyse();

  mutable torch::jit::Module frozen_;
  torch::Device device_;
  std::map<const void*, std::string> names_;  // parameter names by storage
  ModelSummary summary_;
};

// The module path of the call stack a graph node was inlined from, e.g.
// "features.denseblock1.denselayer1.norm1", or "" at the top level.
std::string ScopeName(const torch::jit::Node& node);

// True if the graph still mutates a value in place (an in-place op or a
// list mutation that loading could not rewrite). Graph slicing then falls
// back to whole-graph runs.
bool HasMutation(const torch::jit::Graph& graph);

// True for the ops this core quantizes as layers (conv1d/2d/3d, linear).
bool IsQuantizableOp(const torch::jit::Node& node);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_MODEL_H_
