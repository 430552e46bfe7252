#include "core/distill.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/runtime/custom_operator.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/graph_util.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

// PyTorch's ReduceLROnPlateau with mode "min", relative threshold 1e-4 and no
// cooldown: the learning rate drops by `factor` once the loss has not improved
// for more than `patience` steps, never below `min_lr`.
class PlateauScheduler {
 public:
  PlateauScheduler(double lr, double factor, int patience, double min_lr)
      : lr_(lr), factor_(factor), patience_(patience), min_lr_(min_lr) {}

  // Returns the learning rate for the next step.
  double Step(double loss) {
    if (loss < best_ * (1.0 - kThreshold)) {
      best_ = loss;
      bad_steps_ = 0;
    } else {
      ++bad_steps_;
    }
    if (bad_steps_ > patience_) {
      double next = std::max(lr_ * factor_, min_lr_);
      if (lr_ - next > kEps) lr_ = next;
      bad_steps_ = 0;
    }
    return lr_;
  }
  double lr() const { return lr_; }

 private:
  static constexpr double kThreshold = 1e-4;
  static constexpr double kEps = 1e-8;
  double lr_, factor_;
  int patience_;
  double min_lr_;
  double best_ = std::numeric_limits<double>::infinity();
  int bad_steps_ = 0;
};


// Statistics term for one value against per-channel targets, differentiable
// (for Loss(); LossAndBackward() computes the same value and its gradient in
// closed form).
torch::Tensor StatsTerm(const torch::Tensor& v, const torch::Tensor& mu,
                        const torch::Tensor& sigma, const DistillOptions& o) {
  const int64_t n = v.size(0), c = v.size(1);
  torch::Tensor flat = v.reshape({n, c, -1});
  const int64_t l = flat.size(2);
  // Per sample over H*W (reference); per batch for [N, C] inputs, which
  // have no spatial extent, and when asked.
  const bool per_sample = o.stats == DistillStats::kPerSample && l > 1;
  const int64_t count = per_sample ? l : n * l;
  auto dims = per_sample ? std::vector<int64_t>{2} : std::vector<int64_t>{0, 2};
  torch::Tensor mean = flat.mean(dims, /*keepdim=*/true);
  torch::Tensor centered = flat - mean;
  torch::Tensor var = (centered * centered).sum(dims, /*keepdim=*/true) /
                      static_cast<double>(std::max<int64_t>(count - 1, 1));
  torch::Tensor s = torch::sqrt(var + o.eps);
  torch::Tensor dm = mu.view({1, c, 1}) - mean;
  torch::Tensor ds = sigma.view({1, c, 1}) - s;
  const double norm = per_sample ? 1.0 / n : 1.0;
  return (dm.pow(2).sum() + ds.pow(2).sum()) * norm;
}

// The image prior: the input's total variation, over each spatial dimension
// (2 and up) the mean absolute difference between neighbours, times
// `weight`. Differentiable (for Loss()).
torch::Tensor TotalVariation(const torch::Tensor& x, double weight) {
  torch::Tensor tv = torch::zeros({}, x.options());
  for (int64_t d = 2; d < x.dim(); ++d) {
    const int64_t len = x.size(d);
    if (len < 2) continue;
    tv = tv + (x.narrow(d, 1, len - 1) - x.narrow(d, 0, len - 1)).abs().mean();
  }
  return tv * weight;
}

// LossAndBackward's kernels work on one term's data as a contiguous float
// [rows, len] matrix (row = one sample's channel, channel = row % channels);
// a parallel chunk gets at least ATen's grain of elements.
constexpr int64_t kGrainElements = 32768;

int64_t GrainRows(int64_t len) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(len, 1));
}

// Runs f(begin, end) over chunks of [0, n) of at least `grain` on the
// intra-op threads. (at::parallel_for is inline: compiled here, without
// OpenMP, its parallel region runs on one thread. TensorIterator's for_each
// runs it inside LibTorch: over a 1-D byte tensor of n elements, the
// pointer its loop gets is the chunk's start.)
void ParallelFor(int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& f) {
  if (n < 2 * grain || at::get_num_threads() == 1) {
    if (n > 0) f(0, n);
    return;
  }
  torch::Tensor positions = at::empty({n}, torch::kByte);
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .add_output(positions)
                                .check_all_same_dtype(false)
                                .resize_outputs(false)
                                .build();
  const char* base = static_cast<const char*>(positions.data_ptr());
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        const int64_t begin = data[0] - base;
        f(begin, begin + size0 * size1);
      },
      grain);
}

// Built for AVX2 too, picked at load time where the CPU has it: the default
// x86-64 target has 16-byte vectors, and the row moments are bound by
// arithmetic there. Both versions round alike (the same vector lanes, no
// fused multiply-add).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ZQ_CLONE_FOR_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define ZQ_CLONE_FOR_AVX2
#endif

using Float8 = float __attribute__((vector_size(32)));
using Double8 = double __attribute__((vector_size(64)));

// (Vectors pass by pointer and reference: by value their ABI would depend on
// the target.)
inline void Load8(const float* p, Float8* v) { std::memcpy(v, p, sizeof *v); }
inline void Store8(const Float8& v, float* p) { std::memcpy(p, &v, sizeof v); }
inline void Splat8(float f, Float8* v) { *v = Float8{f, f, f, f, f, f, f, f}; }

