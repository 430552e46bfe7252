// graph_util.h: running and re-wiring copies of a frozen model's graph.
// Internal to the core.
//
//   auto g = ProbeGraph(*model.graph(), {bn_input_indices...});
//   GraphProgram probe(g, model.frozen()._ivalue());
//   std::vector<torch::Tensor> values = probe.Run(x);  // may throw c10::Error
//
// A GraphProgram owns its own graph executor; Run() is not thread-safe.
#ifndef ZEROQ_CORE_GRAPH_UTIL_H_
#define ZEROQ_CORE_GRAPH_UTIL_H_

#include <memory>
#include <utility>
#include <vector>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/script.h>

namespace zeroq::core {

// A value of the graph addressed so that it survives Graph::copy(): the
// output `output` of the node at `node_index` in Model::Nodes() order, or the
// graph input `output` when node_index is -1.
struct ValueRef {
  int node_index = -1;
  int output = 0;
};

torch::jit::Value* Resolve(torch::jit::Graph& graph,
                           const std::vector<torch::jit::Node*>& nodes,
                           const ValueRef& ref);

// A copy of `graph` whose outputs are exactly `values` (in order) instead of
// the model's output; everything no longer needed is removed, so running it
// costs only the part of the model upstream of those values.
std::shared_ptr<torch::jit::Graph> ProbeGraph(
    torch::jit::Graph& graph, const std::vector<ValueRef>& values);

// The same for values of `graph` itself (which is left as it was).
std::shared_ptr<torch::jit::Graph> ProbeGraph(
    torch::jit::Graph& graph, const std::vector<torch::jit::Value*>& values);

class GraphProgram {
 public:
  GraphProgram(std::shared_ptr<torch::jit::Graph> graph, c10::IValue self);
  explicit GraphProgram(std::shared_ptr<torch::jit::Graph> graph)
      : GraphProgram(std::move(graph), c10::IValue()) {}
  // Runs the graph on one input; returns its tensor output, or the tensors
  // of its tuple output.
  std::vector<torch::Tensor> Run(const torch::Tensor& input);
  // Runs a graph whose inputs are `inputs` (no self argument).
  std::vector<torch::Tensor> RunInputs(std::vector<c10::IValue> inputs);
  // The same, for outputs that need not be tensors (sizes, lists).
  std::vector<c10::IValue> RunValues(std::vector<c10::IValue> inputs);
  // Runs a graph with one output and returns it as it is (a tuple stays a
  // tuple): for graphs that end in the model's own output.
  c10::IValue RunOutput(std::vector<c10::IValue> inputs);

 private:
  torch::jit::GraphFunction function_;
  c10::IValue self_;
};

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_GRAPH_UTIL_H_
