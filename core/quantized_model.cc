#include "core/quantized_model.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/graph_util.h"
#include "core/outputs.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

using torch::jit::Node;
using torch::jit::Value;

// Values of a site the MSE range search looks at, over all calibration
// batches: enough for the mean squared error to three digits, and cheap.
constexpr int64_t kMseSample = int64_t{1} << 18;

bool IsActivationOp(const Node& n) {
  const auto k = n.kind();
  return k == c10::aten::relu || k == c10::aten::relu6 ||
         k == c10::aten::hardtanh;
}

std::string ShortOp(const Node& n) { return n.kind().toUnqualString(); }

// Inserts x_hat = (clamp(round(x * s - z), -2^(k-1), 2^(k-1)-1) + z) / s
// right after `v` is defined and routes v's selected uses through it.
// Returns the quantizer's first node (the mul).
Node* InsertFakeQuant(torch::jit::Graph& g, Value* v, bool all_uses,
                      const ActivationQuantization& q) {
  Node* insert_before = v->node()->kind() == c10::prim::Param
                            ? *g.block()->nodes().begin()
                            : v->node()->next();
  torch::jit::WithInsertPoint guard(insert_before);
  const double half = std::ldexp(1.0, q.bits - 1);
  Value* a = g.insert(c10::aten::mul, {v, q.scale});
  Value* b = g.insert(c10::aten::sub, {a, q.zero_point});
  Value* r = g.insert(c10::aten::round, {b});
  Value* c = g.insert(c10::aten::clamp, {r, -half, half - 1.0});
  Value* d = g.insert(c10::aten::add, {c, q.zero_point});
  Value* out = g.insert(c10::aten::div, {d, q.scale});
  std::vector<torch::jit::Use> uses = v->uses();
  for (const torch::jit::Use& u : uses) {
    if (u.user == a->node()) continue;
    if (all_uses || IsQuantizableOp(*u.user)) {
      u.user->replaceInput(u.offset, out);
    }
  }
  return a->node();
}

}  // namespace

absl::Status ValidateQuantOptions(const Model& model,
                                  const QuantOptions& options) {
  auto check_weight = [](int bits, absl::string_view what) -> absl::Status {
    if (kWeightBits.Contains(bits)) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        what, " = ", bits, ": weight widths are ", kWeightBits.Describe()));
  };
  ZQ_RETURN_IF_ERROR(check_weight(options.weight_bits, "weight_bits"));
  for (const auto& [name, bits] : options.layer_bits) {
    bool found = false;
    for (const QuantLayer& l : model.summary().layers) found |= l.name == name;
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer_bits names \"", name,
                       "\", which is not a quantizable layer of this model"));
    }
    ZQ_RETURN_IF_ERROR(
        check_weight(bits, absl::StrCat("layer_bits[", name, "]")));
  }
  if (!kActivationBits.Contains(options.activation_bits)) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation_bits = ", options.activation_bits,
                     ": activation widths are ", kActivationBits.Describe()));
  }
  if (!kActivationPercentile.Contains(options.activation_percentile)) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation_percentile = ", options.activation_percentile,
                     ": must be in ", kActivationPercentile.Describe()));
  }
  switch (options.activation_range) {
    case ActivationRange::kAuto:
    case ActivationRange::kPercentile:
      break;
    case ActivationRange::kMinMax:
    case ActivationRange::kMse:
      if (options.activation_percentile < 100.0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "activation_percentile = ", options.activation_percentile,
            ": only the percentile activation_range uses it"));
      }
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "activation_range = ", static_cast<int>(options.activation_range),
          ": must be ", kActivationRange.Describe()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<QuantizedModel>> QuantizedModel::Create(
    const Model& model, const QuantOptions& options,
    const std::vector<torch::Tensor>& calibration,
    const CalibrationProgressFn& progress, const CancellationToken* cancel) {
  // Both checks before the copy, so that bad input costs nothing.
  ZQ_RETURN_IF_ERROR(ValidateQuantOptions(model, options));
  if (options.activation_bits > 0 && calibration.empty()) {
    return absl::InvalidArgumentError(
        "activation quantization needs calibration batches");
  }
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<QuantizedModel> q,
                      QuantizeWeights(model, options));
  ZQ_RETURN_IF_ERROR(q->CalibrateActivations(calibration, progress, cancel));
  return q;
}

