// Tests of Model: loading, the data-flow analysis that pairs BatchNorm layers
// with what really feeds them, parameter counts, and the load-time errors.
//
// Expected names and counts come from scripts/make_models.py and torchvision
// (checked with /usr/bin/python3: named_modules() of each tests/models file).
#include "core/model.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "core/options.h"
#include "core/quantized_model.h"
#include "core/test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::core {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::UnorderedElementsAreArray;


class ModelTest : public ::testing::Test {
 protected:
  // One intra-op thread: the models are tiny, and OpenMP threads that spin
  // at barriers slow down by orders of magnitude when other processes (a
  // parallel build) share the cores.
  void SetUp() override { at::set_num_threads(1); }

  static std::unique_ptr<Model> Load(const std::string& file) {
    return LoadTestModel(file);
  }

  static std::vector<std::string> LayerNames(const ModelSummary& s) {
    std::vector<std::string> out;
    for (const QuantLayer& l : s.layers) out.push_back(l.name);
    return out;
  }
  static std::vector<std::string> LayerBns(const ModelSummary& s) {
    std::vector<std::string> out;
    for (const QuantLayer& l : s.layers) out.push_back(l.bn);
    return out;
  }
  static std::vector<std::string> BnNames(const ModelSummary& s) {
    std::vector<std::string> out;
    for (const BnLayer& b : s.bn_layers) out.push_back(b.name);
    return out;
  }
  static std::vector<std::string> BnInputs(const ModelSummary& s) {
    std::vector<std::string> out;
    for (const BnLayer& b : s.bn_layers) out.push_back(b.input_from);
    return out;
  }
  static const QuantLayer* FindLayer(const ModelSummary& s,
                                     const std::string& name) {
    for (const QuantLayer& l : s.layers) {
      if (l.name == name) return &l;
    }
    return nullptr;
  }

  // Invariants every analysed model must satisfy: node indices address the
  // right ops (also in a copy of the graph), params = weight elements, BNs
  // that are fed by a layer name it and have its output width, and the
  // layer->bn links are the inverse of the bn->input_from links.
  static void CheckConsistent(const Model& model) {
    const ModelSummary& s = model.summary();
    std::shared_ptr<torch::jit::Graph> g = model.graph();
    std::shared_ptr<torch::jit::Graph> copy = g->copy();
    std::vector<torch::jit::Node*> nodes = Model::Nodes(*g);
    std::vector<torch::jit::Node*> copy_nodes = Model::Nodes(*copy);
    ASSERT_EQ(nodes.size(), copy_nodes.size());
    int64_t sum = 0;
    for (const QuantLayer& l : s.layers) {
      ASSERT_GE(l.node_index, 0) << l.name;
      ASSERT_LT(l.node_index, static_cast<int>(nodes.size())) << l.name;
      EXPECT_TRUE(IsQuantizableOp(*nodes[l.node_index])) << l.name;
      EXPECT_EQ(copy_nodes[l.node_index]->kind(), nodes[l.node_index]->kind());
      EXPECT_EQ(std::string(nodes[l.node_index]->kind().toQualString()), l.op);
      int64_t numel = 1;
      for (int64_t d : l.weight_shape) numel *= d;
      EXPECT_EQ(l.params, numel) << l.name;
      EXPECT_EQ(l.kind == LayerKind::kLinear, l.op == "aten::linear") << l.name;
      EXPECT_EQ(l.weight_shape.size(), l.kind == LayerKind::kLinear ? 2u : 4u)
          << l.name;
      sum += l.params;
    }
    EXPECT_EQ(s.quantizable_params, sum);
    EXPECT_GT(s.total_params, s.quantizable_params);
    std::set<std::string> names;
    for (const BnLayer& b : s.bn_layers) {
      EXPECT_TRUE(names.insert(b.name).second) << "duplicate " << b.name;
      ASSERT_GE(b.node_index, 0) << b.name;
      ASSERT_LT(b.node_index, static_cast<int>(nodes.size())) << b.name;
      EXPECT_EQ(nodes[b.node_index]->kind(), c10::aten::batch_norm) << b.name;
      EXPECT_EQ(copy_nodes[b.node_index]->kind(), c10::aten::batch_norm);
      EXPECT_GT(b.channels, 0);
      if (const QuantLayer* l = FindLayer(s, b.input_from)) {
        EXPECT_EQ(l->weight_shape[0], b.channels) << b.name;
        EXPECT_EQ(l->bn, b.name);
        EXPECT_LT(l->node_index, b.node_index) << b.name;
      } else {
        EXPECT_TRUE(absl::StartsWith(b.input_from, "aten::") ||
                    absl::StartsWith(b.input_from, "prim::"))
            << b.name << " <- " << b.input_from;
      }
    }
    for (const QuantLayer& l : s.layers) {
      if (l.bn.empty()) continue;
      bool found = false;
      for (const BnLayer& b : s.bn_layers) {
        found |= b.name == l.bn && b.input_from == l.name;
      }
      EXPECT_TRUE(found) << l.name << " -> " << l.bn;
    }
  }
};

