#include "server/tenants.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/sha256.h"

namespace zeroq::server {
namespace {

using ::testing::HasSubstr;

std::string File(const std::string& key_a, const std::string& key_b) {
  return R"({"tenants": [
    {"name": "acme", "api_key_sha256": [")" +
         Sha256Hex(key_a) + R"("],
     "quotas": {"running_jobs": 2, "queued_jobs": 5, "stored_bytes": 1000, "model_bytes": 500}},
    {"name": "zeta", "api_key_sha256": [")" +
         Sha256Hex(key_b) + R"("]}
  ]})";
}

TEST(Tenants, KeysAuthenticateTheirTenant) {
  absl::StatusOr<TenantRegistry> r =
      TenantRegistry::Parse(File("key-a", "key-b"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->open());
  absl::StatusOr<const Tenant*> a = r->Authenticate("Bearer key-a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->name, "acme");
  EXPECT_EQ((*a)->quotas.running_jobs, 2);
  EXPECT_EQ((*a)->quotas.model_bytes, 500);
  EXPECT_EQ((*r->Authenticate("Bearer key-b"))->name, "zeta");
  EXPECT_EQ((*r->Authenticate("Bearer key-b"))->quotas.queued_jobs,
            0);  // unlimited
  for (auto bad : {std::optional<absl::string_view>(),
                   std::optional<absl::string_view>("key-a"),
                   std::optional<absl::string_view>("Bearer nope"),
                   std::optional<absl::string_view>("Basic a2V5LWE=")}) {
    EXPECT_EQ(r->Authenticate(bad).status().code(),
              absl::StatusCode::kUnauthenticated);
  }
}

TEST(Tenants, OpenRegistryLetsEveryoneInAsDefault) {
  TenantRegistry r = TenantRegistry::Open();
  EXPECT_TRUE(r.open());
  EXPECT_EQ((*r.Authenticate(std::nullopt))->name, "default");
  EXPECT_EQ((*r.Authenticate("Bearer anything"))->name, "default");
}

TEST(Tenants, MalformedFilesNameTheEntry) {
  struct Case {
    std::string json, where;
  };
  std::string h = Sha256Hex("k");
  std::vector<Case> cases = {
      {"not json", "not valid JSON"},
      {R"({"tenants": []})", "at least one tenant"},
      {R"({"tenants": [{"api_key_sha256": [")" + h + R"("]}]})",
       "tenants[0].name"},
      {R"({"tenants": [{"name": "a"}]})", "tenants[0].api_key_sha256"},
      {R"({"tenants": [{"name": "a", "api_key_sha256": ["plain-key"]}]})",
       "tenants[0].api_key_sha256[0]"},
      {R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h + R"("]},
                       {"name": "a", "api_key_sha256": [")" +
           Sha256Hex("j") + R"("]}]})",
       "tenants[1].name"},
      {R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h + R"("]},
                       {"name": "b", "api_key_sha256": [")" +
           h + R"("]}]})",
       "listed twice"},
      {R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h +
           R"("], "quotas": {"running_jobs": -1}}]})",
       "tenants[0].quotas.running_jobs"},
      {R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h +
           R"("], "quotas": {"gpus": 1}}]})",
       "tenants[0].quotas.gpus"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<TenantRegistry> r = TenantRegistry::Parse(c.json);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.where))
        << c.json;
  }
  EXPECT_EQ(
      TenantRegistry::LoadFile("/nonexistent/tenants.json").status().code(),
      absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace zeroq::server
