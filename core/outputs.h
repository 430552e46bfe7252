// outputs.h: a model's outputs as a flat list of tensors, whatever structure
// its forward returns.
//
//   std::vector<torch::Tensor> out = OutputTensors(module.forward({x}));
//   double kl = OutputsKl(LogProbs(float_out), LogProbs(quant_out));
//
// A forward may return a tensor, or tensors inside tuples, NamedTuples (e.g.
// torchvision's GoogLeNetOutputs), lists and dicts, nested; Optional entries
// that are None are skipped. ZeroQ's measures (sensitivity, agreement) use
// every output tensor; the exported model keeps the structure as it is.
#ifndef ZEROQ_CORE_OUTPUTS_H_
#define ZEROQ_CORE_OUTPUTS_H_

#include <vector>

#include <torch/script.h>

namespace zeroq::core {

// The tensors of `output`, depth first (tuple order, dict insertion order).
std::vector<torch::Tensor> OutputTensors(const c10::IValue& output);

// True if a forward return type can only hold tensors (Tensor, Optional of
// one, tuples, NamedTuples, lists and dicts of those) and holds at least
// one tensor.
bool IsTensorOutputType(const c10::TypePtr& type);

// log_softmax of each output over everything but its first (batch)
// dimension, in float.
std::vector<torch::Tensor> LogProbs(const std::vector<torch::Tensor>& outputs);

// Sum over the batch and over the outputs of KL(p || q), from log_softmax
// values as LogProbs makes them. REQUIRES: the same number and shapes.
double OutputsKl(const std::vector<torch::Tensor>& log_p,
                 const std::vector<torch::Tensor>& log_q);

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_OUTPUTS_H_