// The reference pairs the i-th conv with the i-th BN by module order, which
// pairs pre<->bn1 and conv1<->bn2 here. Data flow gets every pair right.
TEST_F(ModelTest, TinyNoBnAfterConvPairsBatchNormByDataFlow) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  EXPECT_THAT(LayerNames(s), ElementsAre("pre", "conv1", "conv2", "fc"));
  EXPECT_THAT(LayerBns(s), ElementsAre("", "bn1", "bn2", ""));
  EXPECT_THAT(BnNames(s), ElementsAre("bn1", "bn2"));
  EXPECT_THAT(BnInputs(s), ElementsAre("conv1", "conv2"));
  ASSERT_EQ(s.bn_layers.size(), 2u);
  EXPECT_EQ(s.bn_layers[0].channels, 8);
  EXPECT_EQ(s.bn_layers[1].channels, 16);
  ASSERT_EQ(s.layers.size(), 4u);
  EXPECT_THAT(s.layers[0].weight_shape, ElementsAre(8, 3, 3, 3));
  EXPECT_THAT(s.layers[2].weight_shape, ElementsAre(16, 8, 3, 3));
  EXPECT_THAT(s.layers[3].weight_shape, ElementsAre(5, 16));
  EXPECT_EQ(s.layers[0].kind, LayerKind::kConv);
  EXPECT_EQ(s.layers[3].kind, LayerKind::kLinear);
  EXPECT_EQ(s.layers[0].op, "aten::conv2d");
  EXPECT_EQ(s.layers[3].op, "aten::linear");
  // 216 + 576 + 1152 + 80 (python: sum of conv/linear weight numel).
  EXPECT_EQ(s.quantizable_params, 2024);
  CheckConsistent(*model);
}

TEST_F(ModelTest, ResNetEveryConvHasItsBatchNorm) {
  std::unique_ptr<Model> model = Load("mini_resnet.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  const std::vector<std::string> convs = {
      "conv1",          "layer1.0.conv1", "layer1.0.conv2",
      "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0",
      "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0",
      "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"};
  const std::vector<std::string> bns = {
      "bn1",          "layer1.0.bn1", "layer1.0.bn2",
      "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1",
      "layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1",
      "layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1"};
  // Python: 12 Conv2d + 1 Linear, 12 BatchNorm2d.
  ASSERT_EQ(s.layers.size(), 13u);
  ASSERT_EQ(s.bn_layers.size(), 12u);
  EXPECT_THAT(BnNames(s), UnorderedElementsAreArray(bns));
  std::vector<std::string> all_layers = convs;
  all_layers.push_back("fc");
  EXPECT_THAT(LayerNames(s), UnorderedElementsAreArray(all_layers));
  for (size_t i = 0; i < convs.size(); ++i) {
    const QuantLayer* l = FindLayer(s, convs[i]);
    ASSERT_NE(l, nullptr) << convs[i];
    EXPECT_EQ(l->bn, bns[i]) << convs[i];
  }
  const QuantLayer* fc = FindLayer(s, "fc");
  ASSERT_NE(fc, nullptr);
  EXPECT_EQ(fc->bn, "");
  EXPECT_EQ(fc->kind, LayerKind::kLinear);
  for (const BnLayer& b : s.bn_layers) {
    auto it = std::find(bns.begin(), bns.end(), b.name);
    ASSERT_NE(it, bns.end());
    EXPECT_EQ(b.input_from, convs[it - bns.begin()]) << b.name;
  }
  EXPECT_EQ(s.quantizable_params, 78232);  // python
  CheckConsistent(*model);
}

