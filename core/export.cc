#include "core/export.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/torch_status.h"

namespace zeroq::core {
namespace {

std::vector<double> ToVector(const torch::Tensor& t) {
  torch::Tensor c = t.detach().to(torch::kCPU, torch::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(),
                             c.data_ptr<double>() + c.numel());
}

}  // namespace

std::string RecipeJson(const Model& model, const QuantizedModel& qmodel,
                       const RecipeMeta& meta) {
  nlohmann::json j;
  j["format"] = "zeroq-recipe/1";
  j["input_shape"] = meta.input_shape;
  j["calibration"] = meta.calibration;
  j["weight_scheme"] =
      "per-output-channel asymmetric: scale=(2^k-1)/max(max-min,1e-8), "
      "zp=round(scale*min)+2^(k-1), q=clamp(round(scale*w-zp),-2^(k-1),"
      "2^(k-1)-1), w_hat=(q+zp)/scale; min/max of the channel, or with "
      "learned rounding (rounding not \"nearest\") a clip of them, and q is "
      "then given";
  j["activation_scheme"] = "per-tensor asymmetric, same formula";
  nlohmann::json layers = nlohmann::json::array();
  const auto& summary = model.summary().layers;
  for (size_t i = 0; i < qmodel.layers().size(); ++i) {
    const LayerQuantInfo& l = qmodel.layers()[i];
    const QuantLayer& src = summary[i];
    nlohmann::json e;
    e["name"] = l.name;
    e["op"] = src.op;
    e["weight_shape"] = src.weight_shape;
    e["params"] = l.params;
    e["bits"] = l.bits;
    e["bn"] = src.bn;
    if (l.bits > 0) {
      e["scale"] = ToVector(l.scale);
      e["zero_point"] = ToVector(l.zero_point);
      e["rounding"] = l.rounding;
      // Learned rounding: q is not round(scale * w - zp) of the float
      // weights, so the recipe carries it (row-major, weight_shape).
      if (l.learned_q.defined()) {
        torch::Tensor q = l.learned_q.to(torch::kCPU, torch::kInt).contiguous();
        e["q"] = std::vector<int>(q.data_ptr<int>(), q.data_ptr<int>() + q.numel());
      }
    }
    layers.push_back(std::move(e));
  }
  j["layers"] = std::move(layers);
  nlohmann::json acts = nlohmann::json::array();
  for (const ActivationSiteInfo& s : qmodel.sites()) {
    acts.push_back({{"name", s.name},
                    {"after", s.after},
                    {"range", s.range},
                    {"bits", s.quant.bits},
                    {"min", s.quant.lo},
                    {"max", s.quant.hi},
                    {"scale", s.quant.scale},
                    {"zero_point", s.quant.zero_point}});
  }
  j["activations"] = std::move(acts);
  j["weight_bytes"] = qmodel.weight_bytes();
  j["float_weight_bytes"] = model.summary().quantizable_params * 4.0;
  return j.dump(1);
}

absl::Status WriteFileAtomic(const std::string& path,
                             const std::string& contents) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  }
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return absl::InternalError(
          absl::StrCat("cannot write ", tmp, ": ", std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0 ||
      ::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("cannot write ", path, ": ", std::strerror(err)));
  }
  return absl::OkStatus();
}

absl::Status SaveTensor(const std::string& path,
                        const std::vector<torch::Tensor>& batches) {
  absl::StatusOr<std::vector<char>> bytes = CallTorch(
      "serialising tensors",
      [&] { return torch::pickle_save(torch::cat(batches).detach().cpu()); },
      absl::StatusCode::kInternal);
  if (!bytes.ok()) return bytes.status();
  return WriteFileAtomic(path, std::string(bytes->begin(), bytes->end()));
}

absl::StatusOr<torch::Tensor> LoadTensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open tensor file ", path));
  }
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  return CallTorch(absl::StrCat(path, " is not a tensor file"), [&] {
    c10::IValue v = torch::pickle_load(bytes);
    if (!v.isTensor()) throw std::runtime_error("it holds no single tensor");
    return v.toTensor();
  });
}

}  // namespace zeroq::core
