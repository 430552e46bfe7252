#include "core/reconstruct.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/graph_util.h"
#include "core/outputs.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

using torch::jit::Node;
using torch::jit::Value;

// Runs `node` on `stack_inputs` substituted for its first inputs; every
// other input must be a graph constant (frozen weights, strides, ...).
torch::Tensor RunNode(Node* node, std::vector<c10::IValue> stack_inputs) {
  torch::jit::Stack stack = std::move(stack_inputs);
  for (size_t k = stack.size(); k < node->inputs().size(); ++k) {
    std::optional<c10::IValue> v = torch::jit::toIValue(node->input(k));
    if (!v.has_value()) {
      throw std::runtime_error(absl::StrCat(
          "input ", k, " of ", node->kind().toQualString(), " is not constant"));
    }
    stack.push_back(std::move(*v));
  }
  node->getOperation()(stack);
  return stack.back().toTensor();
}

// The BatchNorm node that alone consumes a layer's output, or nullptr.
Node* ConsumingBatchNorm(Node* layer) {
  Value* out = layer->output();
  if (out->uses().size() != 1) return nullptr;
  Node* user = out->uses()[0].user;
  if (user->kind() != c10::aten::batch_norm || user->input(0) != out) return nullptr;
  return user;
}

// One layer (and its BatchNorm) as a function of its input and weight.
struct LayerFn {
  Node* layer = nullptr;
  Node* bn = nullptr;
  torch::Tensor operator()(const torch::Tensor& x, const torch::Tensor& w) const {
    torch::Tensor y = RunNode(layer, {x, w});
    return bn ? RunNode(bn, {y}) : y;
  }
};

// Squared error summed over channels (dimension 1), mean over the rest: the
// loss AdaRound's reference code reconstructs with.
torch::Tensor OutputError(const torch::Tensor& y, const torch::Tensor& target) {
  torch::Tensor d = (y - target).pow(2);
  return d.dim() > 1 ? d.sum(1).mean() : d.mean();
}

// Runs `program` on every batch and concatenates each output over batches.
std::vector<torch::Tensor> Collect(GraphProgram& program,
                                   const std::vector<torch::Tensor>& batches,
                                   const torch::Device& device) {
  std::vector<std::vector<torch::Tensor>> parts;
  for (const torch::Tensor& b : batches) {
    std::vector<torch::Tensor> out = program.Run(b.to(device));
    if (parts.empty()) parts.resize(out.size());
    for (size_t k = 0; k < out.size(); ++k) parts[k].push_back(out[k].detach());
  }
  std::vector<torch::Tensor> all;
  for (auto& p : parts) all.push_back(torch::cat(p));
  return all;
}

// Per output channel, the clipping range [a * min, a * max] (a on a grid of
// `candidates` fractions) with the least squared weight error at `bits`:
// the scale and zero point of quantizer.h for it.
std::pair<torch::Tensor, torch::Tensor> MseWeightParams(const torch::Tensor& weight,
                                                        int bits, int candidates = 100) {
  const int64_t channels = weight.size(0);
  const torch::Tensor w = weight.reshape({channels, -1});
  const torch::Tensor lo = std::get<0>(w.min(1)).clamp_max(0.0).unsqueeze(1);
  const torch::Tensor hi = std::get<0>(w.max(1)).clamp_min(0.0).unsqueeze(1);
  const double n = std::ldexp(1.0, bits) - 1.0, half = std::ldexp(1.0, bits - 1);
  torch::Tensor best_err, best_scale, best_zp;
  for (int c = candidates; c >= 1; --c) {
    const double a = static_cast<double>(c) / candidates;
    torch::Tensor scale = n / (a * (hi - lo)).clamp_min(1e-8);
    torch::Tensor zp = torch::round(scale * a * lo) + half;
    torch::Tensor q = torch::clamp(torch::round(scale * w - zp), -half, half - 1.0);
    torch::Tensor err = ((q + zp) / scale - w).pow(2).sum(1, /*keepdim=*/true);
    if (!best_err.defined()) {
      best_err = err, best_scale = scale, best_zp = zp;
      continue;
    }
    torch::Tensor better = err < best_err;
    best_err = torch::where(better, err, best_err);
    best_scale = torch::where(better, scale, best_scale);
    best_zp = torch::where(better, zp, best_zp);
  }
  return {best_scale.flatten(), best_zp.flatten()};
}

torch::Tensor RectifiedSigmoid(const torch::Tensor& v) {
  return torch::clamp(torch::sigmoid(v) * 1.2 - 0.1, 0.0, 1.0);
}

// The regulariser's exponent at `step`: none during the warm-up (0), then
// falling linearly from beta_start to beta_end.
double Beta(const ReconstructOptions& o, int step) {
  const int warmup = static_cast<int>(o.warmup * o.iterations);
  if (step < warmup) return 0;
  const double t = static_cast<double>(step - warmup) / std::max(1, o.iterations - warmup);
  return o.beta_end + (o.beta_start - o.beta_end) * (1.0 - t);
}

// One layer's learned rounding: w_hat = (clamp(base + h(v), lo, hi) + z) / s.
struct Rounding {
  torch::Tensor scale, zero_point;  // [channels], as the recipe keeps them
  torch::Tensor s, z, base, t, v;   // broadcast over the weight
  double lo = 0, hi = 0;

