#include "core/pipeline.h"

#include <ATen/Parallel.h>
#include <malloc.h>
#include <sys/stat.h>

#include <functional>
#include <memory>
#include <set>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/config_schema.h"
#include "common/status_macros.h"
#include "core/distill.h"
#include "core/model.h"
#include "core/outputs.h"
#include "core/quantized_model.h"
#include "core/reconstruct.h"
#include "core/torch_status.h"

namespace zeroq::core {

void SetUpProcess(int threads) {
  at::set_num_threads(threads);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
}

namespace {

// Every weight and activation width is 8 bits or more or float, without a
// budget and without learned rounding asked for: there the distilled data
// only sets the activation ranges.
bool IsEightBitJob(const JobSpec& spec) {
  auto wide = [](int bits) { return bits == 0 || bits >= 8; };
  const QuantOptions& q = spec.quant;
  bool eight = !spec.budget.has_value() && wide(q.weight_bits) &&
               wide(q.activation_bits) &&
               (spec.reconstruct.method == ReconstructMethod::kNone ||
                spec.reconstruct.method == ReconstructMethod::kAuto);
  for (const auto& [name, bits] : q.layer_bits) eight = eight && wide(bits);
  return eight;
}

}  // namespace

int DefaultDistillIterations(const JobSpec& spec) {
  return IsEightBitJob(spec) ? kEightBitIterations
                             : static_cast<int>(kIterations.def);
}

double DefaultTvWeight(const JobSpec& spec) {
  return IsEightBitJob(spec) ? 0.0 : kTvWeight.def;
}

absl::Status ValidateJobSpec(const Model& model, const JobSpec& spec) {
  ZQ_RETURN_IF_ERROR(ValidateQuantOptions(model, spec.quant));
  ZQ_RETURN_IF_ERROR(ValidateDistillOptions(spec.distill));
  ZQ_RETURN_IF_ERROR(ValidateReconstructOptions(spec.reconstruct));
  if (!kThreads.Contains(spec.threads)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "threads = ", spec.threads, ": must be ", kThreads.Describe()));
  }
  if (spec.measured_points < 0 || spec.measured_points > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "measured_points = ", spec.measured_points, ": must be 0..64"));
  }
  if (spec.budget.has_value()) {
    if (spec.sensitivity.bits.empty()) {
      return absl::InvalidArgumentError("candidate_bits: none given");
    }
    std::set<int> seen;
    for (int k : spec.sensitivity.bits) {
      if (!kCandidateBits.Contains(k)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "candidate_bits: ", k, " is outside ", kCandidateBits.Describe()));
      }
      if (!seen.insert(k).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("candidate_bits: ", k, " is repeated"));
      }
    }
    // A re-plan without explicit widths plans with the stored table's.
    if (spec.precomputed_sensitivity.empty() || !spec.replan_widths.empty()) {
      std::vector<LayerSize> layers;
      for (const QuantLayer& l : model.summary().layers)
        layers.push_back({l.name, l.params});
      absl::Status reachable =
          CheckBudgetReachable(BudgetText(*spec.budget), *spec.budget, layers,
                               spec.sensitivity.bits, spec.quant.layer_bits);
      if (!reachable.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("budget: ", reachable.message()));
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// Layers of a module ZeroQ's graph analysis rejected (no usable BatchNorm):
// its nn.Conv1d/2d/3d and nn.Linear submodules, found by class name. Only the
// service's model summary uses this; RunJob never runs such a model.
absl::Status ModuleLayers(const torch::jit::Module& module, ModelInfo* info) {
  return CallTorch("analysing the model", [&] {
    for (const auto& p : module.named_parameters(/*recurse=*/true)) {
      info->total_params += p.value.numel();
    }
    for (const auto& b : module.named_buffers(/*recurse=*/true)) {
      if (b.value.defined()) info->total_params += b.value.numel();
    }
    for (const auto& sub : module.named_modules()) {
      const auto& type_name = sub.value.type()->name();
      if (!type_name.has_value()) continue;
      const std::string cls = type_name->name();
      std::string kind;
      if (cls == "Conv1d" || cls == "Conv2d" || cls == "Conv3d") {
        kind = "conv";
      } else if (cls == "Linear") {
        kind = "linear";
      } else {
        continue;
      }
      if (!sub.value.hasattr("weight")) continue;
      c10::IValue w = sub.value.attr("weight");
      if (!w.isTensor() || !w.toTensor().defined()) continue;
      ModelInfo::Layer layer;
      layer.name = sub.name;
      layer.kind = kind;
      layer.weight_shape = w.toTensor().sizes().vec();
      layer.params = w.toTensor().numel();
      info->quantizable_params += layer.params;
      info->layers.push_back(std::move(layer));
    }
  });
}

}  // namespace