absl::StatusOr<std::unique_ptr<QuantizedModel>> QuantizedModel::QuantizeWeights(
    const Model& model, const QuantOptions& options) {
  ZQ_RETURN_IF_ERROR(ValidateQuantOptions(model, options));
  ZQ_ASSIGN_OR_RETURN(
      torch::jit::Module clone,
      CallTorch("copying the model", [&] { return model.frozen().clone(); }));
  std::unique_ptr<QuantizedModel> q(
      new QuantizedModel(std::move(clone), model.device(), options));
  torch::jit::Graph& g = q->graph();
  // Taken before any rewrite, so that the model's node indices point into
  // it; sites are found before the weight constants join the graph.
  const std::vector<Node*> nodes = Model::Nodes(g);
  q->FindSites(model, g, nodes);
  ZQ_RETURN_IF_ERROR(q->QuantizeLayerWeights(model, g, nodes));
  return q;
}

void QuantizedModel::FindSites(const Model& model, torch::jit::Graph& g,
                               const std::vector<Node*>& nodes) {
  if (options_.activation_bits <= 0) return;
  std::vector<PendingSite>& sites = pending_sites_;
  absl::flat_hash_set<Value*> taken;
  absl::flat_hash_map<std::string, int> seen;
  for (Node* n : nodes) {
    if (IsActivationOp(*n) && n->owningBlock() == g.block()) {
      PendingSite s;
      s.value = n->output();
      std::string base = ScopeName(*n);
      s.info.name = absl::StrCat(base.empty() ? "" : base + "/", ShortOp(*n));
      if (int c = ++seen[s.info.name]; c > 1)
        absl::StrAppend(&s.info.name, "#", c);
      s.info.after = n->kind().toQualString();
      taken.insert(s.value);
      sites.push_back(std::move(s));
    }
  }
  if (!options_.quantize_layer_inputs) return;
  for (const QuantLayer& layer : model.summary().layers) {
    Node* n = nodes.at(layer.node_index);
    Value* in = n->input(0);
    bool top = in->node()->kind() == c10::prim::Param ||
               in->node()->owningBlock() == g.block();
    if (!top || taken.count(in)) continue;
    taken.insert(in);
    PendingSite s;
    s.value = in;
    s.all_uses = false;
    s.info.name = absl::StrCat(layer.name, ":input");
    s.info.after = absl::StrCat("input of ", layer.name);
    sites.push_back(std::move(s));
  }
  // Graph order, so upstream sites are calibrated first.
  absl::flat_hash_map<const Node*, int> position;
  for (int i = 0; i < static_cast<int>(nodes.size()); ++i)
    position[nodes[i]] = i;
  auto pos = [&](const PendingSite& s) {
    auto it = position.find(s.value->node());
    return it == position.end() ? -1 : it->second;
  };
  std::stable_sort(sites.begin(), sites.end(),
                   [&](const PendingSite& a, const PendingSite& b) {
                     return pos(a) < pos(b);
                   });
}

absl::Status QuantizedModel::QuantizeLayerWeights(
    const Model& model, torch::jit::Graph& g, const std::vector<Node*>& nodes) {
  for (const QuantLayer& layer : model.summary().layers) {
    auto it = options_.layer_bits.find(layer.name);
    const int bits =
        it != options_.layer_bits.end() ? it->second : options_.weight_bits;
    LayerQuantInfo info;
    info.name = layer.name;
    info.bits = bits;
    info.params = layer.params;
    Node* n = nodes.at(layer.node_index);
    layer_nodes_.push_back(n);
    if (bits > 0) {
      const at::Tensor w = torch::jit::toIValue(n->input(1))->toTensor();
      ZQ_ASSIGN_OR_RETURN(WeightQuantization wq, QuantizeWeight(w, bits));
      ZQ_RETURN_IF_ERROR(CallTorch(
          "inserting quantized weights",
          [&] {
            torch::jit::WithInsertPoint guard(n);
            n->replaceInput(1, g.insertConstant(wq.dequantized));
          },
          absl::StatusCode::kInternal));
      info.scale = wq.scale.cpu();
      info.zero_point = wq.zero_point.cpu();
      info.rounding = "nearest";
    }
    layers_.push_back(std::move(info));
  }
  return absl::OkStatus();
}