  Rounding(const torch::Tensor& w, torch::Tensor scale_c, torch::Tensor zp_c, int bits,
           bool mse_range) {
    if (mse_range) std::tie(scale_c, zp_c) = MseWeightParams(w, bits);
    scale = scale_c;
    zero_point = zp_c;
    std::vector<int64_t> view(w.dim(), 1);
    view[0] = -1;
    s = scale_c.to(w.device(), w.scalar_type()).view(view);
    z = zp_c.to(w.device(), w.scalar_type()).view(view);
    lo = -std::ldexp(1.0, bits - 1);
    hi = std::ldexp(1.0, bits - 1) - 1;
    t = w * s - z;
    base = torch::floor(t);
    // h(v) starts at the fractional part: sigmoid(v) = (rest + 0.1) / 1.2.
    const torch::Tensor rest = (t - base).clamp(0.0, 1.0);
    v = torch::logit((rest + 0.1) / 1.2, 1e-6).detach().requires_grad_(true);
  }
  torch::Tensor Soft() const { return (torch::clamp(base + RectifiedSigmoid(v), lo, hi) + z) / s; }
  torch::Tensor Regulariser(double beta) const {
    return (1 - (2 * RectifiedSigmoid(v) - 1).abs().pow(beta)).sum();
  }
  torch::Tensor HardQ() const { return torch::clamp(base + (v >= 0).to(t.scalar_type()), lo, hi); }
  torch::Tensor Dequantize(const torch::Tensor& q) const { return (q + z) / s; }
  double Flipped(const torch::Tensor& q) const {
    return torch::ne(q, torch::clamp(torch::round(t), lo, hi)).to(torch::kDouble).mean().item<double>();
  }
};

// Rows `idx` of x, or x itself when idx is undefined.
torch::Tensor Rows(const torch::Tensor& x, const torch::Tensor& idx) {
  return idx.defined() ? x.index_select(0, idx) : x;
}

// Per step: `batch` random samples of n (undefined: all of them).
torch::Tensor SampleRows(int64_t n, int64_t batch, at::Generator& gen, const torch::Device& device) {
  if (batch >= n) return {};
  return torch::randperm(n, gen, torch::kLong).slice(0, 0, batch).to(device);
}

// Each element of `quantized` replaced by `float_value` with probability p.
torch::Tensor Drop(const torch::Tensor& quantized, const torch::Tensor& float_value, double p,
                   at::Generator& gen) {
  if (p <= 0) return quantized;
  torch::Tensor pick =
      torch::rand(quantized.sizes(), gen, torch::TensorOptions().dtype(quantized.scalar_type()))
          .to(quantized.device()) < p;
  return torch::where(pick, float_value, quantized);
}

struct LayerOutcome {
  ReconstructProgress progress;
  torch::Tensor dequantized, q;  // undefined: keep round-to-nearest
  torch::Tensor scale, zero_point;
  torch::Tensor shift;           // per output channel; undefined: none
};

// AdaRound for one layer; x_q/x_f are its quantized and float inputs and
// target the float output, all over every calibration sample.
LayerOutcome LearnRounding(const LayerFn& fn, const torch::Tensor& w,
                           const torch::Tensor& scale_c, const torch::Tensor& zp_c, int bits,
                           int channel_dim, const torch::Tensor& w_nearest,
                           const torch::Tensor& x_q, const torch::Tensor& x_f,
                           const torch::Tensor& target, const ReconstructOptions& o,
                           at::Generator& gen, const CancellationToken* cancel) {
  Rounding r(w, scale_c, zp_c, bits, o.weight_range_mse);
  LayerOutcome out;
  {
    torch::NoGradGuard no_grad;
    out.progress.loss_before = OutputError(fn(x_q, w_nearest), target).item<double>();
  }
  const int64_t channels = w.size(0);
  torch::Tensor shift = torch::zeros({channels}, w.options()).requires_grad_(o.learn_shift);
  auto shifted = [&](torch::Tensor y) {
    if (!o.learn_shift) return y;
    std::vector<int64_t> sv(y.dim(), 1);
    sv[channel_dim < 0 ? y.dim() + channel_dim : channel_dim] = channels;
    return y + shift.view(sv);
  };
  std::vector<torch::Tensor> params = {r.v};
  if (o.learn_shift) params.push_back(shift);
  torch::optim::Adam adam(params, torch::optim::AdamOptions(o.lr));
  for (int step = 0; step < o.iterations; ++step) {
    if (step % 32 == 0 && cancel != nullptr && cancel->IsCancelled()) break;
    const torch::Tensor idx = SampleRows(x_q.size(0), o.batch_size, gen, x_q.device());
    const torch::Tensor x = Drop(Rows(x_q, idx), Rows(x_f, idx), o.drop_probability, gen);
    torch::Tensor loss = OutputError(shifted(fn(x, r.Soft())), Rows(target, idx));
    if (const double beta = Beta(o, step); beta > 0) loss = loss + o.reg_weight * r.Regulariser(beta);
    adam.zero_grad();
    loss.backward();
    adam.step();
  }

  torch::NoGradGuard no_grad;
  const torch::Tensor q = r.HardQ();
  const torch::Tensor deq = r.Dequantize(q);
  out.progress.loss_after = OutputError(shifted(fn(x_q, deq)), target).item<double>();
  out.progress.flipped = r.Flipped(q);
  // Learned rounding is kept only where it reconstructs the calibration
  // outputs better than rounding to nearest.
  if (out.progress.loss_after < out.progress.loss_before) {
    out.dequantized = deq;
    out.q = q;
    out.scale = r.scale;
    out.zero_point = r.zero_point;
    if (o.learn_shift) out.shift = shift.detach();
  } else {
    out.progress.loss_after = out.progress.loss_before;
    out.progress.flipped = 0;
  }
  return out;
}