TEST_F(ModelTest, ResNetTwoBlocksPerStageCounts) {
  std::unique_ptr<Model> model = Load("mini_resnet_b2.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  // Python: 20 Conv2d + 1 Linear, 20 BatchNorm2d; 176152 weights.
  EXPECT_EQ(s.layers.size(), 21u);
  EXPECT_EQ(s.bn_layers.size(), 20u);
  EXPECT_EQ(s.quantizable_params, 176152);
  for (const QuantLayer& l : s.layers) {
    EXPECT_EQ(l.bn.empty(), l.name == "fc") << l.name;
  }
  EXPECT_NE(FindLayer(s, "layer3.1.conv2"), nullptr);
  CheckConsistent(*model);
}

// DenseNet is pre-activation: norm1 of each dense layer, the transitions'
// norm and norm5 read the concatenation of earlier features, not a conv.
TEST_F(ModelTest, DenseNetNormsFedByConcatenation) {
  std::unique_ptr<Model> model = Load("mini_densenet.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  // Python: 15 Conv2d + 1 Linear, 16 BatchNorm2d; 21360 weights.
  EXPECT_EQ(s.layers.size(), 16u);
  ASSERT_EQ(s.bn_layers.size(), 16u);
  EXPECT_EQ(s.quantizable_params, 21360);
  int from_cat = 0;
  for (const BnLayer& b : s.bn_layers) {
    const bool pre_activation = absl::EndsWith(b.name, ".norm1") ||
                                absl::EndsWith(b.name, "transition1.norm") ||
                                absl::EndsWith(b.name, "transition2.norm") ||
                                b.name == "features.norm5";
    if (pre_activation) {
      EXPECT_EQ(b.input_from, "aten::cat") << b.name;
      ++from_cat;
    } else if (b.name == "features.norm0") {
      EXPECT_EQ(b.input_from, "features.conv0");
    } else {
      ASSERT_TRUE(absl::EndsWith(b.name, ".norm2")) << b.name;
      std::string conv = b.name.substr(0, b.name.size() - 5) + "conv1";
      EXPECT_EQ(b.input_from, conv) << b.name;
    }
  }
  EXPECT_EQ(from_cat, 9);  // 6 dense layers' norm1, 2 transitions, norm5
  // Convs feeding a concatenation have no BN of their own.
  const QuantLayer* conv2 =
      FindLayer(s, "features.denseblock1.denselayer1.conv2");
  ASSERT_NE(conv2, nullptr);
  EXPECT_EQ(conv2->bn, "");
  const QuantLayer* classifier = FindLayer(s, "classifier");
  ASSERT_NE(classifier, nullptr);
  EXPECT_EQ(classifier->kind, LayerKind::kLinear);
  CheckConsistent(*model);
}

TEST_F(ModelTest, MobileNetV2EveryBatchNormFollowsAConv) {
  std::unique_ptr<Model> model = Load("mini_mobilenet_v2.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  // Python: 16 Conv2d + 1 Linear ("classifier.1"), 16 BatchNorm2d.
  EXPECT_EQ(s.layers.size(), 17u);
  EXPECT_EQ(s.bn_layers.size(), 16u);
  EXPECT_EQ(s.quantizable_params, 28192);
  for (const BnLayer& b : s.bn_layers) {
    const QuantLayer* l = FindLayer(s, b.input_from);
    ASSERT_NE(l, nullptr) << b.name << " <- " << b.input_from;
    EXPECT_EQ(l->kind, LayerKind::kConv);
  }
  for (const QuantLayer& l : s.layers) {
    EXPECT_EQ(l.bn.empty(), l.name == "classifier.1") << l.name;
  }
  // Depthwise convs are layers too: [C, 1, 3, 3].
  const QuantLayer* dw = FindLayer(s, "features.2.conv.1.0");
  ASSERT_NE(dw, nullptr);
  EXPECT_EQ(dw->weight_shape[1], 1);
  EXPECT_EQ(dw->bn, "features.2.conv.1.1");
  EXPECT_EQ(FindLayer(s, "features.2.conv.2")->bn, "features.2.conv.3");
  CheckConsistent(*model);
}

TEST_F(ModelTest, ShuffleNetV2EveryBatchNormFollowsAConv) {
  std::unique_ptr<Model> model = Load("mini_shufflenet_v2.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  // Python: 26 Conv2d + 1 Linear, 26 BatchNorm2d.
  EXPECT_EQ(s.layers.size(), 27u);
  EXPECT_EQ(s.bn_layers.size(), 26u);
  EXPECT_EQ(s.quantizable_params, 17920);
  for (const BnLayer& b : s.bn_layers) {
    const QuantLayer* l = FindLayer(s, b.input_from);
    ASSERT_NE(l, nullptr) << b.name << " <- " << b.input_from;
    EXPECT_EQ(l->kind, LayerKind::kConv);
  }
  for (const QuantLayer& l : s.layers) {
    EXPECT_EQ(l.bn.empty(), l.name == "fc") << l.name;
  }
  EXPECT_EQ(FindLayer(s, "stage3.0.branch1.2")->bn, "stage3.0.branch1.3");
  EXPECT_EQ(FindLayer(s, "stage4.1.branch2.5")->bn, "stage4.1.branch2.6");
  CheckConsistent(*model);
}

TEST_F(ModelTest, FashionCnnLayersAndParams) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  const ModelSummary& s = model->summary();
  EXPECT_THAT(LayerNames(s), ElementsAre("stem.0", "down1.0", "block.conv1",
                                         "block.conv2", "down2.0", "fc"));
  EXPECT_THAT(LayerBns(s), ElementsAre("stem.1", "down1.1", "block.bn1",
                                       "block.bn2", "down2.1", ""));
  // python: sum(m.weight.numel() for conv/linear) = 144 + 4608 + 9216 +
  // 9216 + 18432 + 640.
  EXPECT_EQ(s.quantizable_params, 42256);
  CheckConsistent(*model);
}

TEST_F(ModelTest, LoadFromBytesMatchesLoadFromFile) {
  const std::string path = ModelPath("mini_resnet.pt");
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << path;
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  absl::StatusOr<std::unique_ptr<Model>> a = Model::LoadFromFile(path);
  absl::StatusOr<std::unique_ptr<Model>> b = Model::LoadFromBytes(bytes);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  const ModelSummary& sa = (*a)->summary();
  const ModelSummary& sb = (*b)->summary();
  EXPECT_EQ(sa.total_params, sb.total_params);
  EXPECT_EQ(sa.quantizable_params, sb.quantizable_params);
  ASSERT_EQ(sa.layers.size(), sb.layers.size());
  for (size_t i = 0; i < sa.layers.size(); ++i) {
    EXPECT_EQ(sa.layers[i].name, sb.layers[i].name);
    EXPECT_EQ(sa.layers[i].bn, sb.layers[i].bn);
    EXPECT_EQ(sa.layers[i].op, sb.layers[i].op);
    EXPECT_EQ(sa.layers[i].weight_shape, sb.layers[i].weight_shape);
    EXPECT_EQ(sa.layers[i].node_index, sb.layers[i].node_index);
  }
  ASSERT_EQ(sa.bn_layers.size(), sb.bn_layers.size());
  for (size_t i = 0; i < sa.bn_layers.size(); ++i) {
    EXPECT_EQ(sa.bn_layers[i].name, sb.bn_layers[i].name);
    EXPECT_EQ(sa.bn_layers[i].input_from, sb.bn_layers[i].input_from);
    EXPECT_EQ(sa.bn_layers[i].channels, sb.bn_layers[i].channels);
    EXPECT_EQ(sa.bn_layers[i].node_index, sb.bn_layers[i].node_index);
  }
  torch::Tensor x = torch::randn({2, 3, 32, 32});
  absl::StatusOr<torch::Tensor> ya = First((*a)->Forward(x));
  absl::StatusOr<torch::Tensor> yb = First((*b)->Forward(x));
  ASSERT_TRUE(ya.ok()) << ya.status();
  ASSERT_TRUE(yb.ok()) << yb.status();
  EXPECT_TRUE(torch::equal(*ya, *yb));
}

TEST_F(ModelTest, FrozenForwardMatchesTheOriginalModule) {
  // Freezing and the graph rewrites must not change what the model computes.
  torch::jit::Module original =
      torch::jit::load(ModelPath("tiny_nobn_after_conv.pt"));
  original.eval();
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  torch::manual_seed(3);
  torch::Tensor x = torch::randn({4, 3, 16, 16});
  torch::Tensor want;
  {
    torch::NoGradGuard no_grad;
    want = original.forward({x}).toTensor();
  }
  absl::StatusOr<torch::Tensor> got = First(model->Forward(x));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(got->sizes().vec(), ElementsAre(4, 5));
  EXPECT_TRUE(torch::allclose(*got, want, 1e-5, 1e-6));
}

TEST_F(ModelTest, RandomBytesAreInvalidArgument) {
  std::mt19937 rng(7);
  std::string bytes(4096, '\0');
  for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
  absl::StatusOr<std::unique_ptr<Model>> m = Model::LoadFromBytes(bytes);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument)
      << m.status();
  // The message is cleaned: no C++ backtrace.
  EXPECT_THAT(std::string(m.status().message()),
              Not(HasSubstr("Exception raised from")));
}

TEST_F(ModelTest, EmptyBytesAreInvalidArgument) {
  absl::StatusOr<std::unique_ptr<Model>> m = Model::LoadFromBytes("");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelTest, MissingFileIsAnError) {
  const std::string path = ModelPath("does_not_exist.pt");
  absl::StatusOr<std::unique_ptr<Model>> m = Model::LoadFromFile(path);
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().code(),
              ::testing::AnyOf(absl::StatusCode::kInvalidArgument,
                               absl::StatusCode::kNotFound))
      << m.status();
  // The user must be able to tell which file was meant.
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("does_not_exist"));
}