absl::Status QuantizedModel::CalibrateActivations(
    const std::vector<torch::Tensor>& calibration,
    const CalibrationProgressFn& progress, const CancellationToken* cancel) {
  if (calibrated_) {
    return absl::FailedPreconditionError(
        "the activations are already calibrated");
  }
  if (options_.activation_bits > 0 && calibration.empty()) {
    return absl::InvalidArgumentError(
        "activation quantization needs calibration batches");
  }
  // Once: a second pass would quantize the sites done so far twice.
  calibrated_ = true;
  for (size_t i = 0; i < pending_sites_.size(); ++i) {
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "calibration"));
    PendingSite& site = pending_sites_[i];
    ZQ_RETURN_IF_ERROR(CalibrateSite(i, site, calibration));
    sites_.push_back(site.info);
    site_nodes_.push_back(site.quant_node);
    if (progress) {
      progress({static_cast<int>(i + 1),
                static_cast<int>(pending_sites_.size()), site.info.name});
    }
  }
  pending_sites_.clear();
  return absl::OkStatus();
}

absl::Status QuantizedModel::CalibrateSite(
    size_t i, PendingSite& site,
    const std::vector<torch::Tensor>& calibration) {
  torch::jit::Graph& g = graph();
  const ActivationRange method = ResolvedActivationRange(options_);
  const double pct = options_.activation_percentile;
  const int bits = options_.activation_bits;
  return CallTorch(
      absl::StrCat("calibrating ", site.info.name),
      [&] {
        torch::NoGradGuard no_grad;
        GraphProgram probe(ProbeGraph(g, std::vector<Value*>{site.value}),
                           self());
        double lo = std::numeric_limits<double>::infinity();
        double hi = -lo;
        // Percentile: every value. MSE: a seeded sample of each batch's
        // values, at most kMseSample in all (the search costs 100 passes).
        std::vector<torch::Tensor> kept;
        const int64_t per_batch = std::max<int64_t>(
            1, kMseSample / static_cast<int64_t>(calibration.size()));
        auto gen = at::make_generator<at::CPUGeneratorImpl>(i);
        for (const torch::Tensor& batch : calibration) {
          torch::Tensor a = probe.Run(batch.to(device_))[0].detach();
          lo = std::min(lo, a.min().item<double>());
          hi = std::max(hi, a.max().item<double>());
          if (method == ActivationRange::kPercentile && pct < 100.0) {
            kept.push_back(a.flatten().to(torch::kFloat));
          } else if (method == ActivationRange::kMse) {
            torch::Tensor flat = a.flatten().to(torch::kFloat);
            if (flat.numel() > per_batch) {
              torch::Tensor pick = torch::randint(flat.numel(), {per_batch},
                                                  gen, torch::kLong);
              flat = flat.index_select(0, pick.to(flat.device()));
            }
            kept.push_back(flat);
          }
        }
        absl::StatusOr<ActivationQuantization> params;
        if (method == ActivationRange::kMse) {
          params = MseActivationParams(torch::cat(kept), lo, hi, bits);
          site.info.range = "mse";
        } else if (!kept.empty()) {
          torch::Tensor v = torch::cat(kept);
          const int64_t n = v.numel();
          auto kth = [&](double p) {
            int64_t k = std::clamp<int64_t>(
                static_cast<int64_t>(std::llround(p / 100.0 * (n - 1))) + 1, 1,
                n);
            return std::get<0>(v.kthvalue(k)).item<double>();
          };
          params = ActivationParams(kth(100.0 - pct), kth(pct), bits);
          site.info.range = absl::StrCat("percentile ", pct);
        } else {
          params = ActivationParams(lo, hi, bits);
          site.info.range = "minmax";
        }
        if (!params.ok())
          throw std::runtime_error(std::string(params.status().message()));
        site.info.quant = *params;
        site.quant_node =
            InsertFakeQuant(g, site.value, site.all_uses, site.info.quant);
      },
      absl::StatusCode::kInternal);
}

absl::StatusOr<std::vector<torch::Tensor>> QuantizedModel::Forward(
    const torch::Tensor& input) {
  ran_ = true;
  return CallTorch("quantized forward", [&] {
    torch::NoGradGuard no_grad;
    return OutputTensors(module_.forward({input.to(device_)}));
  });
}

absl::Status QuantizedModel::Save(const std::string& path) const {
  // Saved with every tensor on the CPU, whatever device the job ran on: the
  // frozen weights are graph constants, and constants saved on a CUDA device
  // cannot be read by torch.jit.load on a machine without one. A round trip
  // through a load with the CPU as map location moves parameters, buffers
  // and constants alike; users pick their device with map_location.
  return CallTorch(
      absl::StrCat("saving ", path),
      [&] {
        std::stringstream archive;
        module_.save(archive);
        torch::jit::load(archive, torch::kCPU).save(path);
      },
      absl::StatusCode::kInternal);
}

