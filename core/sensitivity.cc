#include "core/sensitivity.h"

#include <algorithm>
#include <memory>

#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/graph_util.h"
#include "core/outputs.h"
#include "core/quantizer.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

bool IsConstant(const Value* v) { return v->node()->kind() == c10::prim::Constant; }

// Values from outside `node` that it reads: its inputs and, for nodes with
// blocks (if, loop), whatever their bodies read from the enclosing scope.
std::vector<Value*> FreeValues(Node* node) {
  std::vector<Value*> out(node->inputs().begin(), node->inputs().end());
  std::function<void(torch::jit::Block*)> walk = [&](torch::jit::Block* b) {
    for (Node* n : b->nodes()) {
      for (Value* v : n->inputs()) {
        Node* def = v->node();
        bool inside = false;
        for (torch::jit::Block* p = def->owningBlock(); p != nullptr;
             p = p->owningNode() ? p->owningNode()->owningBlock() : nullptr) {
          if (p->owningNode() == node) {
            inside = true;
            break;
          }
        }
        if (!inside && def != node) out.push_back(v);
      }
      for (torch::jit::Block* sub : n->blocks()) walk(sub);
    }
    for (Value* v : b->outputs()) {
      Node* def = v->node();
      if (def->owningBlock() == b || def == b->param_node()) continue;
      out.push_back(v);
    }
  };
  for (torch::jit::Block* b : node->blocks()) walk(b);
  return out;
}

// What one layer's sweep runs: a graph from (kept values..., weight) to the
// model output, and which values of the base graph feed it.
struct Slice {
  std::shared_ptr<Graph> graph;
  std::vector<Value*> inputs;  // base-graph values, in graph input order
  bool affects_output = true;
};

// The slice of `base` downstream of `layer` (a top-level node). With
// `whole`, the slice is the entire graph (the naive sweep).
Slice BuildSlice(Graph& base, Node* layer, bool whole) {
  std::vector<Node*> top(base.block()->nodes().begin(),
                         base.block()->nodes().end());
  absl::flat_hash_set<const Value*> dependent;
  std::vector<Node*> members;
  bool seen_layer = false;
  for (Node* n : top) {
    if (n == layer) seen_layer = true;
    if (!seen_layer && !whole) continue;
    bool member = whole || n == layer;
    if (!member) {
      for (Value* v : FreeValues(n)) member |= dependent.count(v) > 0;
    }
    if (!member) continue;
    members.push_back(n);
    if (n == layer || !whole) {
      for (Value* o : n->outputs()) dependent.insert(o);
    }
  }
  if (whole) {
    dependent.clear();
    for (Node* n : members) for (Value* o : n->outputs()) dependent.insert(o);
  }

  Slice slice;
  slice.graph = std::make_shared<Graph>();
  Graph& g = *slice.graph;
  absl::flat_hash_map<Value*, Value*> env;
  // Inputs: values produced outside the slice (not constants), in order of
  // first use; then the layer's weight.
  for (Node* n : members) {
    for (Value* v : FreeValues(n)) {
      if (dependent.count(v) || IsConstant(v) || env.count(v)) continue;
      env[v] = g.addInput()->setType(v->type());
      slice.inputs.push_back(v);
    }
  }
  Value* weight = g.addInput("weight")->setType(c10::TensorType::get());
  auto map = [&](Value* v) -> Value* {
    auto it = env.find(v);
    if (it != env.end()) return it->second;
    if (IsConstant(v)) {
      Node* c = g.createClone(v->node(), [](Value* x) { return x; });
      g.insertNode(c);
      env[v] = c->output();
      return c->output();
    }
    throw std::runtime_error("slice input not found");
  };
  for (Node* n : members) {
    Node* c = g.createClone(n, map);
    g.insertNode(c);
    if (n == layer) c->replaceInput(1, weight);
    for (size_t k = 0; k < n->outputs().size(); ++k) {
      env[n->output(k)] = c->output(k);
    }
  }
  Value* out = base.outputs().at(0);
  auto it = env.find(out);
  if (it == env.end()) {
    slice.affects_output = false;
    return slice;
  }
  g.registerOutput(it->second);
  torch::jit::EliminateDeadCode(slice.graph);
  return slice;
}

}  // namespace

