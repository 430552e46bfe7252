#include "server/validation.h"

#include <functional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

using ::testing::HasSubstr;

v1::ModelMetadata GoodMetadata() {
  v1::ModelMetadata m;
  m.set_name("net");
  m.add_input_shape(1);
  m.add_input_shape(28);
  m.add_input_shape(28);
  m.set_size_bytes(1000);
  m.set_sha256(std::string(64, 'a'));
  return m;
}

v1::SubmitJobRequest GoodRequest() {
  v1::SubmitJobRequest r;
  r.set_model_id("m-1");
  return r;
}

// The error is INVALID_ARGUMENT and names the field.
void ExpectInvalid(const absl::Status& s, const std::string& field) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(field));
}

TEST(Validation, MetadataAcceptsAGoodOne) {
  EXPECT_TRUE(ValidateModelMetadata(GoodMetadata(), 1 << 20).ok());
}

TEST(Validation, MetadataNamesTheBadField) {
  v1::ModelMetadata m = GoodMetadata();
  m.clear_input_shape();
  ExpectInvalid(ValidateModelMetadata(m, 1 << 20), "metadata.input_shape");
  m = GoodMetadata();
  m.set_input_shape(1, 0);
  ExpectInvalid(ValidateModelMetadata(m, 1 << 20), "metadata.input_shape[1]");
  m = GoodMetadata();
  m.set_size_bytes(0);
  ExpectInvalid(ValidateModelMetadata(m, 1 << 20), "metadata.size_bytes");
  m = GoodMetadata();
  m.set_sha256("ABC");
  ExpectInvalid(ValidateModelMetadata(m, 1 << 20), "metadata.sha256");
  m = GoodMetadata();
  m.set_size_bytes(2 << 20);
  EXPECT_EQ(ValidateModelMetadata(m, 1 << 20).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(Validation, SubmitDefaultsAreValid) {
  EXPECT_TRUE(ValidateSubmitJob(GoodRequest()).ok());
}

TEST(Validation, SubmitNamesTheBadField) {
  struct Case {
    std::function<void(v1::SubmitJobRequest*)> edit;
    std::string field;
  };
  std::vector<Case> cases = {
      {[](auto* r) { r->clear_model_id(); }, "model_id"},
      {[](auto* r) { r->set_priority(101); }, "priority"},
      {[](auto* r) { r->set_time_limit_seconds(-1); }, "time_limit_seconds"},
      {[](auto* r) { r->mutable_config()->set_weight_bits(9); },
       "config.weight_bits"},
      {[](auto* r) { r->mutable_config()->set_weight_bits(1); },
       "config.weight_bits"},
      {[](auto* r) { r->mutable_config()->set_activation_bits(17); },
       "config.activation_bits"},
      {[](auto* r) { (*r->mutable_config()->mutable_layer_bits())["fc"] = 12; },
       "config.layer_bits[\"fc\"]"},
      {[](auto* r) { r->mutable_config()->set_budget("lots"); },
       "config.budget"},
      {[](auto* r) {
         r->mutable_config()->set_budget("MP4");
         r->mutable_config()->add_candidate_bits(4);
         r->mutable_config()->add_candidate_bits(4);
       },
       "config.candidate_bits[1]"},
      {[](auto* r) { r->mutable_config()->add_candidate_bits(4); },
       "config.candidate_bits"},
      {[](auto* r) { r->mutable_config()->set_activation_percentile(20); },
       "config.activation_percentile"},
      {[](auto* r) {
         r->mutable_config()->mutable_distillation()->set_batch_size(0);
       },
       "config.distillation.batch_size"},
      {[](auto* r) {
         r->mutable_config()->mutable_distillation()->set_iterations(-1);
       },
       "config.distillation.iterations"},
      {[](auto* r) { r->mutable_config()->mutable_distillation()->set_lr(0); },
       "config.distillation.lr"},
      {[](auto* r) { r->mutable_config()->set_sensitivity_from_job("j-1"); },
       "config.sensitivity_from_job"},
      {[](auto* r) { r->mutable_config()->set_threads(257); }, "config.threads"},
      {[](auto* r) { r->set_device(static_cast<v1::DeviceKind>(7)); },
       "device"},
  };
  for (const Case& c : cases) {
    v1::SubmitJobRequest r = GoodRequest();
    c.edit(&r);
    ExpectInvalid(ValidateSubmitJob(r), c.field);
  }
}

v1::Model ReadyModel() {
  v1::Model m;
  m.set_id("m-1");
  m.set_state(v1::MODEL_READY);
  v1::QuantizableLayer* a = m.mutable_summary()->add_layers();
  a->set_name("conv");
  a->set_params(1000);
  v1::QuantizableLayer* b = m.mutable_summary()->add_layers();
  b->set_name("fc");
  b->set_params(3000);
  m.mutable_summary()->set_quantizable_params(4000);
  return m;
}

TEST(Validation, ConfigForModelChecksLayerNamesAndBudget) {
  v1::QuantizationConfig c;
  EXPECT_TRUE(ValidateConfigForModel(c, ReadyModel()).ok());
  (*c.mutable_layer_bits())["nope"] = 4;
  absl::Status s = ValidateConfigForModel(c, ReadyModel());
  ExpectInvalid(s, "config.layer_bits[\"nope\"]");
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("conv"));  // lists what exists

  c.clear_layer_bits();
  c.set_budget("MP4");
  EXPECT_TRUE(ValidateConfigForModel(c, ReadyModel()).ok());
  c.set_budget("MP1.5");  // below 2 bits everywhere
  ExpectInvalid(ValidateConfigForModel(c, ReadyModel()), "config.budget");
  c.set_budget("MP2");
  EXPECT_TRUE(ValidateConfigForModel(c, ReadyModel()).ok());
  (*c.mutable_layer_bits())["fc"] =
      8;  // pinned: 1000*2 + 3000*8 > 2 bits average
  ExpectInvalid(ValidateConfigForModel(c, ReadyModel()), "config.budget");
}

TEST(Validation, PageSize) {
  EXPECT_EQ(*NormalizePageSize(0), 50);
  EXPECT_EQ(*NormalizePageSize(7), 7);
  EXPECT_EQ(*NormalizePageSize(100000), 500);
  EXPECT_FALSE(NormalizePageSize(-1).ok());
}

}  // namespace
}  // namespace zeroq::server