inline double Sum8(const Double8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// For rows [begin, end), with d = x - shift[channel]: s1[r] = sum(d) and
// s2[r] = sum(d^2), in one pass over x; with y non-null, the same pass also
// writes y = x * alpha[channel] + beta[channel] (an inference BatchNorm).
// Four independent vectors of eight float lanes take a dozen elements at
// most per lane before they are added into double lanes: about as accurate
// as ATen's cascaded float sums. The shift is the term's target mean, which
// the data converges to, so s2 - s1^2 / len does not cancel when the mean
// is large against the standard deviation.
ZQ_CLONE_FOR_AVX2
void RowMomentsKernel(const float* x, int64_t begin, int64_t end, int64_t len,
                      int64_t channels, const float* shift, double* s1,
                      double* s2, const float* alpha, const float* beta,
                      float* y) {
  constexpr int kBlocksPerFlush = 8;
  for (int64_t r = begin; r < end; ++r) {
    const float* p = x + r * len;
    float* out = y == nullptr ? nullptr : y + r * len;
    const int64_t ch = r % channels;
    const float m = shift[ch];
    const float k = y == nullptr ? 1.0f : alpha[ch];
    const float c = y == nullptr ? 0.0f : beta[ch];
    Float8 mv, kv, cv;
    Splat8(m, &mv);
    Splat8(k, &kv);
    Splat8(c, &cv);
    Float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    Float8 q0 = {}, q1 = {}, q2 = {}, q3 = {};
    Double8 d1 = {}, d2 = {};
    int64_t j = 0;
    int blocks = 0;
    for (; j + 32 <= len; j += 32) {
      Float8 v0, v1, v2, v3;
      Load8(p + j, &v0);
      Load8(p + j + 8, &v1);
      Load8(p + j + 16, &v2);
      Load8(p + j + 24, &v3);
      if (out != nullptr) {
        Store8(v0 * kv + cv, out + j);
        Store8(v1 * kv + cv, out + j + 8);
        Store8(v2 * kv + cv, out + j + 16);
        Store8(v3 * kv + cv, out + j + 24);
      }
      v0 -= mv;
      v1 -= mv;
      v2 -= mv;
      v3 -= mv;
      a0 += v0;
      a1 += v1;
      a2 += v2;
      a3 += v3;
      q0 += v0 * v0;
      q1 += v1 * v1;
      q2 += v2 * v2;
      q3 += v3 * v3;
      if (++blocks == kBlocksPerFlush) {
        d1 += __builtin_convertvector((a0 + a1) + (a2 + a3), Double8);
        d2 += __builtin_convertvector((q0 + q1) + (q2 + q3), Double8);
        a0 = a1 = a2 = a3 = q0 = q1 = q2 = q3 = Float8{};
        blocks = 0;
      }
    }
    for (; j + 8 <= len; j += 8) {
      Float8 v;
      Load8(p + j, &v);
      if (out != nullptr) Store8(v * kv + cv, out + j);
      v -= mv;
      a1 += v;
      q1 += v * v;
    }
    double t1 = 0, t2 = 0;
    for (; j < len; ++j) {
      if (out != nullptr) out[j] = p[j] * k + c;
      const float d = p[j] - m;
      t1 += d;
      t2 += d * d;
    }
    if (len >= 8) {
      d1 += __builtin_convertvector((a0 + a1) + (a2 + a3), Double8);
      d2 += __builtin_convertvector((q0 + q1) + (q2 + q3), Double8);
      t1 += Sum8(d1);
      t2 += Sum8(d2);
    }
    s1[r] = t1;
    s2[r] = t2;
  }
}

// The image prior over pairs (e, e + stride), e in [0, count), of a
// contiguous float tensor: returns sum |x[e + stride] - x[e]| and adds
// scale * sign(x[e + stride] - x[e]) to g[e + stride], subtracts it from
// g[e] (0 where the two are equal). Eight pairs at a time; with a stride
// under 8 a block's two updates overlap, so they are stored one after the
// other, the later elements' first, so each element gets the step from its
// earlier neighbour before the one toward its later neighbour, as one pair
// at a time would. Lane sums are flushed to double every 64 blocks.
ZQ_CLONE_FOR_AVX2
double TotalVariationPairs(const float* x, float* g, int64_t count,
                           int64_t stride, float scale) {
  using Int8 = int32_t __attribute__((vector_size(32)));
  Float8 sv;
  Splat8(scale, &sv);
  const Int8 scale_bits = reinterpret_cast<const Int8&>(sv);
  const Int8 sign_bit = {INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN,
                         INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN};
  const Float8 zero = {};
  double total = 0;
  Float8 acc = {};
  int blocks = 0;
  int64_t e = 0;
  for (; e + 8 <= count; e += 8) {
    Float8 a, b, ga, gb;
    Load8(x + e, &a);
    Load8(x + e + stride, &b);
    const Float8 d = b - a;
    const Int8 bits = reinterpret_cast<const Int8&>(d);
    const Int8 abs_bits = bits & ~sign_bit;
    acc += reinterpret_cast<const Float8&>(abs_bits);
    // copysign(scale, d) where d != 0, else 0.
    const Int8 step_bits = (scale_bits | (bits & sign_bit)) & (d != zero);
    const Float8 step = reinterpret_cast<const Float8&>(step_bits);
    Load8(g + e + stride, &gb);
    Store8(gb + step, g + e + stride);
    Load8(g + e, &ga);
    Store8(ga - step, g + e);
    if (++blocks == 64) {
      total += Sum8(__builtin_convertvector(acc, Double8));
      acc = Float8{};
      blocks = 0;
    }
  }
  total += Sum8(__builtin_convertvector(acc, Double8));
  for (; e < count; ++e) {
    const float d = x[e + stride] - x[e];
    total += std::abs(d);
    const float step = scale * static_cast<float>((d > 0) - (d < 0));
    g[e + stride] += step;
    g[e] -= step;
  }
  return total;
}
#undef ZQ_CLONE_FOR_AVX2

// TotalVariation's value, with its gradient added to grad in place (no
// autograd): each difference's sign over its count, into the later element
// and out of the earlier one (0 where neighbours are equal, as abs's
// gradient). A contiguous float batch on the CPU takes one pass per spatial
// dimension (TotalVariationPairs over each block of `len` along it, or over
// each row when it is the last); anything else (another device or type, a
// strided batch) takes autograd's gradient of TotalVariation.
double AddTotalVariationGradient(const torch::Tensor& x, double weight,
                                 torch::Tensor& grad) {
  const bool fused = x.is_cpu() && x.scalar_type() == torch::kFloat &&
                     x.is_contiguous() && grad.is_contiguous() &&
                     grad.scalar_type() == torch::kFloat;
  if (!fused) {
    torch::AutoGradMode enable(true);
    torch::Tensor leaf = x.detach().requires_grad_(true);
    torch::Tensor value = TotalVariation(leaf, weight);
    value.backward();
    torch::NoGradGuard no_grad;
    grad.add_(leaf.grad());
    return value.item<double>();
  }
  const float* px = x.data_ptr<float>();
  float* pg = grad.data_ptr<float>();
  double tv = 0;
  for (int64_t d = 2; d < x.dim(); ++d) {
    const int64_t len = x.size(d);
    if (len < 2) continue;
    const double count =
        static_cast<double>(x.numel() / len) * static_cast<double>(len - 1);
    const double scale = weight / count;
    // Pairs along d: within each block of len * inner elements, the first
    // (len - 1) * inner with their neighbour `inner` further on.
    const int64_t inner = x.stride(d);
    const int64_t block = len * inner;
    double sum = 0;
    for (int64_t o = 0; o < x.numel() / block; ++o) {
      sum += TotalVariationPairs(px + o * block, pg + o * block,
                                 (len - 1) * inner, inner,
                                 static_cast<float>(scale));
    }
    tv += scale * sum;
  }
  return tv;
}

// out = in * scale[channel] + (a[r] + b[r] * x) row by row, in one pass:
// a term's gradient added to the one flowing back (scale null: 1; through
// an inference BatchNorm: its alpha). `in` may be null (zero) or `out`.
// Bound by memory: the compiler's vectors suffice.
void AddAffine(const float* x, const float* in, const float* scale, float* out,
               int64_t rows, int64_t len, int64_t channels, const float* a,
               const float* b) {
  ParallelFor(rows, GrainRows(len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float ar = a[r], br = b[r];
      const float k = scale == nullptr ? 1.0f : scale[r % channels];
      const float* xr = x + r * len;
      float* o = out + r * len;
      if (in == nullptr) {
        for (int64_t j = 0; j < len; ++j) o[j] = ar + br * xr[j];
      } else {
        const float* ir = in + r * len;
        for (int64_t j = 0; j < len; ++j) o[j] = ir[j] * k + (ar + br * xr[j]);
      }
    }
  });
}