absl::StatusOr<ModelInfo> InspectModel(const std::string& path,
                                       const std::vector<int64_t>& input_shape,
                                       const std::string& device) {
  if (input_shape.empty()) {
    return absl::InvalidArgumentError(
        "input_shape is required: one sample without the batch dimension, "
        "e.g. 3,224,224");
  }
  std::vector<int64_t> shape = {1};
  shape.insert(shape.end(), input_shape.begin(), input_shape.end());
  for (int64_t d : shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input shape [", absl::StrJoin(input_shape, ","),
          "] must have positive sizes"));
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read model file ", path));
  }

  ModelInfo info;
  // The forward to run: the analysed model's, or the raw module's when the
  // analysis rejected the model for want of usable BatchNorm layers.
  std::function<absl::StatusOr<std::vector<torch::Tensor>>(const torch::Tensor&)>
      forward;
  std::unique_ptr<Model> model;
  torch::jit::Module raw;
  absl::StatusOr<std::unique_ptr<Model>> loaded = Model::LoadFromFile(path, device);
  if (loaded.ok()) {
    model = std::move(*loaded);
    const ModelSummary& s = model->summary();
    for (const BnLayer& bn : s.bn_layers) info.bn_layers.emplace_back(bn.name, bn.channels);
    for (const QuantLayer& l : s.layers) {
      info.layers.push_back({l.name, l.kind == LayerKind::kLinear ? "linear" : "conv",
                             l.weight_shape, l.params, l.bn});
    }
    info.total_params = s.total_params;
    info.quantizable_params = s.quantizable_params;
    forward = [&](const torch::Tensor& x) { return model->Forward(x); };
  } else if (loaded.status().code() == absl::StatusCode::kFailedPrecondition) {
    // LoadFromFile has already checked that it is an archive with
    // forward(Tensor) returning tensors; only the BatchNorm analysis failed.
    ZQ_ASSIGN_OR_RETURN(
        raw, CallTorch("not a loadable TorchScript archive", [&] {
          torch::jit::Module m = torch::jit::load(path, torch::Device(device));
          m.eval();
          return m;
        }));
    ZQ_RETURN_IF_ERROR(ModuleLayers(raw, &info));
    forward = [&](const torch::Tensor& x) {
      return CallTorch("the model rejected the input", [&] {
        torch::NoGradGuard no_grad;
        return OutputTensors(raw.forward({x}));
      });
    };
  } else if (loaded.status().code() == absl::StatusCode::kResourceExhausted) {
    return loaded.status();
  } else {
    // Whatever else went wrong reading it, the upload is not a usable model.
    return absl::InvalidArgumentError(loaded.status().message());
  }

  absl::StatusOr<torch::Tensor> zeros = CallTorch("creating the input", [&] {
    return torch::zeros(shape, torch::TensorOptions().device(torch::Device(device)));
  });
  absl::StatusOr<std::vector<torch::Tensor>> out =
      zeros.ok() ? forward(*zeros) : zeros.status();
  if (!out.ok() && out.status().code() == absl::StatusCode::kResourceExhausted) {
    return out.status();
  }
  if (!out.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("input shape [", absl::StrJoin(input_shape, ","),
                     "] (batch [", absl::StrJoin(shape, ","),
                     "]) is rejected by the model: ", out.status().message()));
  }
  if (out->empty()) {
    return absl::InvalidArgumentError("the model returned no tensor");
  }
  // The first output tensor (the logits of a model that returns several).
  info.output_shape = out->front().sizes().vec();
  return info;
}

}  // namespace zeroq::core
