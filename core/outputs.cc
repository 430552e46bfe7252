#include "core/outputs.h"

namespace zeroq::core {
namespace {

void Collect(const c10::IValue& v, std::vector<torch::Tensor>& out) {
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const c10::IValue& e : v.toTupleRef().elements()) Collect(e, out);
  } else if (v.isList()) {
    for (const c10::IValue& e : v.toListRef()) Collect(e, out);
  } else if (v.isGenericDict()) {
    for (const auto& entry : v.toGenericDict()) Collect(entry.value(), out);
  }
  // None (an Optional output left empty) and anything else hold no tensor.
}

// 0: holds no tensor; 1: tensors only; -1: something that is not a tensor.
int Classify(const c10::TypePtr& type) {
  switch (type->kind()) {
    case c10::TypeKind::TensorType:
      return 1;
    case c10::TypeKind::NoneType:
      return 0;
    case c10::TypeKind::OptionalType:
      return Classify(type->expectRef<c10::OptionalType>().getElementType());
    case c10::TypeKind::ListType:
      return Classify(type->expectRef<c10::ListType>().getElementType());
    case c10::TypeKind::DictType:
      return Classify(type->expectRef<c10::DictType>().getValueType());
    case c10::TypeKind::TupleType: {
      int found = 0;
      for (const c10::TypePtr& e : type->expectRef<c10::TupleType>().elements()) {
        const int c = Classify(e);
        if (c < 0) return -1;
        found |= c;
      }
      return found;
    }
    default:
      return -1;
  }
}

}  // namespace

std::vector<torch::Tensor> OutputTensors(const c10::IValue& output) {
  std::vector<torch::Tensor> out;
  Collect(output, out);
  return out;
}

bool IsTensorOutputType(const c10::TypePtr& type) { return Classify(type) == 1; }

std::vector<torch::Tensor> LogProbs(const std::vector<torch::Tensor>& outputs) {
  std::vector<torch::Tensor> out;
  out.reserve(outputs.size());
  for (const torch::Tensor& t : outputs) {
    const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    out.push_back(torch::log_softmax(t.reshape({rows, -1}).to(torch::kFloat), 1));
  }
  return out;
}

double OutputsKl(const std::vector<torch::Tensor>& log_p,
                 const std::vector<torch::Tensor>& log_q) {
  double kl = 0;
  for (size_t i = 0; i < log_p.size() && i < log_q.size(); ++i) {
    kl += (log_p[i].exp() * (log_p[i] - log_q[i])).sum().item<double>();
  }
  return kl;
}

}  // namespace zeroq::core
