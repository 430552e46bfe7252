#include "server/log.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace zeroq::server {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

TEST(Log, TextLineCarriesTimeLevelAndIds) {
  std::string line = FormatLogLine(LogLevel::kWarning, {"acme", "j-1", "m-2"},
                                   "slow", LogFormat::kText);
  EXPECT_THAT(line, MatchesRegex("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z WARNING "
                                 "tenant=acme job=j-1 model=m-2 slow"));
  EXPECT_THAT(FormatLogLine(LogLevel::kInfo, {}, "up", LogFormat::kText),
              HasSubstr("INFO up"));
}

TEST(Log, JsonLineParsesAndOmitsEmptyIds) {
  std::string line = FormatLogLine(LogLevel::kError, {"acme", "", "m-2"},
                                   "bad \"x\"\n", LogFormat::kJson);
  nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "ERROR");
  EXPECT_EQ(j["tenant"], "acme");
  EXPECT_EQ(j["model"], "m-2");
  EXPECT_FALSE(j.contains("job"));
  EXPECT_EQ(j["msg"], "bad \"x\"\n");
  EXPECT_EQ(line.find('\n'), std::string::npos);  // one line
  // Bytes that are not UTF-8 do not break the line.
  EXPECT_NO_THROW(nlohmann::json::parse(FormatLogLine(
      LogLevel::kInfo, {}, std::string("\xff\xfe"), LogFormat::kJson)));
}

}  // namespace
}  // namespace zeroq::server