// ---- Blocks -------------------------------------------------------------

// An activation quantizer as QuantizedModel inserts it: mul, sub, round,
// clamp, add, div, from `in` to `out`.
struct FakeQuant {
  Value* in = nullptr;
  Value* out = nullptr;
  std::vector<Node*> nodes;
  double scale = 1, zero_point = 0, lo = 0, hi = 0;
};

Node* OnlyUser(Value* v, c10::Symbol kind) {
  if (v->uses().size() != 1 || v->uses()[0].user->kind() != kind) return nullptr;
  return v->uses()[0].user;
}

double ConstantNumber(Value* v) { return torch::jit::toIValue(v)->toScalar().toDouble(); }

std::vector<FakeQuant> FindFakeQuants(torch::jit::Block& block) {
  std::vector<FakeQuant> out;
  for (Node* round : block.nodes()) {
    if (round->kind() != c10::aten::round) continue;
    Node* sub = round->input(0)->node();
    if (sub->kind() != c10::aten::sub) continue;
    Node* mul = sub->input(0)->node();
    if (mul->kind() != c10::aten::mul) continue;
    Node* clamp = OnlyUser(round->output(), c10::aten::clamp);
    Node* add = clamp ? OnlyUser(clamp->output(), c10::aten::add) : nullptr;
    Node* div = add ? OnlyUser(add->output(), c10::aten::div) : nullptr;
    if (!div || !OnlyUser(mul->output(), c10::aten::sub) || !OnlyUser(sub->output(), c10::aten::round)) continue;
    FakeQuant f;
    f.in = mul->input(0);
    f.out = div->output();
    f.nodes = {mul, sub, round, clamp, add, div};
    f.scale = ConstantNumber(mul->input(1));
    f.zero_point = ConstantNumber(sub->input(1));
    f.lo = ConstantNumber(clamp->input(1));
    f.hi = ConstantNumber(clamp->input(2));
    out.push_back(f);
  }
  return out;
}

// A run of top-level nodes whose only live value at each end is one tensor.
struct Segment {
  std::vector<Node*> nodes;
  Value* in = nullptr;
  Value* out = nullptr;        // nullptr: the graph's outputs (the tail)
  std::vector<size_t> layers;  // indices of QuantizedModel::layers()
};

// Cuts the top level of `g` into segments that end right after an
// activation quantizer (or an activation, without quantizers) where nothing
// else is live: in a ResNet, the stem and each residual block. Segments
// without a quantized layer join the next one.
std::vector<Segment> Segments(torch::jit::Graph& g, const std::vector<FakeQuant>& fqs,
                              const absl::flat_hash_map<Node*, size_t>& layer_of) {
  std::vector<Node*> top;
  for (Node* n : g.block()->nodes()) {
    if (n->kind() != c10::prim::Constant) top.push_back(n);
  }
  absl::flat_hash_map<Node*, int> pos;
  for (int p = 0; p < static_cast<int>(top.size()); ++p) pos[top[p]] = p;
  const int end = static_cast<int>(top.size());
  // live[p]: values defined before top[p] and used at or after it.
  std::vector<std::vector<Value*>> live(end + 1);
  auto add_value = [&](Value* v, int def) {
    int last = -1;
    for (const torch::jit::Use& u : v->uses()) {
      if (u.user == g.return_node()) {
        last = end;
      } else if (auto it = pos.find(u.user); it != pos.end()) {
        last = std::max(last, it->second);
      } else {
        last = end;  // used inside a nested block: keep it live
      }
    }
    for (int p = def + 1; p <= last && p <= end; ++p) live[p].push_back(v);
  };
  for (Value* in : g.inputs()) add_value(in, -1);
  for (int p = 0; p < end; ++p) {
    for (Value* v : top[p]->outputs()) add_value(v, p);
  }
  absl::flat_hash_set<Value*> boundary;
  for (const FakeQuant& f : fqs) boundary.insert(f.out);
  if (fqs.empty()) {
    for (Node* n : top) {
      const auto k = n->kind();
      if (k == c10::aten::relu || k == c10::aten::relu6 || k == c10::aten::hardtanh)
        boundary.insert(n->output());
    }
  }
  std::vector<Segment> out;
  Segment cur;
  cur.in = live[0].size() == 1 ? live[0][0] : nullptr;
  for (int p = 0; p < end; ++p) {
    cur.nodes.push_back(top[p]);
    if (auto it = layer_of.find(top[p]); it != layer_of.end()) cur.layers.push_back(it->second);
    const std::vector<Value*>& at = live[p + 1];
    if (!cur.layers.empty() && p + 1 < end && at.size() == 1 && boundary.count(at[0]) &&
        at[0]->type()->kind() == c10::TypeKind::TensorType) {
      cur.out = at[0];
      out.push_back(std::move(cur));
      cur = Segment{};
      cur.in = at[0];
    }
  }
  out.push_back(std::move(cur));
  return out;
}

// What a quantized run of a segment uses instead of the graph's constants.
struct Overrides {
  absl::flat_hash_map<size_t, torch::Tensor> weights;  // by layer index
  // Added to input 2 (bias or BatchNorm shift) of the node.
  absl::flat_hash_map<Node*, torch::Tensor> bias_delta;
  // An activation quantizer's scale, by its first node.
  absl::flat_hash_map<Node*, torch::Tensor> act_scale;
  double drop = 0;
  at::Generator* gen = nullptr;
};