// Whether the kernels above apply: data on the CPU in float.
bool OnCpuInFloat(const torch::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == torch::kFloat;
}

// The moments above for x viewed as [n, c, l] about shift[c]: [2, n * c]
// doubles (sums, then sums of squares) on x's device. Tensor ops where the
// kernel does not apply.
torch::Tensor RowMoments(const torch::Tensor& x, const torch::Tensor& shift) {
  const int64_t n = x.size(0), c = x.size(1);
  torch::Tensor rows = x.detach().reshape({n, c, -1});
  if (!OnCpuInFloat(rows)) {
    torch::NoGradGuard no_grad;
    torch::Tensor d = rows.to(torch::kFloat) -
                      shift.to(rows.device(), torch::kFloat).view({1, c, 1});
    return torch::stack({d.sum(2, false, torch::kDouble).flatten(),
                         d.square().sum(2, false, torch::kDouble).flatten()});
  }
  rows = rows.contiguous();
  const torch::Tensor sh = shift.to(torch::kCPU, torch::kFloat).contiguous();
  torch::Tensor out = torch::empty({2, n * c}, torch::kDouble);
  const float* p = rows.data_ptr<float>();
  const float* q = sh.data_ptr<float>();
  double* s1 = out.data_ptr<double>();
  const int64_t len = rows.size(2);
  ParallelFor(n * c, GrainRows(len), [&](int64_t begin, int64_t end) {
    RowMomentsKernel(p, begin, end, len, c, q, s1, s1 + n * c, nullptr, nullptr,
                     nullptr);
  });
  return out;
}

// An inference BatchNorm y = x * alpha[c] + beta[c] that also computes x's
// row moments in the same pass (written into `moments`), and whose backward
// also adds the BN-statistics term's gradient a + b * x, with a and b the
// rows of `coef`, which LossAndBackward fills in between: each BN input is
// read once forward and once backward, as by the BatchNorm alone.
class StatsBatchNorm : public torch::autograd::Function<StatsBatchNorm> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               const torch::Tensor& input,
                               const torch::Tensor& alpha,
                               const torch::Tensor& beta,
                               const torch::Tensor& shift,
                               const torch::Tensor& moments,
                               const torch::Tensor& coef) {
    torch::Tensor x = input.contiguous();
    torch::Tensor y = at::empty(x.sizes(), x.options());
    const int64_t n = x.size(0), c = x.size(1), len = x.numel() / (n * c);
    const float* px = x.data_ptr<float>();
    const float* pa = alpha.data_ptr<float>();
    const float* pb = beta.data_ptr<float>();
    const float* ps = shift.data_ptr<float>();
    double* s1 = moments.data_ptr<double>();
    float* py = y.data_ptr<float>();
    ParallelFor(n * c, GrainRows(len), [&](int64_t begin, int64_t end) {
      RowMomentsKernel(px, begin, end, len, c, ps, s1, s1 + n * c, pa, pb, py);
    });
    ctx->save_for_backward({x});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["coef"] = coef;
    return y;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const torch::Tensor x = ctx->get_saved_variables()[0];
    const torch::Tensor alpha = ctx->saved_data["alpha"].toTensor();
    const torch::Tensor coef = ctx->saved_data["coef"].toTensor();
    const int64_t n = x.size(0), c = x.size(1), len = x.numel() / (n * c);
    torch::Tensor dy;
    if (grads[0].defined()) dy = grads[0].to(torch::kFloat).contiguous();
    torch::Tensor dx = at::empty(x.sizes(), x.options());
    const float* a = coef.data_ptr<float>();
    AddAffine(x.data_ptr<float>(),
              dy.defined() ? dy.data_ptr<float>() : nullptr,
              alpha.data_ptr<float>(), dx.data_ptr<float>(), n * c, len, c, a,
              a + n * c);
    // No gradient for the constants.
    return {dx, {}, {}, {}, {}, {}};
  }
};

// An inference BatchNorm y = x * alpha[c] + beta[c] and x's row moments:
// (y, moments, coef), through StatsBatchNorm where the kernels apply; else
// tensor ops and an empty coef (LossAndBackward then adds the term's
// gradient itself).
std::vector<torch::Tensor> BatchNormMoments(const torch::Tensor& input,
                                            const torch::Tensor& alpha,
                                            const torch::Tensor& beta,
                                            const torch::Tensor& shift) {
  if (!OnCpuInFloat(input) || !OnCpuInFloat(alpha) || !OnCpuInFloat(beta)) {
    std::vector<int64_t> shape(input.dim(), 1);
    shape[1] = -1;
    return {input * alpha.to(input).view(shape) + beta.to(input).view(shape),
            RowMoments(input, shift), at::empty({0}, torch::kFloat)};
  }
  const int64_t rows = input.size(0) * input.size(1);
  torch::Tensor moments = torch::empty({2, rows}, torch::kDouble);
  torch::Tensor coef = torch::empty({2, rows}, torch::kFloat);
  torch::Tensor y = StatsBatchNorm::apply(
      input, alpha.contiguous(), beta.contiguous(),
      shift.to(torch::kCPU, torch::kFloat).contiguous(), moments, coef);
  return {y, moments, coef};
}

// The statistics probe's ops (graph ops, so that each runs right after its
// value is computed, while the value is still in cache).
const c10::Symbol kRowMoments =
    c10::Symbol::fromQualString("zeroq::row_moments");
const c10::Symbol kBatchNormMoments =
    c10::Symbol::fromQualString("zeroq::batch_norm_moments");