TEST_F(ModelTest, NoBatchNormIsFailedPrecondition) {
  absl::StatusOr<std::unique_ptr<Model>> m =
      Model::LoadFromFile(ModelPath("no_batchnorm.pt"));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("BatchNorm"));
}

TEST_F(ModelTest, TwoInputsIsInvalidArgument) {
  absl::StatusOr<std::unique_ptr<Model>> m =
      Model::LoadFromFile(ModelPath("two_inputs.pt"));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("one tensor"));
}

TEST_F(ModelTest, BadDeviceIsInvalidArgument) {
  absl::StatusOr<std::unique_ptr<Model>> m =
      Model::LoadFromFile(ModelPath("tiny_nobn_after_conv.pt"), "tpu:banana");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("tpu:banana"));
}

TEST_F(ModelTest, CheckInputShapeAcceptsTheRightShape) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  EXPECT_TRUE(model->CheckInputShape({1, 3, 16, 16}).ok());
  // Adaptive pooling: other spatial sizes work too.
  EXPECT_TRUE(model->CheckInputShape({2, 3, 9, 9}).ok());
}

TEST_F(ModelTest, CheckInputShapeWrongChannelsHasTheModelsMessage) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  absl::Status s = model->CheckInputShape({1, 4, 16, 16});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(s.message());
  EXPECT_THAT(msg, HasSubstr("1,4,16,16"));
  // LibTorch's own words about the conv: "expected input[1, 4, 16, 16] to
  // have 3 channels".
  EXPECT_THAT(msg, HasSubstr("channels"));
  EXPECT_THAT(msg, HasSubstr("expected"));
  // Cleaned (torch_status.h): no C++ frames, no TorchScript traceback with
  // the model's serialized code.
  EXPECT_THAT(msg, Not(HasSubstr("Exception raised from")));
  EXPECT_THAT(msg, Not(HasSubstr("Traceback")));
  EXPECT_THAT(msg, Not(HasSubstr("__torch__")));
}

