#include "core/graph_util.h"

#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include "core/model.h"

namespace zeroq::core {

namespace {
// Functions return one value: several are returned as a tuple. Everything
// no output needs is removed.
void SetTupleOutput(torch::jit::Graph& g,
                    const std::vector<torch::jit::Value*>& values) {
  torch::jit::Node* tuple = g.createTuple(values);
  g.appendNode(tuple);
  g.registerOutput(tuple->output());
  torch::jit::EliminateDeadCode(g.block());
}
}  // namespace

torch::jit::Value* Resolve(torch::jit::Graph& graph,
                           const std::vector<torch::jit::Node*>& nodes,
                           const ValueRef& ref) {
  if (ref.node_index < 0) return graph.inputs().at(ref.output);
  return nodes.at(ref.node_index)->outputs().at(ref.output);
}

std::shared_ptr<torch::jit::Graph> ProbeGraph(
    torch::jit::Graph& graph, const std::vector<ValueRef>& values) {
  std::shared_ptr<torch::jit::Graph> copy = graph.copy();
  std::vector<torch::jit::Node*> nodes = Model::Nodes(*copy);
  std::vector<torch::jit::Value*> wanted;
  wanted.reserve(values.size());
  for (const ValueRef& ref : values)
    wanted.push_back(Resolve(*copy, nodes, ref));
  while (!copy->outputs().empty()) copy->eraseOutput(0);
  SetTupleOutput(*copy, wanted);
  return copy;
}

std::shared_ptr<torch::jit::Graph> ProbeGraph(
    torch::jit::Graph& graph, const std::vector<torch::jit::Value*>& values) {
  const size_t original = graph.outputs().size();
  for (torch::jit::Value* v : values) graph.registerOutput(v);
  std::shared_ptr<torch::jit::Graph> copy = graph.copy();
  while (graph.outputs().size() > original) {
    graph.eraseOutput(graph.outputs().size() - 1);
  }
  std::vector<torch::jit::Value*> wanted(copy->outputs().begin() + original,
                                         copy->outputs().end());
  while (!copy->outputs().empty()) copy->eraseOutput(0);
  SetTupleOutput(*copy, wanted);
  return copy;
}

GraphProgram::GraphProgram(std::shared_ptr<torch::jit::Graph> graph,
                           c10::IValue self)
    : function_("zeroq_probe", std::move(graph), nullptr,
                torch::jit::ExecutorExecutionMode::SIMPLE),
      self_(std::move(self)) {}

std::vector<torch::Tensor> GraphProgram::Run(const torch::Tensor& input) {
  return RunInputs({self_, input});
}

std::vector<torch::Tensor> GraphProgram::RunInputs(
    std::vector<c10::IValue> inputs) {
  std::vector<torch::Tensor> out;
  for (c10::IValue& v : RunValues(std::move(inputs))) {
    out.push_back(std::move(v).toTensor());
  }
  return out;
}

c10::IValue GraphProgram::RunOutput(std::vector<c10::IValue> inputs) {
  torch::jit::Stack stack = std::move(inputs);
  function_.run(stack);
  return std::move(stack.at(0));
}

std::vector<c10::IValue> GraphProgram::RunValues(
    std::vector<c10::IValue> inputs) {
  torch::jit::Stack stack = std::move(inputs);
  function_.run(stack);
  if (!stack.at(0).isTuple()) return {stack.at(0)};
  const auto& elements = stack.at(0).toTupleRef().elements();
  return std::vector<c10::IValue>(elements.begin(), elements.end());
}

}  // namespace zeroq::core