const torch::jit::RegisterOperators kRegisterStatsOps({
    torch::jit::Operator(
        "zeroq::row_moments(Tensor x, Tensor shift) -> (Tensor, Tensor)",
        [](torch::jit::Stack& stack) {
          torch::Tensor shift = torch::jit::pop(stack).toTensor();
          torch::Tensor x = torch::jit::pop(stack).toTensor();
          torch::jit::push(stack, RowMoments(x, shift),
                           at::empty({0}, torch::kFloat));
        },
        c10::AliasAnalysisKind::FROM_SCHEMA),
    torch::jit::Operator(
        "zeroq::batch_norm_moments(Tensor input, Tensor alpha, Tensor beta, "
        "Tensor shift) -> (Tensor, Tensor, Tensor)",
        [](torch::jit::Stack& stack) {
          torch::Tensor shift = torch::jit::pop(stack).toTensor();
          torch::Tensor beta = torch::jit::pop(stack).toTensor();
          torch::Tensor alpha = torch::jit::pop(stack).toTensor();
          torch::Tensor input = torch::jit::pop(stack).toTensor();
          std::vector<torch::Tensor> out =
              BatchNormMoments(input, alpha, beta, shift);
          torch::jit::push(stack, out[0], out[1], out[2]);
        },
        c10::AliasAnalysisKind::FROM_SCHEMA),
});

// The BN node a term's value can be fused with: its only BatchNorm user, in
// inference with constant parameters.
torch::jit::Node* FusableBatchNorm(torch::jit::Value* v) {
  torch::jit::Node* bn = nullptr;
  for (const torch::jit::Use& use : v->uses()) {
    if (use.user->kind() != c10::aten::batch_norm) continue;
    if (bn != nullptr || use.offset != 0) return nullptr;
    bn = use.user;
  }
  if (bn == nullptr) return nullptr;
  for (size_t i = 1; i < bn->inputs().size(); ++i) {
    if (!torch::jit::toIValue(bn->input(i)).has_value()) return nullptr;
  }
  if (torch::jit::toIValue(bn->input(5))->toBool() ||
      !torch::jit::toIValue(bn->input(3))->isTensor() ||
      !torch::jit::toIValue(bn->input(4))->isTensor()) {
    return nullptr;
  }
  return bn;
}

// The statistics probe: the probe's values v_i, then per value its row
// moments about shifts[i], its gradient coefficients (empty unless fused),
// and the fused BN's output (v_i where not fused). A value's BN is replaced
// by batch_norm_moments where it can be; otherwise row_moments follows the
// value.
std::shared_ptr<torch::jit::Graph> StatsProbeGraph(
    torch::jit::Graph& probe, const std::vector<torch::Tensor>& shifts) {
  std::shared_ptr<torch::jit::Graph> g = probe.copy();
  torch::jit::Node* tuple = g->outputs().at(0)->node();
  TORCH_CHECK(tuple->kind() == c10::prim::TupleConstruct &&
                  tuple->inputs().size() == shifts.size(),
              "the BatchNorm probe does not return its ", shifts.size(),
              " values");
  std::vector<torch::jit::Value*> values(tuple->inputs().begin(),
                                         tuple->inputs().end());
  std::vector<torch::jit::Value*> moments, coefs, outputs;
  std::unordered_set<torch::jit::Node*> fused;
  for (size_t i = 0; i < values.size(); ++i) {
    torch::jit::Value* v = values[i];
    torch::jit::Node* bn = FusableBatchNorm(v);
    if (bn != nullptr && fused.insert(bn).second) {
      // ATen's inference arithmetic, in float: alpha = w / sqrt(var + eps),
      // beta = b - mean * alpha.
      auto constant = [&](int k) {
        return *torch::jit::toIValue(bn->input(k));
      };
      const c10::IValue w = constant(1), b = constant(2);
      const torch::Tensor mean = constant(3).toTensor().to(torch::kFloat);
      const torch::Tensor var = constant(4).toTensor().to(torch::kFloat);
      torch::Tensor alpha =
          torch::reciprocal(torch::sqrt(var + constant(7).toDouble()));
      if (!w.isNone()) alpha = alpha * w.toTensor().to(torch::kFloat);
      torch::Tensor beta = -mean * alpha;
      if (!b.isNone()) beta = b.toTensor().to(torch::kFloat) - mean * alpha;
      torch::jit::WithInsertPoint guard(bn);
      torch::jit::Node* op =
          g->insert(kBatchNormMoments,
                    {v, g->insertConstant(alpha), g->insertConstant(beta),
                     g->insertConstant(shifts[i])})
              ->node()
              ->input(0)
              ->node();
      std::replace(values.begin(), values.end(), bn->output(), op->output(0));
      bn->output()->replaceAllUsesWith(op->output(0));
      bn->destroy();
      moments.push_back(op->output(1));
      coefs.push_back(op->output(2));
      outputs.push_back(op->output(0));
    } else {
      torch::jit::WithInsertPoint guard(v->node()->kind() == c10::prim::Param
                                            ? g->block()->nodes().front()
                                            : v->node()->next());
      torch::jit::Value* shift = g->insertConstant(shifts[i]);
      torch::jit::Node* op =
          g->insert(kRowMoments, {v, shift})->node()->input(0)->node();
      moments.push_back(op->output(0));
      coefs.push_back(op->output(1));
      outputs.push_back(v);
    }
  }
  std::vector<torch::jit::Value*> all = values;
  all.insert(all.end(), moments.begin(), moments.end());
  all.insert(all.end(), coefs.begin(), coefs.end());
  all.insert(all.end(), outputs.begin(), outputs.end());
  g->eraseOutput(0);
  g->registerOutput(g->insertNode(g->createTuple(all))->output());
  torch::jit::EliminateDeadCode(g->block());
  return g;
}

// torch::optim::Adam with its default betas and eps, no weight decay or
// AMSGrad, for the one tensor Distill optimises: on the CPU in float, one
// pass over the tensor, its gradient and the two moments instead of seven
// tensor ops and two temporaries (the same arithmetic, element by element);
// elsewhere torch::optim::Adam itself.
class InputAdam {
 public:
  InputAdam(const torch::Tensor& x, double lr) : x_(x), lr_(lr) {
    if (OnCpuInFloat(x) && x.is_contiguous()) {
      m_ = torch::zeros_like(x);
      v_ = torch::zeros_like(x);
    } else {
      adam_ = std::make_unique<torch::optim::Adam>(
          std::vector<torch::Tensor>{x}, torch::optim::AdamOptions(lr));
    }
  }

  void ZeroGrad() { x_.mutable_grad() = torch::Tensor(); }

  void SetLr(double lr) {
    lr_ = lr;
    if (adam_ == nullptr) return;
    for (auto& group : adam_->param_groups()) {
      static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
    }
  }

