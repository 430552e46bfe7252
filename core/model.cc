#include "core/model.h"

#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/freeze_module.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/passes/remove_mutation.h>

#include <map>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "core/cuda_runtime.h"
#include "core/outputs.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

using torch::jit::Node;
using torch::jit::Value;

// Module path names of every parameter and buffer, by storage address.
// Freezing turns them into graph constants that share the same storage.
std::map<const void*, std::string> TensorNames(const torch::jit::Module& m) {
  std::map<const void*, std::string> names;
  for (const auto& p : m.named_parameters(/*recurse=*/true)) {
    names.emplace(p.value.data_ptr(), p.name);
  }
  for (const auto& b : m.named_buffers(/*recurse=*/true)) {
    if (b.value.defined() && b.value.numel() > 0) {
      names.emplace(b.value.data_ptr(), b.name);
    }
  }
  return names;
}

}  // namespace

std::string ScopeName(const Node& node) {
  if (!node.callstack()) return "";
  std::vector<std::string> parts;
  for (const auto& entry : (*node.callstack())->vec()) {
    const auto& info = std::get<2>(entry);
    if (info && info->instance_name() != "SELF") {
      parts.push_back(info->instance_name());
    }
  }
  return absl::StrJoin(parts, ".");
}

namespace {

std::string StripSuffix(const std::string& s, absl::string_view suffix) {
  if (absl::EndsWith(s, suffix)) return s.substr(0, s.size() - suffix.size());
  return s;
}

// Name of the module owning a node whose weight is input `index`.
std::string OwnerName(const Node& node, size_t index,
                      const std::map<const void*, std::string>& names) {
  if (index < node.inputs().size()) {
    const Node* w = node.input(index)->node();
    if (w->kind() == c10::prim::Constant && w->hasAttribute(c10::attr::value) &&
        w->kindOf(c10::attr::value) == torch::jit::AttributeKind::t) {
      const at::Tensor& t = w->t(c10::attr::value);
      auto it = names.find(t.data_ptr());
      if (it != names.end()) {
        size_t dot = it->second.rfind('.');
        return dot == std::string::npos ? it->second
                                        : it->second.substr(0, dot);
      }
    }
  }
  return ScopeName(node);
}

const at::Tensor* ConstantTensor(const Value* v) {
  const Node* n = v->node();
  if (n->kind() != c10::prim::Constant || !n->hasAttribute(c10::attr::value) ||
      n->kindOf(c10::attr::value) != torch::jit::AttributeKind::t) {
    return nullptr;
  }
  return &n->t(c10::attr::value);
}

std::string UniqueName(std::string name,
                       absl::flat_hash_map<std::string, int>& seen) {
  if (name.empty()) name = "layer";
  int& count = seen[name];
  ++count;
  return count == 1 ? name : absl::StrCat(name, "#", count);
}

absl::Status CheckForwardSchema(const torch::jit::Module& module) {
  auto method = module.find_method("forward");
  if (!method) {
    return absl::InvalidArgumentError(
        "the TorchScript module has no forward method; script the model "
        "(torch.jit.script) with a forward(self, x: Tensor) that returns "
        "tensors");
  }
  const c10::FunctionSchema& schema = method->function().getSchema();
  const auto& args = schema.arguments();
  bool one_tensor =
      args.size() == 2 && args[1].type()->kind() == c10::TypeKind::TensorType;
  if (!one_tensor) {
    std::ostringstream s;
    s << schema;
    return absl::InvalidArgumentError(absl::StrCat(
        "forward must take exactly one tensor (an input batch); it is ",
        s.str()));
  }
  const auto& rets = schema.returns();
  if (rets.size() != 1 || !IsTensorOutputType(rets[0].type())) {
    std::ostringstream s;
    s << schema;
    return absl::InvalidArgumentError(absl::StrCat(
        "forward must return tensors: one tensor (the logits), or a tuple, "
        "NamedTuple, list or dict of tensors; it is ", s.str()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Model>> LoadImpl(
    const std::function<torch::jit::Module(const torch::Device&)>& load,
    const std::string& device_name);

// Rewrites `l = [a]; ...; l.append(b); ...` (DenseNet's feature list) at the
// top level into fresh lists, `l2 = [a, b]`, used from the append on. LibTorch's
// RemoveListMutation leaves these when the list is read between appends.
// Values then never change after they are defined, which graph slicing and
// probes (that return values from the end of a run) rely on.
void FunctionalizeListAppends(torch::jit::Graph& g) {
  absl::flat_hash_map<Value*, std::vector<Value*>> elements;
  std::vector<Node*> top(g.block()->nodes().begin(), g.block()->nodes().end());
  for (Node* n : top) {
    if (n->kind() == c10::prim::ListConstruct) {
      elements[n->output()] = std::vector<Value*>(n->inputs().begin(),
                                                  n->inputs().end());
      continue;
    }
    if (n->kind() != c10::aten::append || n->inputs().size() != 2) continue;
    Value* list = n->input(0);
    auto it = elements.find(list);
    if (it == elements.end()) continue;
    std::vector<Value*> items = it->second;
    items.push_back(n->input(1));
    torch::jit::WithInsertPoint guard(n);
    Node* fresh = g.insertNode(g.createList(
        list->type()->expectRef<c10::ListType>().getElementType(), items));
    list->replaceAllUsesAfterNodeWith(n, fresh->output());
    n->output()->replaceAllUsesWith(fresh->output());
    n->destroy();
    elements[fresh->output()] = std::move(items);
  }
}

}  // namespace

bool HasMutation(const torch::jit::Graph& graph) {
  bool found = false;
  std::function<void(const torch::jit::Block*)> walk =
      [&](const torch::jit::Block* b) {
        for (const Node* n : b->nodes()) {
          const std::string op = n->kind().toUnqualString();
          if (n->kind().is_aten() &&
              ((op.size() > 1 && op.back() == '_' && op.find("__") == std::string::npos) ||
               op == "append" || op == "extend" || op == "insert" ||
               op == "_set_item" || op == "pop" || op == "clear" ||
               op == "remove" || op == "reverse" || op == "sort")) {
            found = true;
          }
          for (const torch::jit::Block* sub : n->blocks()) walk(sub);
        }
      };
  walk(graph.block());
  return found;
}

bool IsQuantizableOp(const Node& node) {
  const auto k = node.kind();
  if (k == c10::aten::conv1d || k == c10::aten::conv2d ||
      k == c10::aten::conv3d || k == c10::aten::linear) {
    return true;
  }
  if (k == c10::aten::_convolution && node.inputs().size() > 6) {
    // Transposed convolutions stay in float.
    auto transposed = torch::jit::toIValue(node.input(6));
    return transposed && transposed->isBool() && !transposed->toBool();
  }
  return false;
}

std::vector<Node*> Model::Nodes(torch::jit::Graph& graph) {
  std::vector<Node*> out;
  std::function<void(torch::jit::Block*)> walk = [&](torch::jit::Block* b) {
    for (Node* n : b->nodes()) {
      out.push_back(n);
      for (torch::jit::Block* sub : n->blocks()) walk(sub);
    }
  };
  walk(graph.block());
  return out;
}

std::shared_ptr<torch::jit::Graph> Model::graph() const {
  return torch::jit::toGraphFunction(frozen_.get_method("forward").function())
      .graph();
}

absl::StatusOr<std::unique_ptr<Model>> Model::LoadFromFile(
    const std::string& path, const std::string& device) {
  return LoadImpl(
      [&](const torch::Device& d) { return torch::jit::load(path, d); },
      device);
}

absl::StatusOr<std::unique_ptr<Model>> Model::LoadFromBytes(
    absl::string_view bytes, const std::string& device) {
  return LoadImpl(
      [&](const torch::Device& d) {
        std::istringstream in{std::string(bytes)};
        return torch::jit::load(in, d);
      },
      device);
}

namespace {
absl::StatusOr<std::unique_ptr<Model>> LoadImpl(
    const std::function<torch::jit::Module(const torch::Device&)>& load,
    const std::string& device_name) {
  ZQ_ASSIGN_OR_RETURN(torch::Device device, ResolveDevice(device_name));
  ZQ_ASSIGN_OR_RETURN(
      torch::jit::Module module,
      CallTorch("not a loadable TorchScript archive (save it with "
                "torch.jit.script(model).save(path))",
                [&] { return load(device); }));
  ZQ_RETURN_IF_ERROR(CheckForwardSchema(module));
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                      Model::FromModule(std::move(module), device));
  return model;
}
}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::FromModule(
    torch::jit::Module module, torch::Device device) {
  std::map<const void*, std::string> names = TensorNames(module);
  ZQ_ASSIGN_OR_RETURN(
      torch::jit::Module frozen, CallTorch("freezing the model", [&] {
        module.eval();
        torch::jit::Module f = torch::jit::freeze_module(module);
        auto g = torch::jit::toGraphFunction(f.get_method("forward").function())
                     .graph();
        torch::jit::Inline(*g);
        torch::jit::RemoveListMutation(g);
        torch::jit::RemoveTensorMutation(g);
        torch::jit::InplaceToFunctionalActivation(g);
        torch::jit::ConstantPropagation(g);
        // After constant propagation removed the branches that hid where
        // the lists come from.
        FunctionalizeListAppends(*g);
        torch::jit::EliminateDeadCode(g);
        return f;
      }));
  std::unique_ptr<Model> model(new Model(std::move(frozen), device));
  model->names_ = std::move(names);
  ZQ_RETURN_IF_ERROR(model->Analyse());
  return model;
}

absl::Status Model::Analyse() {
  std::shared_ptr<torch::jit::Graph> g = graph();
  std::vector<Node*> nodes = Nodes(*g);
  absl::flat_hash_map<const Node*, int> layer_of;
  absl::flat_hash_map<std::string, int> seen_layers, seen_bns;
  for (int i = 0; i < static_cast<int>(nodes.size()); ++i) {
    Node* n = nodes[i];
    if (n->kind() == c10::prim::Constant) {
      if (const at::Tensor* t = ConstantTensor(n->output())) {
        summary_.total_params += t->numel();
      }
      continue;
    }
    if (IsQuantizableOp(*n)) {
      const at::Tensor* w = ConstantTensor(n->input(1));
      if (w == nullptr) continue;  // weight computed at run time: left float
      QuantLayer layer;
      layer.name = UniqueName(OwnerName(*n, 1, names_), seen_layers);
      layer.kind = n->kind() == c10::aten::linear ? LayerKind::kLinear
                                                  : LayerKind::kConv;
      layer.op = n->kind().toQualString();
      layer.weight_shape = w->sizes().vec();
      layer.params = w->numel();
      layer.node_index = i;
      layer_of[n] = static_cast<int>(summary_.layers.size());
      summary_.quantizable_params += layer.params;
      summary_.layers.push_back(std::move(layer));
    } else if (n->kind() == c10::aten::batch_norm) {
      BnLayer bn;
      // The affine weight may be None; the running mean never is in eval.
      bool has_weight = ConstantTensor(n->input(1)) != nullptr;
      bn.name = UniqueName(OwnerName(*n, has_weight ? 1 : 3, names_), seen_bns);
      const at::Tensor* mean = ConstantTensor(n->input(3));
      const at::Tensor* var = ConstantTensor(n->input(4));
      if (mean == nullptr || var == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "BatchNorm ", bn.name,
            " has no stored running statistics (track_running_stats=False?); "
            "ZeroQ distills data from them"));
      }
      if (n->owningBlock() != g->block()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "BatchNorm ", bn.name,
            " is inside control flow (an if or a loop) that freezing could "
            "not remove; ZeroQ needs every BatchNorm at the top level"));
      }
      bn.channels = mean->numel();
      const Node* producer = n->input(0)->node();
      auto it = layer_of.find(producer);
      if (it != layer_of.end()) {
        bn.input_from = summary_.layers[it->second].name;
        if (summary_.layers[it->second].bn.empty()) {
          summary_.layers[it->second].bn = bn.name;
        }
      } else {
        bn.input_from = producer->kind().toQualString();
      }
      bn.node_index = i;
      summary_.bn_layers.push_back(std::move(bn));
    }
  }
  if (summary_.bn_layers.empty()) {
    return absl::FailedPreconditionError(
        "the model has no BatchNorm layers: ZeroQ distills its calibration "
        "data from BatchNorm statistics, so it cannot quantize this model "
        "without data");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<torch::Tensor>> Model::Forward(
    const torch::Tensor& input) const {
  return CallTorch("the model rejected the input", [&] {
    torch::NoGradGuard no_grad;
    return OutputTensors(frozen_.forward({input.to(device_)}));
  });
}

absl::Status Model::CheckInputShape(const std::vector<int64_t>& shape) const {
  for (int64_t d : shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("input shape [", absl::StrJoin(shape, ","),
                       "] must have positive sizes"));
    }
  }
  torch::Tensor x = torch::zeros(shape, torch::TensorOptions().device(device_));
  absl::StatusOr<std::vector<torch::Tensor>> out = Forward(x);
  if (!out.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("input shape [", absl::StrJoin(shape, ","),
                     "] is rejected by the model: ", out.status().message()));
  }
  return absl::OkStatus();
}

}  // namespace zeroq::core