torch::jit::Graph& QuantizedModel::graph() const {
  return *torch::jit::toGraphFunction(module_.get_method("forward").function())
              .graph();
}

absl::Status QuantizedModel::SetLearnedWeight(size_t i,
                                              const torch::Tensor& dequantized,
                                              const torch::Tensor& q,
                                              const torch::Tensor& scale,
                                              const torch::Tensor& zero_point,
                                              const std::string& rounding) {
  if (ran_) {
    return absl::FailedPreconditionError(
        "weights can only be replaced before the first quantized forward");
  }
  if (i >= layers_.size() || layers_[i].bits == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", i, " has no quantized weights"));
  }
  Node* n = layer_nodes_[i];
  const at::Tensor old = torch::jit::toIValue(n->input(1))->toTensor();
  if (old.sizes() != dequantized.sizes() || old.sizes() != q.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "new weights for ", layers_[i].name, " have the wrong shape"));
  }
  return CallTorch(
      absl::StrCat("replacing the weights of ", layers_[i].name),
      [&] {
        torch::jit::Graph& g = *n->owningGraph();
        torch::jit::WithInsertPoint guard(n);
        Value* before = n->input(1);
        n->replaceInput(1, g.insertConstant(dequantized.detach().to(
                               old.device(), old.scalar_type())));
        if (!before->hasUses()) before->node()->destroy();
        layers_[i].learned_q = q.detach().to(torch::kCPU, torch::kInt);
        layers_[i].scale = scale.detach().to(torch::kCPU, torch::kFloat).flatten();
        layers_[i].zero_point =
            zero_point.detach().to(torch::kCPU, torch::kFloat).flatten();
        layers_[i].rounding = rounding;
      },
      absl::StatusCode::kInternal);
}

absl::Status QuantizedModel::SetConstantInput(Node* node, size_t input,
                                              const torch::Tensor& value) {
  if (ran_) {
    return absl::FailedPreconditionError(
        "constants can only be replaced before the first quantized forward");
  }
  if (node == nullptr || input >= node->inputs().size()) {
    return absl::InvalidArgumentError("no such node input");
  }
  return CallTorch(
      "replacing a constant",
      [&] {
        torch::jit::WithInsertPoint guard(node);
        Value* before = node->input(input);
        node->replaceInput(input,
                           node->owningGraph()->insertConstant(value.detach()));
        if (!before->hasUses() && before->node()->kind() == c10::prim::Constant)
          before->node()->destroy();
      },
      absl::StatusCode::kInternal);
}

absl::Status QuantizedModel::SetActivationScale(size_t site, double scale) {
  if (ran_) {
    return absl::FailedPreconditionError(
        "constants can only be replaced before the first quantized forward");
  }
  if (site >= sites_.size() || site_nodes_[site] == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation site ", site, " has no quantizer"));
  }
  if (!(scale > 0) || !std::isfinite(scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation scale ", scale, " is not positive"));
  }
  return CallTorch(
      absl::StrCat("rescaling ", sites_[site].name),
      [&] {
        // mul, sub, round, clamp, add, div: the scale is the mul's and the
        // div's second input.
        Node* mul = site_nodes_[site];
        Node* div = mul;
        for (int k = 0; k < 5; ++k) div = div->output()->uses().at(0).user;
        if (mul->kind() != c10::aten::mul || div->kind() != c10::aten::div) {
          throw std::runtime_error("the activation quantizer was rewritten");
        }
        torch::jit::Graph& g = *mul->owningGraph();
        for (Node* n : {mul, div}) {
          torch::jit::WithInsertPoint guard(n);
          Value* before = n->input(1);
          n->replaceInput(1, g.insertConstant(scale));
          if (!before->hasUses() && before->node()->kind() == c10::prim::Constant)
            before->node()->destroy();
        }
        // The same integer grid, stretched: the range it represents.
        ActivationQuantization& q = sites_[site].quant;
        const double half = std::ldexp(1.0, q.bits - 1);
        q.scale = scale;
        q.lo = (-half + q.zero_point) / scale;
        q.hi = (half - 1.0 + q.zero_point) / scale;
      },
      absl::StatusCode::kInternal);
}

double QuantizedModel::weight_bytes() const {
  double bits = 0;
  for (const LayerQuantInfo& l : layers_) {
    bits += static_cast<double>(l.params) * (l.bits > 0 ? l.bits : 32);
  }
  return bits / 8.0;
}

}  // namespace zeroq::core