// Runs a segment node by node, eagerly, so autograd sees every op. In float
// mode the activation quantizers are skipped and the layers get their float
// weights; in quantized mode rounding passes gradients straight through and
// each quantizer is dropped (left float) with probability `drop`.
// `compare_quantized`: the segment's output is compared after its closing
// quantizer instead of before it.
class SegmentRunner {
 public:
  SegmentRunner(const Segment& seg, const std::vector<FakeQuant>& fqs,
                const absl::flat_hash_map<Node*, size_t>& layer_of,
                bool compare_quantized = false)
      : seg_(seg), layer_of_(layer_of), compare_quantized_(compare_quantized) {
    for (const FakeQuant& f : fqs) {
      fq_by_first_[f.nodes.front()] = &f;
      for (Node* n : f.nodes) in_fq_.insert(n);
    }
  }

  // Returns the tensors compared against the float run and the segment's
  // output value.
  std::pair<std::vector<torch::Tensor>, c10::IValue> Run(
      const torch::Tensor& x, bool quantized, const Overrides& over = {}) const {
    const auto& weights = over.weights;
    const auto& bias_delta = over.bias_delta;
    const double drop = over.drop;
    absl::flat_hash_map<Value*, c10::IValue> env;
    env[seg_.in] = x;
    auto get = [&](Value* v) -> c10::IValue {
      if (auto it = env.find(v); it != env.end()) return it->second;
      std::optional<c10::IValue> c = torch::jit::toIValue(v);
      if (!c.has_value()) throw std::runtime_error("a block reads a value from outside it");
      return *c;
    };
    for (Node* n : seg_.nodes) {
      if (auto f = fq_by_first_.find(n); f != fq_by_first_.end()) {
        const FakeQuant& q = *f->second;
        torch::Tensor v = get(q.in).toTensor();
        if (!quantized) {
          env[q.out] = v;
          continue;
        }
        torch::Tensor fq;
        if (auto s = over.act_scale.find(n); s != over.act_scale.end()) {
          // A learned scale: gradients reach it through both the scaling
          // and the rounding error (LSQ).
          torch::Tensor b = v * s->second - q.zero_point;
          torch::Tensor r = b + (torch::round(b) - b).detach();
          fq = (torch::clamp(r, q.lo, q.hi) + q.zero_point) / s->second;
        } else {
          torch::Tensor b = v * q.scale - q.zero_point;
          torch::Tensor r = b + (torch::round(b) - b).detach();
          fq = (torch::clamp(r, q.lo, q.hi) + q.zero_point) / q.scale;
        }
        env[q.out] = drop > 0 ? Drop(fq, v, drop, *over.gen) : fq;
        continue;
      }
      if (in_fq_.count(n) || (!n->blocks().empty() && n->outputs().empty())) continue;
      torch::jit::Stack stack;
      for (Value* in : n->inputs()) stack.push_back(get(in));
      if (auto l = layer_of_.find(n); l != layer_of_.end()) {
        if (auto w = weights.find(l->second); w != weights.end()) stack[1] = w->second;
      }
      if (auto d = bias_delta.find(n); d != bias_delta.end()) {
        stack[2] = stack[2].isTensor() ? c10::IValue(stack[2].toTensor() + d->second)
                                       : c10::IValue(d->second);
      }
      n->getOperation()(stack);
      for (size_t k = 0; k < n->outputs().size(); ++k) {
        env[n->outputs()[k]] = stack[stack.size() - n->outputs().size() + k];
      }
    }
    if (seg_.out == nullptr) {
      std::vector<torch::Tensor> outs;
      for (Value* v : seg_.nodes.back()->owningGraph()->outputs()) {
        for (torch::Tensor& t : OutputTensors(get(v))) outs.push_back(t);
      }
      return {outs, c10::IValue()};
    }
    Value* compared = seg_.out;
    for (const auto& [first, f] : fq_by_first_) {
      if (f->out == seg_.out && !compare_quantized_) compared = f->in;
    }
    return {{get(compared).toTensor()}, get(seg_.out)};
  }

 private:
  const Segment& seg_;
  const absl::flat_hash_map<Node*, size_t>& layer_of_;
  const bool compare_quantized_;
  absl::flat_hash_map<Node*, const FakeQuant*> fq_by_first_;
  absl::flat_hash_set<Node*> in_fq_;
};

// `weight`, when defined, weighs the first output's squared error element
// by element.
torch::Tensor SegmentError(const std::vector<torch::Tensor>& y, const std::vector<torch::Tensor>& t,
                           const torch::Tensor& weight = {}) {
  torch::Tensor loss;
  if (weight.defined() && y[0].dim() > 1) {
    loss = ((y[0] - t[0]).pow(2) * weight).sum(1).mean();
  } else {
    loss = OutputError(y[0], t[0]);
  }
  for (size_t k = 1; k < y.size(); ++k) loss = loss + OutputError(y[k], t[k]);
  return loss;
}

std::vector<torch::Tensor> RowsOf(const std::vector<torch::Tensor>& xs, const torch::Tensor& idx) {
  std::vector<torch::Tensor> out;
  for (const torch::Tensor& x : xs) out.push_back(Rows(x, idx));
  return out;
}