  void Step() {
    if (adam_ != nullptr) {
      adam_->step();
      return;
    }
    if (!x_.grad().defined()) return;
    ++step_;
    const double bias_correction1 = 1 - std::pow(kBeta1, step_);
    const double bias_correction2 = 1 - std::pow(kBeta2, step_);
    const float b1 = kBeta1, c1 = 1 - kBeta1, b2 = kBeta2, c2 = 1 - kBeta2;
    const float sqrt_bc2 = std::sqrt(bias_correction2);
    const float eps = kEps;
    const float step_size = -(lr_ / bias_correction1);
    const torch::Tensor g = x_.grad().to(torch::kFloat).contiguous();
    const float* pg = g.data_ptr<float>();
    float* px = x_.data_ptr<float>();
    float* pm = m_.data_ptr<float>();
    float* pv = v_.data_ptr<float>();
    ParallelFor(x_.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
#if defined(__SSE2__)
      // The same operations four lanes at a time (the compiler leaves a
      // loop with std::sqrt scalar, for errno).
      const __m128 vb1 = _mm_set1_ps(b1), vc1 = _mm_set1_ps(c1);
      const __m128 vb2 = _mm_set1_ps(b2), vc2 = _mm_set1_ps(c2);
      const __m128 vbc2 = _mm_set1_ps(sqrt_bc2), veps = _mm_set1_ps(eps);
      const __m128 vstep = _mm_set1_ps(step_size);
      for (; i + 4 <= end; i += 4) {
        const __m128 g = _mm_loadu_ps(pg + i);
        const __m128 m = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(pm + i), vb1),
                                    _mm_mul_ps(vc1, g));
        const __m128 v = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(pv + i), vb2),
                                    _mm_mul_ps(_mm_mul_ps(vc2, g), g));
        _mm_storeu_ps(pm + i, m);
        _mm_storeu_ps(pv + i, v);
        const __m128 denom = _mm_add_ps(_mm_div_ps(_mm_sqrt_ps(v), vbc2), veps);
        _mm_storeu_ps(px + i,
                      _mm_add_ps(_mm_loadu_ps(px + i),
                                 _mm_div_ps(_mm_mul_ps(vstep, m), denom)));
      }
#endif
      for (; i < end; ++i) {
        pm[i] = pm[i] * b1 + c1 * pg[i];
        pv[i] = pv[i] * b2 + c2 * pg[i] * pg[i];
        const float denom = std::sqrt(pv[i]) / sqrt_bc2 + eps;
        px[i] = px[i] + step_size * pm[i] / denom;
      }
    });
    torch::autograd::impl::bump_version(x_);
  }

 private:
  static constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8;
  torch::Tensor x_, m_, v_;
  double lr_;
  int64_t step_ = 0;
  std::unique_ptr<torch::optim::Adam> adam_;  // not on the CPU in float
};

}  // namespace

bool ConvergenceCheck::Add(double loss) {
  const double previous =
      best_.empty() ? std::numeric_limits<double>::infinity() : best_.back();
  best_.push_back(std::isnan(loss) ? previous : std::min(previous, loss));
  const int t = static_cast<int>(best_.size());
  if (window_ <= 0 || t <= window_) return false;
  const double before = best_[t - 1 - window_];
  return std::isfinite(before) && before - best_.back() <= tolerance_ * before;
}

absl::Status ValidateDistillOptions(const DistillOptions& o) {
  auto bad = [](absl::string_view field, auto value, absl::string_view want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "distillation option ", field, " = ", value, ": must be ", want));
  };
  if (!kBatchSize.Contains(o.batch_size))
    return bad("batch_size", o.batch_size, kBatchSize.Describe());
  if (!kNumBatches.Contains(o.num_batches))
    return bad("num_batches", o.num_batches, kNumBatches.Describe());
  if (!kIterations.Contains(o.iterations))
    return bad("iterations", o.iterations, kIterations.Describe());
  if (!kLearningRate.Contains(o.lr))
    return bad("lr", o.lr, kLearningRate.Describe());
  if (!kEarlyStopWindow.Contains(o.early_stop_window)) {
    return bad("early_stop_window", o.early_stop_window,
               kEarlyStopWindow.Describe());
  }
  if (!kEarlyStopTolerance.Contains(o.early_stop_tolerance)) {
    return bad("early_stop_tolerance", o.early_stop_tolerance,
               kEarlyStopTolerance.Describe());
  }
  if (!kTvWeight.Contains(o.tv_weight))
    return bad("tv_weight", o.tv_weight, kTvWeight.Describe());
  if (!(o.plateau_factor > 0 && o.plateau_factor < 1))
    return bad("plateau_factor", o.plateau_factor, "in (0, 1)");
  if (o.plateau_patience < 0)
    return bad("plateau_patience", o.plateau_patience, ">= 0");
  if (!(o.min_lr >= 0)) return bad("min_lr", o.min_lr, ">= 0");
  if (!(o.eps > 0)) return bad("eps", o.eps, "> 0");
  return absl::OkStatus();
}

struct BnStatisticsLoss::Impl {
  Impl(std::shared_ptr<torch::jit::Graph> g,
       std::shared_ptr<torch::jit::Graph> stats, const c10::IValue& self)
      : probe(std::move(g), self), stats_probe(std::move(stats), self) {}

  // One term's per-channel targets in double (as the float tensors hold
  // them), and the mean in float, which the moments are taken about.
  struct Targets {
    std::vector<double> mu, sigma;
    std::vector<float> shift;
  };
  static Targets MakeTargets(const torch::Tensor& mean,
                             const torch::Tensor& std);

  // One statistics term of the current LossAndBackward call.
  struct Term {
    torch::Tensor value;  // as the probe returned it (the batch: input term)
    torch::Tensor x;      // its data as [n, c, l]; contiguous if fused
    const Targets* targets = nullptr;
    bool fused = false;    // OnCpuInFloat(): the kernels above
    torch::Tensor bn_out;  // the StatsBatchNorm output, which adds the term
    torch::Tensor coef;    // [2, n * c] float on the host: a, then b
    torch::Tensor a, b;    // not fused: a and b as [n, c, 1] on x's device
  };

  // grad + the term's own gradient a + b * x, in one pass where fused (into
  // grad itself if `in_place` and its layout allows). `grad` may be
  // undefined (zero).
  torch::Tensor AddTermGradient(const Term& t, const torch::Tensor& grad,
                                bool in_place);