TEST_F(ModelTest, CheckInputShapeRejectsNonPositiveSizes) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  absl::Status s = model->CheckInputShape({1, 3, 0, 16});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = model->CheckInputShape({1, 3, -16, 16});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

// An input the model rejects is the caller's error, not the core's: the
// TorchScript interpreter rethrows LibTorch's c10::Error as a plain
// std::runtime_error, which must still map to INVALID_ARGUMENT (and a cleaned
// message), as CheckInputShape's does.
TEST_F(ModelTest, ForwardWithWrongRankIsInvalidArgument) {
  std::unique_ptr<Model> model = Load("tiny_nobn_after_conv.pt");
  ASSERT_NE(model, nullptr);
  absl::StatusOr<torch::Tensor> y = First(model->Forward(torch::zeros({3, 16})));
  ASSERT_FALSE(y.ok());
  EXPECT_EQ(y.status().code(), absl::StatusCode::kInvalidArgument)
      << y.status();
  EXPECT_THAT(std::string(y.status().message()), Not(HasSubstr("Traceback")));
}

TEST_F(ModelTest, QuantizedModelCreateLeavesTheFloatModelAlone) {
  std::unique_ptr<Model> model = Load("fashion_cnn.pt");
  ASSERT_NE(model, nullptr);
  torch::manual_seed(5);
  torch::Tensor x = torch::randn({8, 1, 28, 28});
  absl::StatusOr<torch::Tensor> before = First(model->Forward(x));
  ASSERT_TRUE(before.ok()) << before.status();
  const std::string graph_before = model->graph()->toString();

  QuantOptions options;
  options.weight_bits = 2;  // large changes, so any leak shows
  options.activation_bits = 4;
  options.quantize_layer_inputs = true;
  absl::StatusOr<std::unique_ptr<QuantizedModel>> q =
      QuantizedModel::Create(*model, options, {x});
  ASSERT_TRUE(q.ok()) << q.status();
  absl::StatusOr<torch::Tensor> quantized = First((*q)->Forward(x));
  ASSERT_TRUE(quantized.ok()) << quantized.status();
  ASSERT_FALSE(torch::allclose(*quantized, *before));  // it did quantize

  absl::StatusOr<torch::Tensor> after = First(model->Forward(x));
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(torch::equal(*before, *after));
  EXPECT_EQ(model->graph()->toString(), graph_before);
  // The analysis still addresses the same nodes.
  std::vector<torch::jit::Node*> nodes = Model::Nodes(*model->graph());
  for (const QuantLayer& l : model->summary().layers) {
    EXPECT_TRUE(IsQuantizableOp(*nodes.at(l.node_index))) << l.name;
  }
}

}  // namespace
}  // namespace zeroq::core