// BRECQ-style: every segment's rounding (and shifts) learned together
// against the float model's segment output, segment by segment, each fed the
// quantized model's output of the one before. FAILED_PRECONDITION when the
// graph cannot be cut (control flow at the top level, a model input that is
// not one tensor): the caller falls back to layer by layer.
absl::Status ReconstructBlocks(const Model& model, QuantizedModel* qmodel,
                               const std::vector<torch::Tensor>& calibration,
                               const ReconstructOptions& o, const ReconstructProgressFn& progress,
                               const CancellationToken* cancel, ReconstructResult* result) {
  torch::jit::Graph& g = qmodel->graph();
  std::vector<FakeQuant> fqs = FindFakeQuants(*g.block());
  absl::flat_hash_map<Node*, size_t> layer_of;
  for (size_t i = 0; i < qmodel->layers().size(); ++i) layer_of[qmodel->layer_node(i)] = i;
  const std::vector<Segment> segs = Segments(g, fqs, layer_of);
  if (segs.front().in == nullptr) {
    return absl::FailedPreconditionError("the model's graph cannot be cut into blocks");
  }
  for (const Segment& seg : segs) {
    for (Node* n : seg.nodes) {
      // A branch without outputs is a shape check that raises (BatchNorm's
      // input rank): the float model has passed it on these shapes already.
      if (!n->blocks().empty() && !n->outputs().empty()) {
        return absl::FailedPreconditionError("control flow at the top level of the graph");
      }
    }
  }
  std::shared_ptr<torch::jit::Graph> fgraph = model.graph();
  const std::vector<Node*> fnodes = Model::Nodes(*fgraph);
  const std::vector<QuantLayer>& layers = model.summary().layers;
  absl::flat_hash_map<size_t, torch::Tensor> float_weights;
  for (size_t i = 0; i < layers.size(); ++i) {
    float_weights[i] = torch::jit::toIValue(fnodes.at(layers[i].node_index)->input(1))->toTensor();
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  int blocks = 0, done = 0;
  for (const Segment& seg : segs) {
    for (size_t i : seg.layers) {
      if (qmodel->layers()[i].bits > 0) {
        ++blocks;
        break;
      }
    }
  }
  torch::Tensor x_q, x_f;
  ZQ_RETURN_IF_ERROR(CallTorch("reading the calibration data", [&] {
    std::vector<torch::Tensor> parts;
    for (const torch::Tensor& b : calibration) parts.push_back(b.to(model.device()));
    x_q = x_f = torch::cat(parts);
  }));
  // Per segment output: the squared gradient of the float model's
  // cross-entropy against its own predictions (BRECQ's Fisher weighting
  // with pseudo-labels), each sample's scaled to mean 1 so that confident
  // samples, whose gradients all but vanish, still count.
  std::vector<torch::Tensor> fisher(segs.size());
  bool any_fisher = false;
  for (const Segment& seg : segs) {
    int widest = 0;
    for (size_t i : seg.layers) widest = std::max(widest, qmodel->layers()[i].bits);
    any_fisher |= widest > 0 && widest <= o.fisher_bits;
  }
  if (any_fisher) {
    ZQ_RETURN_IF_ERROR(CallTorch("weighting the block outputs", [&] {
      at::AutoGradMode grad_mode(true);
      Overrides float_run;
      float_run.weights = float_weights;
      std::vector<torch::Tensor> outs, leaves;
      torch::Tensor in = x_f, logits;
      for (const Segment& seg : segs) {
        SegmentRunner r(seg, fqs, layer_of);
        auto res = r.Run(in, false, float_run);
        if (seg.out == nullptr) {
          logits = res.first[0];
          break;
        }
        outs.push_back(res.second.toTensor());
        in = outs.back().detach().requires_grad_(true);
        leaves.push_back(in);
      }
      if (!logits.defined() || logits.dim() != 2 || leaves.empty()) return;
      torch::Tensor loss = torch::nn::functional::cross_entropy(
          logits, logits.detach().argmax(1),
          torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
      loss.backward();
      for (size_t k = leaves.size(); k-- > 0;) {
        torch::Tensor g = leaves[k].grad();
        if (!g.defined()) break;
        torch::Tensor g2 = g.detach().pow(2);
        std::vector<int64_t> rest;
        for (int64_t d = 1; d < g2.dim(); ++d) rest.push_back(d);
        fisher[k] = g2 / g2.mean(rest, /*keepdim=*/true).clamp_min(1e-20);
        if (k > 0) outs[k].backward(g);
      }
    }, absl::StatusCode::kInternal));
  }
  // Each inserted activation quantizer's site, by the quantizer's first node.
  absl::flat_hash_map<Node*, size_t> site_of;
  for (size_t i = 0; i < qmodel->sites().size(); ++i) {
    if (Node* n = qmodel->site_node(i); n != nullptr) site_of[n] = i;
  }
  for (const Segment& seg : segs) {
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "reconstruction"));
    std::vector<size_t> learned;
    std::string name;
    int narrowest = 0, widest = 0;
    for (size_t i : seg.layers) {
      const int bits = qmodel->layers()[i].bits;
      if (bits > 0) {
        learned.push_back(i);
        narrowest = narrowest == 0 ? bits : std::min(narrowest, bits);
        widest = std::max(widest, bits);
      }
    }
    ReconstructOptions bo = o;
    if (narrowest > 0 && narrowest <= o.low_width_bits) {
      if (o.low_width_lr > 0) bo.lr = o.low_width_lr;
      if (o.low_width_iterations > 0) bo.iterations = o.low_width_iterations;
    }
    // The quantizers the block runs (their steps learned with activation_lr).
    std::vector<FakeQuant*> block_fqs;
    if (o.activation_lr > 0) {
      const absl::flat_hash_set<Node*> in_seg(seg.nodes.begin(), seg.nodes.end());
      for (FakeQuant& f : fqs) {
        if (in_seg.count(f.nodes.front()) && site_of.count(f.nodes.front()) &&
            (o.learn_closing_step || f.out != seg.out)) {
          block_fqs.push_back(&f);
        }
      }
    }
    SegmentRunner run(seg, fqs, layer_of, o.activation_lr > 0 && o.learn_closing_step);
    if (!learned.empty()) {
      name = learned.size() == 1 ? qmodel->layers()[learned[0]].name
                                 : absl::StrCat(qmodel->layers()[learned.front()].name, " .. ",
                                                qmodel->layers()[learned.back()].name);
    }
    ReconstructProgress p;
    absl::flat_hash_map<size_t, torch::Tensor> hard;
    absl::flat_hash_map<Node*, torch::Tensor> shifts;
    absl::flat_hash_map<FakeQuant*, double> new_scales;
    absl::flat_hash_map<size_t, Rounding*> rounding_of;
    std::vector<std::unique_ptr<Rounding>> roundings;
    c10::IValue next_f;
    absl::Status status = CallTorch(
        absl::StrCat("reconstructing ", name.empty() ? "the model's tail" : name),
        [&] {
          std::vector<torch::Tensor> target;
          {
            torch::NoGradGuard no_grad;
            Overrides float_run;
            float_run.weights = float_weights;
            auto f = run.Run(x_f, false, float_run);
            target = f.first;
            next_f = f.second;
          }
          if (learned.empty()) return;
          at::AutoGradMode grad_mode(true);
          std::vector<torch::Tensor> params;
          absl::flat_hash_map<Node*, torch::Tensor> delta;
          for (size_t i : learned) {
            const LayerQuantInfo& info = qmodel->layers()[i];
            roundings.push_back(std::make_unique<Rounding>(float_weights[i], info.scale,
                                                           info.zero_point, info.bits,
                                                           bo.weight_range_mse));
            rounding_of[i] = roundings.back().get();
            params.push_back(roundings.back()->v);
            if (bo.learn_shift) {
              Node* qnode = qmodel->layer_node(i);
              Node* bn = ConsumingBatchNorm(qnode);
              Node* owner = bn ? bn : qnode;
              torch::Tensor d = torch::zeros({float_weights[i].size(0)}, float_weights[i].options())
                                    .requires_grad_(true);
              delta[owner] = d;
              params.push_back(d);
            }
          }
          // Each quantizer's step as a multiple of its calibrated one.
          absl::flat_hash_map<FakeQuant*, torch::Tensor> step_factor;
          std::vector<torch::Tensor> act_params;
          for (FakeQuant* f : block_fqs) {
            step_factor[f] = torch::ones({}, float_weights[learned[0]].options())
                                 .requires_grad_(true);
            act_params.push_back(step_factor[f]);
          }
          auto scales = [&](bool detached) {
            absl::flat_hash_map<Node*, torch::Tensor> out;
            for (const auto& [f, a] : step_factor) {
              out[f->nodes.front()] = f->scale / (detached ? a.detach() : a);
            }
            return out;
          };
          // Steps on the first n - holdout samples; the result is judged on
          // the held-out rest (on all of them when none are held out).
          const int64_t n = x_q.size(0);
          const int64_t held = static_cast<int64_t>(std::floor(bo.holdout * n));
          const int64_t n_train = n - held;
          const torch::Tensor xq_train = x_q.narrow(0, 0, n_train);
          const torch::Tensor xf_train = x_f.narrow(0, 0, n_train);
          const torch::Tensor xq_eval = held > 0 ? x_q.narrow(0, n_train, held) : x_q;
          const torch::Tensor weight =
              widest <= bo.fisher_bits ? fisher[&seg - segs.data()] : torch::Tensor();
          const torch::Tensor weight_train = weight.defined() ? weight.narrow(0, 0, n_train) : weight;
          const torch::Tensor weight_eval =
              weight.defined() && held > 0 ? weight.narrow(0, n_train, held) : weight;
          std::vector<torch::Tensor> target_train, target_eval;
          for (const torch::Tensor& t : target) {
            target_train.push_back(t.narrow(0, 0, n_train));
            target_eval.push_back(held > 0 ? t.narrow(0, n_train, held) : t);
          }
          {
            torch::NoGradGuard no_grad;
            p.loss_before =
                SegmentError(run.Run(xq_eval, true).first, target_eval, weight_eval).item<double>();
          }
          // A candidate result: the hard rounding, shifts and steps as they
          // stand, and its error on the judging samples.
          struct Candidate {
            absl::flat_hash_map<size_t, torch::Tensor> q;
            absl::flat_hash_map<Node*, torch::Tensor> shift;
            absl::flat_hash_map<FakeQuant*, double> scale;
            double loss = std::numeric_limits<double>::infinity();
          };
          auto candidate = [&] {
            torch::NoGradGuard no_grad;
            Candidate c;
            Overrides hard_run;
            for (size_t i : learned) {
              c.q[i] = rounding_of[i]->HardQ();
              hard_run.weights[i] = rounding_of[i]->Dequantize(c.q[i]);
            }
            for (auto& [owner, d] : delta) c.shift[owner] = d.detach().clone();
            hard_run.bias_delta = c.shift;
            for (const auto& [f, a] : step_factor) {
              c.scale[f] = f->scale / a.item<double>();
              hard_run.act_scale[f->nodes.front()] = torch::scalar_tensor(c.scale[f], a.options());
            }
            c.loss = SegmentError(run.Run(xq_eval, true, hard_run).first, target_eval, weight_eval)
                         .item<double>();
            return c;
          };
          Candidate best;
          torch::optim::Adam adam(params, torch::optim::AdamOptions(bo.lr));
          std::optional<torch::optim::Adam> act_adam;
          if (!act_params.empty()) {
            act_adam.emplace(act_params, torch::optim::AdamOptions(bo.activation_lr));
          }
          for (int step = 0; step < bo.iterations; ++step) {
            if (step % 32 == 0 && cancel != nullptr && cancel->IsCancelled()) break;
            const torch::Tensor idx = SampleRows(n_train, bo.batch_size, gen, x_q.device());
            const torch::Tensor x =
                Drop(Rows(xq_train, idx), Rows(xf_train, idx), bo.drop_probability, gen);
            Overrides over;
            for (size_t i : learned) over.weights[i] = rounding_of[i]->Soft();
            over.bias_delta = delta;
            over.act_scale = scales(false);
            over.drop = bo.drop_probability;
            over.gen = &gen;
            torch::Tensor loss =
                SegmentError(run.Run(x, true, over).first, RowsOf(target_train, idx),
                             weight_train.defined() ? Rows(weight_train, idx) : weight_train);
            if (const double beta = Beta(bo, step); beta > 0) {
              for (size_t i : learned) loss = loss + bo.reg_weight * rounding_of[i]->Regulariser(beta);
            }
            adam.zero_grad();
            if (act_adam) act_adam->zero_grad();
            loss.backward();
            adam.step();
            if (act_adam) act_adam->step();
            if (bo.check_every > 0 && (step + 1) % bo.check_every == 0 &&
                step + 1 < bo.iterations) {
              if (Candidate c = candidate(); c.loss < best.loss) best = std::move(c);
            }
          }
          if (Candidate c = candidate(); c.loss <= best.loss) best = std::move(c);
          torch::NoGradGuard no_grad;
          p.loss_after = best.loss;
          if (!(p.loss_after < p.loss_before)) {
            p.loss_after = p.loss_before;
            return;
          }
          double flipped = 0, params_n = 0;
          for (size_t i : learned) {
            flipped += rounding_of[i]->Flipped(best.q[i]) * best.q[i].numel();
            params_n += best.q[i].numel();
          }
          p.flipped = params_n > 0 ? flipped / params_n : 0;
          hard = std::move(best.q);
          shifts = std::move(best.shift);
          new_scales = std::move(best.scale);
        },
        absl::StatusCode::kInternal);
    ZQ_RETURN_IF_ERROR(status);
    for (const auto& [i, q] : hard) {
      const Rounding& r = *rounding_of[i];
      ZQ_RETURN_IF_ERROR(qmodel->SetLearnedWeight(i, r.Dequantize(q), q, r.scale,
                                                  r.zero_point, "block"));
    }
    for (const auto& [owner, d] : shifts) {
      std::optional<c10::IValue> old = torch::jit::toIValue(owner->input(2));
      ZQ_RETURN_IF_ERROR(qmodel->SetConstantInput(
          owner, 2, old.has_value() && old->isTensor() ? old->toTensor() + d : d));
    }
    for (const auto& [f, scale] : new_scales) {
      ZQ_RETURN_IF_ERROR(qmodel->SetActivationScale(site_of.at(f->nodes.front()), scale));
      // The runners read the quantizer's scale from here, not the graph.
      f->scale = scale;
    }
    if (seg.out != nullptr) {
      ZQ_RETURN_IF_ERROR(CallTorch("running the quantized model", [&] {
        torch::NoGradGuard no_grad;
        x_q = run.Run(x_q, true).second.toTensor();
        x_f = next_f.toTensor();
      }, absl::StatusCode::kInternal));
    }
    if (learned.empty()) continue;
    p.layer = ++done;
    p.layers = blocks;
    p.name = name;
    result->layers.push_back(p);
    if (progress) progress(p);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateReconstructOptions(const ReconstructOptions& o) {
  const int method = static_cast<int>(o.method);
  if (method < 1 || method > kReconstruct.count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reconstruct = ", method, ": must be ", kReconstruct.Describe()));
  }
  if (o.iterations < kReconstructIterations.lo || o.iterations > kReconstructIterations.hi) {
    return absl::InvalidArgumentError(absl::StrCat(
        kReconstructIterations.name, " = ", o.iterations, ": must be ",
        kReconstructIterations.lo, "..", kReconstructIterations.hi));
  }
  if (o.batch_size < 1) {
    return absl::InvalidArgumentError("reconstruction batch size must be positive");
  }
  if (o.low_width_iterations < 0 || o.low_width_iterations > kReconstructIterations.hi) {
    return absl::InvalidArgumentError(absl::StrCat(
        "low-width reconstruction iterations = ", o.low_width_iterations, ": must be 0..",
        kReconstructIterations.hi));
  }
  if (!(o.activation_lr >= 0) || !(o.low_width_lr >= 0) || o.low_width_bits < 0 ||
      !(o.holdout >= 0 && o.holdout < 1) || o.check_every < 0 || o.fisher_bits < 0) {
    return absl::InvalidArgumentError("reconstruction options out of range");
  }
  if (!(o.lr > 0) || !(o.reg_weight >= 0) || !(o.warmup >= 0 && o.warmup < 1) ||
      !(o.drop_probability >= 0 && o.drop_probability <= 1) ||
      !(o.beta_start > 0 && o.beta_end > 0)) {
    return absl::InvalidArgumentError("reconstruction options out of range");
  }
  return absl::OkStatus();
}

absl::StatusOr<ReconstructResult> Reconstruct(
    const Model& model, QuantizedModel* qmodel,
    const std::vector<torch::Tensor>& calibration,
    const ReconstructOptions& options, const ReconstructProgressFn& progress,
    const CancellationToken* cancel) {
  ZQ_RETURN_IF_ERROR(ValidateReconstructOptions(options));
  ReconstructResult result;
  if (options.method == ReconstructMethod::kNone) return result;
  if (calibration.empty()) {
    return absl::InvalidArgumentError("reconstruction needs calibration batches");
  }
  result.method = "adaround";
  if (options.method == ReconstructMethod::kBlock || options.method == ReconstructMethod::kAuto) {
    result.method = "block";
    absl::Status blocks =
        ReconstructBlocks(model, qmodel, calibration, options, progress, cancel, &result);
    if (blocks.code() != absl::StatusCode::kFailedPrecondition) {
      if (!blocks.ok()) return blocks;
      return result;
    }
    result.method = "adaround";
  }
  const std::vector<QuantLayer>& layers = model.summary().layers;
  int total = 0;
  for (const LayerQuantInfo& l : qmodel->layers()) total += l.bits > 0;

  std::shared_ptr<torch::jit::Graph> fgraph = model.graph();
  const std::vector<Node*> fnodes = Model::Nodes(*fgraph);
  const c10::IValue fself = model.frozen()._ivalue();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  int done = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerQuantInfo& info = qmodel->layers()[i];
    if (info.bits == 0) continue;
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "reconstruction"));
    Node* fnode = fnodes.at(layers[i].node_index);
    Node* qnode = qmodel->layer_node(i);
    Node* shift_owner = nullptr;
    absl::StatusOr<LayerOutcome> outcome = CallTorch(
        absl::StrCat("reconstructing ", info.name),
        [&] {
          Node* fbn = ConsumingBatchNorm(fnode);
          Value* fout = fbn ? fbn->output() : fnode->output();
          GraphProgram fprobe(ProbeGraph(*fgraph, std::vector<Value*>{fnode->input(0), fout}),
                              fself);
          GraphProgram qprobe(
              ProbeGraph(qmodel->graph(), std::vector<Value*>{qnode->input(0)}),
              qmodel->self());
          torch::NoGradGuard no_grad;
          std::vector<torch::Tensor> f = Collect(fprobe, calibration, model.device());
          torch::Tensor x_q = Collect(qprobe, calibration, model.device())[0];
          LayerFn fn{qnode, fbn ? ConsumingBatchNorm(qnode) : nullptr};
          if ((fbn != nullptr) != (fn.bn != nullptr)) {
            throw std::runtime_error("the quantized graph differs from the float graph");
          }
          const torch::Tensor w = torch::jit::toIValue(fnode->input(1))->toTensor();
          const torch::Tensor w_nearest = torch::jit::toIValue(qnode->input(1))->toTensor();
          at::AutoGradMode grad(true);
          const int channel_dim =
              layers[i].kind == LayerKind::kLinear && fn.bn == nullptr ? -1 : 1;
          ReconstructOptions lo = options;
          if (info.bits <= options.low_width_bits) {
            if (options.low_width_lr > 0) lo.lr = options.low_width_lr;
            if (options.low_width_iterations > 0) lo.iterations = options.low_width_iterations;
          }
          LayerOutcome o = LearnRounding(fn, w, info.scale, info.zero_point, info.bits,
                                         channel_dim, w_nearest, x_q, f[0], f[1], lo, gen,
                                         cancel);
          if (o.shift.defined()) {
            // Folded into the BatchNorm's shift, else into the layer's bias.
            Node* owner = fn.bn ? fn.bn : qnode;
            std::optional<c10::IValue> old = torch::jit::toIValue(owner->input(2));
            torch::Tensor bias = old.has_value() && old->isTensor()
                                     ? old->toTensor() + o.shift.to(old->toTensor().dtype())
                                     : o.shift;
            o.shift = bias;
            shift_owner = owner;
          }
          return o;
        },
        absl::StatusCode::kInternal);
    ZQ_RETURN_IF_ERROR(outcome.status());
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "reconstruction"));
    if (outcome->q.defined()) {
      ZQ_RETURN_IF_ERROR(qmodel->SetLearnedWeight(i, outcome->dequantized, outcome->q,
                                                  outcome->scale, outcome->zero_point,
                                                  "adaround"));
    }
    if (outcome->shift.defined()) {
      ZQ_RETURN_IF_ERROR(qmodel->SetConstantInput(shift_owner, 2, outcome->shift));
    }
    ReconstructProgress p = outcome->progress;
    p.layer = ++done;
    p.layers = total;
    p.name = info.name;
    result.layers.push_back(p);
    if (progress) progress(p);
  }
  return result;
}

}  // namespace zeroq::core
