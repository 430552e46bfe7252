#include "client/svg.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::client {
namespace {

namespace v1 = ::zeroq::v1;
using ::testing::HasSubstr;
using ::testing::Not;

int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos;
       at = text.find(needle, at + needle.size())) {
    ++n;
  }
  return n;
}

// Tags open and close in order (a small check, not an XML parser): every
// <name ...> has its </name>, self-closing tags stand alone, and no raw '&'
// or '<' is left in text.
bool TagsBalanced(const std::string& svg, std::string* why) {
  std::vector<std::string> open;
  size_t i = 0;
  while ((i = svg.find('<', i)) != std::string::npos) {
    size_t end = svg.find('>', i);
    if (end == std::string::npos) {
      *why = "unterminated tag";
      return false;
    }
    std::string tag = svg.substr(i + 1, end - i - 1);
    i = end + 1;
    if (tag.empty() || tag[0] == '?' || tag[0] == '!') continue;
    if (tag[0] == '/') {
      std::string name = tag.substr(1);
      if (open.empty() || open.back() != name) {
        *why = "unexpected </" + name + ">";
        return false;
      }
      open.pop_back();
      continue;
    }
    if (tag.back() == '/') continue;
    open.push_back(tag.substr(0, tag.find_first_of(" \n")));
  }
  if (!open.empty()) {
    *why = "unclosed <" + open.back() + ">";
    return false;
  }
  return true;
}

// Three layers with candidates 2, 4, 8 and a five-point frontier; the
// sensitivities span several decades.
v1::JobResult MakeResult() {
  v1::JobResult r;
  const int params[] = {100, 1000, 400};
  const double omega[][3] = {
      {1.0, 0.01, 1e-5}, {5.0, 0.05, 2e-5}, {0.5, 0.002, 1e-6}};
  for (int i = 0; i < 3; ++i) {
    v1::LayerResult* l = r.add_layers();
    l->set_name(absl::StrCat("layer", i));
    l->set_params(params[i]);
    l->set_bits(4);
    for (int b = 0; b < 3; ++b) {
      l->add_candidate_bits(2 << b);
      l->add_sensitivity(omega[i][b]);
    }
  }
  r.set_quantizable_params(1500);
  const int64_t sizes[] = {3000, 4000, 6000, 9000, 12000};
  const double sens[] = {6.5, 1.2, 0.06, 0.01, 3.3e-5};
  for (int i = 0; i < 5; ++i) {
    v1::ParetoPoint* p = r.add_frontier();
    p->set_size_bits(sizes[i]);
    p->set_sensitivity(sens[i]);
    for (int l = 0; l < 3; ++l) p->add_bits(4);
  }
  *r.mutable_chosen() = r.frontier(2);
  return r;
}

TEST(UniformPointsTest, SumsParamsAndOmegaPerWidth) {
  std::vector<UniformPoint> u = UniformPoints(MakeResult());
  ASSERT_EQ(u.size(), 3u);
  EXPECT_EQ(u[0].bits, 2);
  EXPECT_DOUBLE_EQ(u[0].size_bits, 1500.0 * 2);
  EXPECT_DOUBLE_EQ(u[0].sensitivity, 6.5);
  EXPECT_EQ(u[1].bits, 4);
  EXPECT_DOUBLE_EQ(u[1].size_bits, 1500.0 * 4);
  EXPECT_DOUBLE_EQ(u[1].sensitivity, 0.062);
  EXPECT_EQ(u[2].bits, 8);
  EXPECT_DOUBLE_EQ(u[2].size_bits, 1500.0 * 8);
}

TEST(UniformPointsTest, SkipsWidthsSomeLayerLacks) {
  v1::JobResult r = MakeResult();
  // Layer 1 is pinned to 8 bits: only W8 is a reachable uniform setting.
  v1::LayerResult* l = r.mutable_layers(1);
  l->clear_candidate_bits();
  l->clear_sensitivity();
  l->add_candidate_bits(8);
  l->add_sensitivity(2e-5);
  std::vector<UniformPoint> u = UniformPoints(r);
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].bits, 8);
  EXPECT_TRUE(UniformPoints(v1::JobResult()).empty());
}

TEST(FrontierSvgTest, OneCirclePerFrontierPointChosenAndUniform) {
  v1::JobResult r = MakeResult();
  std::string svg = FrontierSvg(r, "job j-1");
  EXPECT_EQ(Count(svg, "class=\"frontier\""), r.frontier_size());
  EXPECT_EQ(Count(svg, "<circle class=\"frontier\""), r.frontier_size());
  EXPECT_EQ(Count(svg, "class=\"chosen\""), 1);
  EXPECT_EQ(Count(svg, "class=\"uniform\""), 3);
  for (const char* label : {">W2<", ">W4<", ">W8<"}) {
    EXPECT_THAT(svg, HasSubstr(label));
  }
  EXPECT_THAT(svg, HasSubstr("weight size (KiB)"));
  EXPECT_THAT(svg, HasSubstr("<title>job j-1</title>"));
  std::string why;
  EXPECT_TRUE(TagsBalanced(svg, &why)) << why;
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
}

TEST(FrontierSvgTest, LogScaleWhenValuesSpanDecades) {
  std::string svg = FrontierSvg(MakeResult(), "t");
  EXPECT_THAT(svg, HasSubstr("total sensitivity (log scale)"));

  v1::JobResult narrow = MakeResult();
  for (v1::ParetoPoint& p : *narrow.mutable_frontier()) {
    p.set_sensitivity(1 + p.size_bits() / 10000.0);
  }
  *narrow.mutable_chosen() = narrow.frontier(1);
  narrow.clear_layers();  // no uniform points far away
  std::string linear = FrontierSvg(narrow, "t");
  EXPECT_THAT(linear, Not(HasSubstr("log scale")));
  EXPECT_THAT(linear, HasSubstr("total sensitivity"));
  EXPECT_EQ(Count(linear, "class=\"uniform\""), 0);
  EXPECT_EQ(Count(linear, "class=\"frontier\""), 5);
}

TEST(FrontierSvgTest, EscapesText) {
  std::string svg = FrontierSvg(MakeResult(), "a <b> & \"c\" 'd'");
  EXPECT_THAT(svg, HasSubstr("a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos;"));
  EXPECT_THAT(svg, Not(HasSubstr("<b>")));
  std::string why;
  EXPECT_TRUE(TagsBalanced(svg, &why)) << why;
  EXPECT_EQ(XmlEscape("x\x01y"), "x y");
}

TEST(FrontierSvgTest, ZeroSensitivityAndEmptyFrontierStillDraw) {
  v1::JobResult r = MakeResult();
  r.mutable_frontier(4)->set_sensitivity(0);  // sits on the log axis
  std::string svg = FrontierSvg(r, "t");
  EXPECT_EQ(Count(svg, "class=\"frontier\""), 5);
  for (const char* bad : {"nan", "\"inf", "\"-inf", "inf,", ",inf", ",-inf"}) {
    EXPECT_THAT(svg, Not(HasSubstr(bad)));
  }

  std::string empty = FrontierSvg(v1::JobResult(), "t");
  EXPECT_EQ(Count(empty, "class=\"frontier\""), 0);
  EXPECT_EQ(Count(empty, "class=\"chosen\""), 0);
  EXPECT_THAT(empty, HasSubstr("no frontier"));
  std::string why;
  EXPECT_TRUE(TagsBalanced(empty, &why)) << why;
}

}  // namespace
}  // namespace zeroq::client
