#include "server/tenants.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"
#include "server/sha256.h"

namespace zeroq::server {
namespace {

absl::Status Bad(absl::string_view where, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("tenants file: ", where, ": ", what));
}

absl::StatusOr<int64_t> Quota(const nlohmann::json& quotas, const char* key,
                              const std::string& where) {
  if (!quotas.contains(key)) return 0;
  const nlohmann::json& v = quotas.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() < 0) {
    return Bad(absl::StrCat(where, ".quotas.", key),
               "must be an integer >= 0 (0: unlimited)");
  }
  return v.get<int64_t>();
}

}  // namespace

TenantRegistry TenantRegistry::Open() {
  TenantRegistry r;
  r.open_ = true;
  r.tenants_.push_back(Tenant{kOpenTenant, {}});
  r.by_name_[kOpenTenant] = 0;
  return r;
}

absl::StatusOr<TenantRegistry> TenantRegistry::LoadFile(
    const std::string& path) {
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(absl::StrCat("cannot read tenants file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str());
}

absl::StatusOr<TenantRegistry> TenantRegistry::Parse(absl::string_view text) {
  nlohmann::json doc = nlohmann::json::parse(text.begin(), text.end(), nullptr,
                                             /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Bad("top level", "not valid JSON");
  if (!doc.is_object() || !doc.contains("tenants") ||
      !doc["tenants"].is_array() || doc["tenants"].empty()) {
    return Bad("top level",
               "expected {\"tenants\": [ ... ]} with at least one tenant");
  }
  TenantRegistry r;
  for (size_t i = 0; i < doc["tenants"].size(); ++i) {
    const nlohmann::json& t = doc["tenants"][i];
    std::string where = absl::StrCat("tenants[", i, "]");
    if (!t.is_object()) return Bad(where, "expected an object");
    if (!t.contains("name") || !t["name"].is_string() ||
        t["name"].get<std::string>().empty() ||
        t["name"].get<std::string>().size() > 64) {
      return Bad(where + ".name", "a name of 1 to 64 characters is required");
    }
    Tenant tenant;
    tenant.name = t["name"].get<std::string>();
    if (r.by_name_.count(tenant.name)) {
      return Bad(where + ".name",
                 absl::StrCat("\"", tenant.name, "\" is listed twice"));
    }
    if (!t.contains("api_key_sha256") || !t["api_key_sha256"].is_array() ||
        t["api_key_sha256"].empty()) {
      return Bad(where + ".api_key_sha256",
                 "a list of at least one key hash is required");
    }
    const size_t index = r.tenants_.size();
    for (size_t k = 0; k < t["api_key_sha256"].size(); ++k) {
      const nlohmann::json& h = t["api_key_sha256"][k];
      std::string key_where = absl::StrCat(where, ".api_key_sha256[", k, "]");
      if (!h.is_string()) return Bad(key_where, "expected a string");
      std::string hex = absl::AsciiStrToLower(h.get<std::string>());
      if (!IsSha256Hex(hex)) {
        return Bad(
            key_where,
            "expected the key's SHA-256 as 64 hex digits, not the key itself");
      }
      if (!r.by_key_hash_.emplace(hex, index).second) {
        return Bad(key_where, "this key is listed twice");
      }
    }
    if (t.contains("quotas")) {
      const nlohmann::json& q = t["quotas"];
      if (!q.is_object()) return Bad(where + ".quotas", "expected an object");
      for (const auto& [key, value] : q.items()) {
        if (key != "running_jobs" && key != "queued_jobs" &&
            key != "stored_bytes" && key != "model_bytes") {
          return Bad(absl::StrCat(where, ".quotas.", key),
                     "unknown quota (running_jobs, queued_jobs, stored_bytes, "
                     "model_bytes)");
        }
      }
      auto set = [&](const char* key, int64_t* field) -> absl::Status {
        absl::StatusOr<int64_t> v = Quota(q, key, where);
        if (!v.ok()) return v.status();
        *field = *v;
        return absl::OkStatus();
      };
      if (absl::Status s = set("running_jobs", &tenant.quotas.running_jobs);
          !s.ok())
        return s;
      if (absl::Status s = set("queued_jobs", &tenant.quotas.queued_jobs);
          !s.ok())
        return s;
      if (absl::Status s = set("stored_bytes", &tenant.quotas.stored_bytes);
          !s.ok())
        return s;
      if (absl::Status s = set("model_bytes", &tenant.quotas.model_bytes);
          !s.ok())
        return s;
    }
    r.by_name_[tenant.name] = index;
    r.tenants_.push_back(std::move(tenant));
  }
  return r;
}

absl::StatusOr<const Tenant*> TenantRegistry::Authenticate(
    std::optional<absl::string_view> authorization) const {
  if (open_) return &tenants_[0];
  if (!authorization) {
    return absl::UnauthenticatedError(
        "no API key: send \"authorization: Bearer KEY\" in the call metadata");
  }
  absl::string_view value = absl::StripAsciiWhitespace(*authorization);
  if (!absl::ConsumePrefix(&value, "Bearer ") &&
      !absl::ConsumePrefix(&value, "bearer ")) {
    return absl::UnauthenticatedError(
        "the authorization metadata must be \"Bearer KEY\"");
  }
  auto it = by_key_hash_.find(Sha256Hex(absl::StripAsciiWhitespace(value)));
  if (it == by_key_hash_.end()) {
    return absl::UnauthenticatedError("the API key is not valid");
  }
  return &tenants_[it->second];
}

const Tenant* TenantRegistry::Find(absl::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &tenants_[it->second];
}

std::vector<std::string> TenantRegistry::names() const {
  std::vector<std::string> out;
  for (const Tenant& t : tenants_) out.push_back(t.name);
  return out;
}

}  // namespace zeroq::server