  // Adds a term's gradient to the gradient arriving at its value just
  // before the value's grad_fn runs: the backward needs no root for it, and
  // autograd no extra sum. (For values no StatsBatchNorm reads.)
  class TermHook : public torch::autograd::FunctionPreHook {
   public:
    TermHook(Impl* impl, size_t term, uint32_t slot)
        : impl_(impl), term_(term), slot_(slot) {}
    torch::autograd::variable_list operator()(
        const torch::autograd::variable_list& grads) override {
      // In place when the engine's list is the only holder of a gradient
      // that shares no storage (what autograd checks before summing in
      // place); a gradient another edge also receives must stay as it is.
      const torch::Tensor& g = grads[slot_];
      const bool owned =
          g.defined() && g.use_count() == 1 && g.storage().use_count() == 1;
      torch::autograd::variable_list out = grads;
      out[slot_] = impl_->AddTermGradient(impl_->terms[term_], out[slot_],
                                          /*in_place=*/owned);
      return out;
    }

   private:
    Impl* impl_;  // not the value itself: that would keep the graph alive
    size_t term_;
    uint32_t slot_;
  };

  GraphProgram probe;        // the BN inputs
  GraphProgram stats_probe;  // StatsProbeGraph()
  std::vector<torch::Tensor> target_mean, target_std;
  DistillOptions options;
  std::vector<Targets> targets;  // per BN layer
  Targets input_targets;         // mean 0, std 1 for the input's channels
  torch::Tensor input_shift;     // zeros, on the input's device

  std::vector<Term> terms;  // LossAndBackward's, while it runs
};