absl::StatusOr<std::vector<LayerSensitivity>> ComputeSensitivity(
    const Model& model, const std::vector<torch::Tensor>& data,
    const SensitivityOptions& options, const SensitivityProgressFn& progress,
    const CancellationToken* cancel) {
  if (data.empty()) {
    return absl::InvalidArgumentError("the sensitivity sweep needs data");
  }
  if (options.bits.empty()) {
    return absl::InvalidArgumentError("no candidate bit widths given");
  }
  for (int k : options.bits) {
    if (!kCandidateBits.Contains(k)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "candidate width ", k, " is outside ", kCandidateBits.Describe()));
    }
  }
  const std::vector<QuantLayer>& layers = model.summary().layers;
  std::vector<LayerSensitivity> table(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    table[i].name = layers[i].name;
    table[i].params = layers[i].params;
    table[i].bits = options.bits;
    table[i].omega.assign(options.bits.size(), 0.0);
  }
  if (layers.empty()) return table;

  absl::Status status = CallTorch(
      "sensitivity sweep",
      [&] {
        torch::NoGradGuard no_grad;
        std::shared_ptr<Graph> base = model.graph()->copy();
        std::vector<Node*> nodes = Model::Nodes(*base);
        // The weights each (layer, width) is evaluated with, quantized once.
        std::vector<std::vector<torch::Tensor>> quantized(layers.size());
        for (size_t i = 0; i < layers.size(); ++i) {
          Node* n = nodes.at(layers[i].node_index);
          torch::Tensor w = torch::jit::toIValue(n->input(1))->toTensor();
          for (int k : options.bits) {
            auto q = QuantizeWeight(w, k);
            if (!q.ok()) throw std::runtime_error(std::string(q.status().message()));
            quantized[i].push_back(q->dequantized);
          }
          if (options.others_at_8bit) {
            auto q8 = QuantizeWeight(w, 8);
            if (!q8.ok()) throw std::runtime_error(std::string(q8.status().message()));
            torch::jit::WithInsertPoint guard(n);
            n->replaceInput(1, base->insertConstant(q8->dequantized));
          }
        }
        // Slices, and the union of the values they read.
        const bool can_slice = options.slice_graph && !HasMutation(*base);
        std::vector<Slice> slices(layers.size());
        std::vector<std::unique_ptr<GraphProgram>> programs(layers.size());
        std::vector<Value*> kept;
        absl::flat_hash_map<Value*, int> kept_index;
        for (size_t i = 0; i < layers.size(); ++i) {
          Node* n = nodes.at(layers[i].node_index);
          const bool top = n->owningBlock() == base->block();
          slices[i] = BuildSlice(*base, n, !can_slice || !top);
          if (!slices[i].affects_output) continue;
          programs[i] = std::make_unique<GraphProgram>(slices[i].graph);
          for (Value* v : slices[i].inputs) {
            if (v->node()->kind() == c10::prim::Param) continue;
            if (kept_index.emplace(v, static_cast<int>(kept.size())).second) {
              kept.push_back(v);
            }
          }
        }
        std::unique_ptr<GraphProgram> base_run;
        if (!kept.empty()) {
          base_run = std::make_unique<GraphProgram>(ProbeGraph(*base, kept),
                                                    model.frozen()._ivalue());
        }
        const int total = static_cast<int>(layers.size() * options.bits.size());
        std::vector<std::vector<double>> kl(
            layers.size(), std::vector<double>(options.bits.size(), 0.0));
        int64_t samples = 0;
        for (size_t b = 0; b < data.size(); ++b) {
          const bool last = b + 1 == data.size();
          torch::Tensor x = data[b].to(model.device());
          samples += x.size(0);
          const std::vector<torch::Tensor> float_logp = LogProbs(OutputTensors(
              const_cast<torch::jit::Module&>(model.frozen()).forward({x})));
          std::vector<c10::IValue> values;
          if (base_run) values = base_run->RunValues({model.frozen()._ivalue(), x});
          int step = 0;
          for (size_t i = 0; i < layers.size(); ++i) {
            if (cancel != nullptr && cancel->IsCancelled()) return;
            if (!programs[i]) {
              step += static_cast<int>(options.bits.size());
              continue;
            }
            std::vector<c10::IValue> inputs;
            inputs.reserve(slices[i].inputs.size() + 1);
            for (Value* v : slices[i].inputs) {
              if (v->node()->kind() == c10::prim::Param) {
                inputs.push_back(v->offset() == 0 ? model.frozen()._ivalue()
                                                  : c10::IValue(x));
              } else {
                inputs.push_back(values.at(kept_index.at(v)));
              }
            }
            inputs.emplace_back();
            for (size_t j = 0; j < options.bits.size(); ++j) {
              inputs.back() = quantized[i][j];
              kl[i][j] += OutputsKl(
                  float_logp, LogProbs(OutputTensors(programs[i]->RunOutput(inputs))));
              ++step;
              if (progress) {
                progress({step, total, layers[i].name, options.bits[j],
                          last ? std::max(0.0, kl[i][j] / samples) : 0.0});
              }
            }
          }
        }
        for (size_t i = 0; i < layers.size(); ++i) {
          for (size_t j = 0; j < options.bits.size(); ++j) {
            // KL is >= 0; float rounding can leave -1e-8 for a layer that
            // changes nothing.
            table[i].omega[j] = std::max(0.0, kl[i][j] / static_cast<double>(samples));
          }
        }
      },
      absl::StatusCode::kInternal);
  ZQ_RETURN_IF_ERROR(status);
  ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "the sensitivity sweep"));
  return table;
}

}  // namespace zeroq::core