BnStatisticsLoss::Impl::Targets BnStatisticsLoss::Impl::MakeTargets(
    const torch::Tensor& mean, const torch::Tensor& std) {
  torch::Tensor m = mean.to(torch::kCPU, torch::kDouble).contiguous();
  torch::Tensor s = std.to(torch::kCPU, torch::kDouble).contiguous();
  Targets t;
  t.mu.assign(m.data_ptr<double>(), m.data_ptr<double>() + m.numel());
  t.sigma.assign(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
  t.shift.assign(t.mu.begin(), t.mu.end());
  return t;
}

torch::Tensor BnStatisticsLoss::Impl::AddTermGradient(const Term& t,
                                                      const torch::Tensor& grad,
                                                      bool in_place) {
  const torch::IntArrayRef sizes = t.value.sizes();
  if (!t.fused) {
    torch::Tensor g = torch::addcmul(t.a, t.b, t.x).view(sizes);
    if (!grad.defined()) return g;
    return in_place ? grad.add_(g) : grad + g;
  }
  const int64_t rows = t.x.size(0) * t.x.size(1), len = t.x.size(2);
  const float* a = t.coef.data_ptr<float>();
  const float* b = a + rows;
  const float* x = t.x.data_ptr<float>();
  if (!grad.defined()) {
    torch::Tensor out = at::empty(sizes, t.x.options());
    AddAffine(x, nullptr, nullptr, out.data_ptr<float>(), rows, len, 1, a, b);
    return out;
  }
  // (A fused term's value, hence its gradient, is float.)
  if (in_place && grad.is_contiguous()) {
    float* g = grad.data_ptr<float>();
    AddAffine(x, g, nullptr, g, rows, len, 1, a, b);
    return grad;
  }
  if (in_place) {  // keeps grad's layout (a leaf's .grad follows the leaf's)
    return grad.add_(AddTermGradient(t, torch::Tensor(), false));
  }
  torch::Tensor in = grad.contiguous();
  torch::Tensor out = at::empty(sizes, t.x.options());
  AddAffine(x, in.data_ptr<float>(), nullptr, out.data_ptr<float>(), rows, len,
            1, a, b);
  return out;
}

BnStatisticsLoss::BnStatisticsLoss(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
BnStatisticsLoss::~BnStatisticsLoss() = default;

absl::StatusOr<std::unique_ptr<BnStatisticsLoss>> BnStatisticsLoss::Create(
    const Model& model, const DistillOptions& options) {
  ZQ_RETURN_IF_ERROR(ValidateDistillOptions(options));
  return CallTorch(
      "building the BatchNorm statistics probe",
      [&] {
        std::shared_ptr<torch::jit::Graph> g = model.graph();
        std::vector<torch::jit::Node*> nodes = Model::Nodes(*g);
        std::vector<ValueRef> refs;
        auto impl_targets_mean = std::vector<torch::Tensor>();
        auto impl_targets_std = std::vector<torch::Tensor>();
        for (const BnLayer& bn : model.summary().bn_layers) {
          torch::jit::Node* n = nodes.at(bn.node_index);
          // The BN's real input: whatever value flows into it.
          torch::jit::Value* in = n->input(0);
          if (in->node()->owningBlock() != g->block() &&
              in->node()->kind() != c10::prim::Param) {
            throw std::runtime_error("BN input inside control flow");
          }
          ValueRef ref;
          if (in->node()->kind() == c10::prim::Param) {
            ref.node_index = -1;
            ref.output = static_cast<int>(in->offset());
          } else {
            auto it = std::find(nodes.begin(), nodes.end(), in->node());
            ref.node_index = static_cast<int>(it - nodes.begin());
            ref.output = static_cast<int>(in->offset());
          }
          refs.push_back(ref);
          torch::Tensor mean = torch::jit::toIValue(n->input(3))->toTensor();
          torch::Tensor var = torch::jit::toIValue(n->input(4))->toTensor();
          impl_targets_mean.push_back(mean.detach().to(torch::kFloat));
          impl_targets_std.push_back(
              torch::sqrt(var.detach().to(torch::kFloat) + options.eps));
        }
        std::shared_ptr<torch::jit::Graph> probe = ProbeGraph(*g, refs);
        std::shared_ptr<torch::jit::Graph> stats =
            StatsProbeGraph(*probe, impl_targets_mean);
        auto impl = std::make_unique<Impl>(std::move(probe), std::move(stats),
                                           model.frozen()._ivalue());
        impl->target_mean = std::move(impl_targets_mean);
        impl->target_std = std::move(impl_targets_std);
        impl->options = options;
        for (size_t i = 0; i < impl->target_mean.size(); ++i) {
          impl->targets.push_back(
              Impl::MakeTargets(impl->target_mean[i], impl->target_std[i]));
        }
        return std::unique_ptr<BnStatisticsLoss>(
            new BnStatisticsLoss(std::move(impl)));
      },
      absl::StatusCode::kInternal);
}

// The statistics terms of every BN input (and of the input itself) at once,
// with their gradient in closed form: for a term with count L, mean m and
// std s, dL/dx = dL/dm / L + dL/ds * (x - m) / ((L - 1) * s), i.e. a + b * x
// per row. The statistics probe computes each value's row moments as the
// value's BatchNorm reads it (StatsBatchNorm), or right after the value
// (row_moments); the per-channel arithmetic is a plain loop in double; then
// the backward adds a + b * x where the gradient passes each value: in
// StatsBatchNorm's backward, else in a hook on the value's grad_fn (TermHook;
// a value no other value's backward reaches is a root, with a + b * x as
// its gradient). So a BN input that its BN reads is read no more often than
// by the model's own forward and backward; any other costs a pass each way.
torch::Tensor BnStatisticsLoss::LossAndBackward(const torch::Tensor& batch) {
  Impl& m = *impl_;
  const DistillOptions& o = m.options;
  m.terms.clear();
  std::vector<torch::Tensor> out = m.stats_probe.Run(batch);
  const size_t num_values = out.size() / 4;
  auto part = [&](size_t k) {
    return std::vector<torch::Tensor>(out.begin() + k * num_values,
                                      out.begin() + (k + 1) * num_values);
  };
  const std::vector<torch::Tensor> values = part(0), coefs = part(2),
                                   bn_outs = part(3);
  std::vector<torch::Tensor> moments = part(1);
  if (o.match_input_stats && batch.dim() >= 2) {
    const int64_t c = batch.size(1);
    if (!m.input_shift.defined() || m.input_shift.size(0) != c ||
        m.input_shift.device() != batch.device()) {
      m.input_shift = torch::zeros({c}, batch.options().dtype(torch::kFloat));
      m.input_targets =
          Impl::MakeTargets(m.input_shift, torch::ones({c}, torch::kFloat));
    }
    moments.push_back(RowMoments(batch, m.input_shift));
  }

  // Moments computed on another device come to the host in one copy.
  {
    std::vector<torch::Tensor> remote;
    for (const torch::Tensor& s : moments) {
      if (!s.is_cpu()) remote.push_back(s);
    }
    if (!remote.empty()) {
      torch::Tensor host = torch::cat(remote, 1).to(torch::kCPU);
      int64_t offset = 0;
      for (torch::Tensor& s : moments) {
        if (s.is_cpu()) continue;
        const int64_t r = s.size(1);
        s = host.narrow(1, offset, r).contiguous();
        offset += r;
      }
    }
  }

  // Per channel (of each sample, or of the batch): the term's value and its
  // gradient's coefficients.
  double loss = 0;
  for (size_t i = 0; i < moments.size(); ++i) {
    const bool is_input = i == num_values;
    Impl::Term t;
    t.value = is_input ? batch : values[i];
    t.targets = is_input ? &m.input_targets : &m.targets[i];
    const int64_t n = t.value.size(0), c = t.value.size(1);
    t.x = t.value.detach().reshape({n, c, -1});
    t.fused = OnCpuInFloat(t.x);
    if (t.fused) t.x = t.x.contiguous();
    const bool in_bn = !is_input && coefs[i].numel() > 0;
    if (in_bn) t.bn_out = bn_outs[i];
    t.coef = in_bn ? coefs[i] : torch::empty({2, n * c}, torch::kFloat);

    const int64_t len = t.x.size(2);
    const bool per_sample = o.stats == DistillStats::kPerSample && len > 1;
    const Impl::Targets& tg = *t.targets;
    const double count = static_cast<double>(per_sample ? len : n * len);
    const double dof = std::max(count - 1.0, 1.0);
    const double weight = per_sample ? 1.0 / n : 1.0;
    auto term = [&](int64_t ch, double s1, double s2, float* a, float* b) {
      const double offset = s1 / count;  // mean - shift
      const double var = std::max((s2 - s1 * offset) / dof, 0.0);
      const double sd = std::sqrt(var + o.eps);
      const double mean = tg.shift[ch] + offset;
      const double dm = tg.mu[ch] - mean, ds = tg.sigma[ch] - sd;
      loss += weight * (dm * dm + ds * ds);
      const double bc = -2.0 * weight * ds / (dof * sd);
      *a = static_cast<float>(-2.0 * weight * dm / count - bc * mean);
      *b = static_cast<float>(bc);
    };
    const double* s1 = moments[i].data_ptr<double>();
    const double* s2 = s1 + n * c;
    float* a = t.coef.data_ptr<float>();
    float* b = a + n * c;
    if (per_sample) {
      for (int64_t r = 0; r < n * c; ++r) {
        term(r % c, s1[r], s2[r], a + r, b + r);
      }
    } else {
      for (int64_t ch = 0; ch < c; ++ch) {
        double m1 = 0, m2 = 0;
        for (int64_t k = 0; k < n; ++k) {
          m1 += s1[k * c + ch];
          m2 += s2[k * c + ch];
        }
        term(ch, m1, m2, a + ch, b + ch);
        for (int64_t k = 1; k < n; ++k) {
          a[k * c + ch] = a[ch];
          b[k * c + ch] = b[ch];
        }
      }
    }
    if (!t.fused) {
      auto coefficients = [&](const float* p) {
        return torch::from_blob(const_cast<float*>(p), {n, c, 1}, torch::kFloat)
            .to(t.x.device(), t.x.scalar_type(), /*non_blocking=*/false,
                /*copy=*/true);
      };
      t.a = coefficients(a);
      t.b = coefficients(b);
    }
    m.terms.push_back(std::move(t));
  }

  // Where the backward starts, found by autograd's own walk of the graph
  // (nothing runs): a StatsBatchNorm adds its term if its backward runs,
  // i.e. if another value's backward reaches its output (the last BN's
  // output leads to no value: the probe keeps it for the model's shape
  // checks). The other terms are added where the backward reaches their
  // value (TermHook), or start it where nothing does.
  std::vector<bool> in_bn(num_values);
  for (size_t i = 0; i < num_values; ++i) {
    in_bn[i] = m.terms[i].bn_out.defined() && m.terms[i].bn_out.requires_grad();
  }
  auto edge = [&](size_t i) {
    const torch::Tensor& v = in_bn[i] ? m.terms[i].bn_out : values[i];
    return std::make_pair(v.grad_fn().get(), v.output_nr());
  };
  std::set<std::pair<const torch::autograd::Node*, uint32_t>> fed;
  for (bool changed = true; changed;) {
    fed.clear();
    std::vector<torch::autograd::Node*> stack;
    std::unordered_set<const torch::autograd::Node*> seen;
    for (size_t i = 0; i < num_values; ++i) {
      torch::autograd::Node* fn = edge(i).first;
      if (fn != nullptr && seen.insert(fn).second) stack.push_back(fn);
    }
    while (!stack.empty()) {
      torch::autograd::Node* fn = stack.back();
      stack.pop_back();
      for (const torch::autograd::Edge& e : fn->next_edges()) {
        if (!e.is_valid()) continue;
        fed.insert({e.function.get(), e.input_nr});
        if (seen.insert(e.function.get()).second) {
          stack.push_back(e.function.get());
        }
      }
    }
    // A StatsBatchNorm nothing reaches does not run, and what only it
    // reached is not reached either: walk again without it.
    changed = false;
    for (size_t i = 0; i < num_values; ++i) {
      if (in_bn[i] && fed.count(edge(i)) == 0) {
        in_bn[i] = false;
        changed = true;
      }
    }
  }
  std::vector<torch::Tensor> roots, root_grads;
  for (size_t i = 0; i < num_values; ++i) {
    const torch::Tensor& v = values[i];
    if (in_bn[i] || !v.requires_grad()) continue;
    const auto [fn, slot] = edge(i);
    if (fn != nullptr && fed.count({fn, slot}) > 0) {
      v.grad_fn()->add_pre_hook(std::make_unique<Impl::TermHook>(&m, i, slot));
    } else {
      roots.push_back(v);
      root_grads.push_back(
          m.AddTermGradient(m.terms[i], torch::Tensor(), /*in_place=*/false));
    }
  }
  if (!roots.empty()) torch::autograd::backward(roots, root_grads);
  if (m.terms.size() > num_values) {
    torch::NoGradGuard no_grad;
    batch.mutable_grad() = m.AddTermGradient(m.terms.back(), batch.grad(),
                                             /*in_place=*/true);
  }
  m.terms.clear();
  if (o.tv_weight > 0) {
    if (!batch.grad().defined()) {
      batch.mutable_grad() = torch::zeros_like(batch);
    }
    loss += AddTotalVariationGradient(batch.detach(), o.tv_weight,
                                      batch.mutable_grad());
  }
  return torch::scalar_tensor(loss, batch.options());
}

torch::Tensor BnStatisticsLoss::Loss(const torch::Tensor& batch) {
  std::vector<torch::Tensor> values = impl_->probe.Run(batch);
  torch::Tensor loss = torch::zeros({}, batch.options());
  for (size_t i = 0; i < values.size(); ++i) {
    loss = loss + StatsTerm(values[i], impl_->target_mean[i],
                            impl_->target_std[i], impl_->options);
  }
  if (impl_->options.match_input_stats && batch.dim() >= 2) {
    const int64_t c = batch.size(1);
    loss = loss + StatsTerm(batch, torch::zeros({c}, batch.options()),
                            torch::ones({c}, batch.options()), impl_->options);
  }
  if (impl_->options.tv_weight > 0) {
    loss = loss + TotalVariation(batch, impl_->options.tv_weight);
  }
  return loss;
}

absl::StatusOr<double> BnStatisticsLoss::Evaluate(const torch::Tensor& batch) {
  return CallTorch("BatchNorm statistics loss", [&] {
    torch::NoGradGuard no_grad;
    return Loss(batch).item<double>();
  });
}

absl::StatusOr<std::vector<BnStatisticsLoss::LayerStats>>
BnStatisticsLoss::Measure(const torch::Tensor& batch) {
  return CallTorch("BatchNorm statistics", [&] {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> values = impl_->probe.Run(batch);
    std::vector<LayerStats> out;
    for (size_t i = 0; i < values.size(); ++i) {
      const int64_t c = values[i].size(1);
      torch::Tensor t = values[i].transpose(0, 1).reshape({c, -1});
      out.push_back({t.mean(1),
                     torch::sqrt(t.var(1, true) + impl_->options.eps),
                     impl_->target_mean[i], impl_->target_std[i]});
    }
    return out;
  });
}

absl::StatusOr<DistilledData> Distill(const Model& model,
                                      const std::vector<int64_t>& sample_shape,
                                      const DistillOptions& options,
                                      const DistillProgressFn& progress,
                                      const CancellationToken* cancel) {
  ZQ_RETURN_IF_ERROR(ValidateDistillOptions(options));
  std::vector<int64_t> shape = {options.batch_size};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  ZQ_RETURN_IF_ERROR(model.CheckInputShape(shape));
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<BnStatisticsLoss> loss_fn,
                      BnStatisticsLoss::Create(model, options));

  DistilledData data;
  for (int b = 0; b < options.num_batches; ++b) {
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "distillation"));
    absl::Status status = CallTorch(
        "distillation",
        [&] {
          auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed +
                                                              1000003ULL * b);
          torch::Tensor init;
          if (options.init == DistillInit::kReference) {
            init = (torch::randint(0, 255, shape, gen, torch::kFloat) - 127.5) /
                   5418.75;
          } else {
            init = torch::randn(shape, gen, torch::kFloat);
          }
          torch::Tensor x = init.to(model.device()).set_requires_grad(true);
          InputAdam adam(x, options.lr);
          PlateauScheduler scheduler(options.lr, options.plateau_factor,
                                     options.plateau_patience, options.min_lr);
          double first = std::numeric_limits<double>::quiet_NaN();
          ConvergenceCheck converged(options.early_stop_window,
                                     options.early_stop_tolerance);
          int run = 0;
          for (int it = 0; it < options.iterations; ++it) {
            if (cancel != nullptr && cancel->IsCancelled()) return;
            adam.ZeroGrad();
            torch::Tensor loss = loss_fn->LossAndBackward(x);
            adam.Step();
            const double value = loss.item<double>();
            if (it == 0) first = value;
            const double used_lr = scheduler.lr();
            if (options.plateau_scheduler) {
              adam.SetLr(scheduler.Step(value));
            }
            run = it + 1;
            // The last iteration needs no stop: it ends the batch anyway.
            const bool stop =
                converged.Add(value) && it + 1 < options.iterations;
            if (progress) {
              progress({b, options.num_batches, it + 1, options.iterations,
                        value, used_lr, stop});
            }
            if (stop) break;
          }
          torch::Tensor result = x.detach();
          data.batches.push_back(result);
          data.initial_loss.push_back(first);
          data.iterations.push_back(run);
        },
        absl::StatusCode::kInternal);
    ZQ_RETURN_IF_ERROR(status);
    ZQ_RETURN_IF_ERROR(CheckCancelled(cancel, "distillation"));
    ZQ_ASSIGN_OR_RETURN(double final_loss,
                        loss_fn->Evaluate(data.batches.back()));
    if (std::isnan(data.initial_loss.back()))
      data.initial_loss.back() = final_loss;
    data.final_loss.push_back(final_loss);
  }
  return data;
}

}  // namespace zeroq::core
