#include "server/redact.h"

#include <filesystem>

#include "gtest/gtest.h"

namespace zeroq::server {
namespace {

TEST(Redactor, HidesPathsUnderTheRoots) {
  Redactor r({"/var/lib/zeroq", "/opt/zeroq/bin/"});
  EXPECT_EQ(r.ForTenant("open file failed, file path: /var/lib/zeroq/blobs/ab/"
                        "abcdef0123 (errno 2)"),
            "open file failed, file path: <server file> (errno 2)");
  EXPECT_EQ(r.ForTenant("cannot open tensor file /var/lib/zeroq/jobs/j-1/x.pt."),
            "cannot open tensor file <server file>.");
  EXPECT_EQ(r.ForTenant("\"/opt/zeroq/bin/zeroq-worker\": exec failed"),
            "\"<server file>\": exec failed");
  EXPECT_EQ(r.ForTenant("/var/lib/zeroq"), "<server file>");
  EXPECT_EQ(r.ForTenant("a;/var/lib/zeroq/x;b"), "a;<server file>;b");
  // After an opening bracket, as in LibTorch's "torch.jit.load(PATH)".
  EXPECT_EQ(r.ForTenant("torch.jit.load(/var/lib/zeroq/blobs/ab/abc) failed"),
            "torch.jit.load(<server file>) failed");
  EXPECT_EQ(r.ForTenant("[/var/lib/zeroq/x]"), "[<server file>]");
  // Other paths, and names that only start like a root, stay.
  EXPECT_EQ(r.ForTenant("see /var/lib/zeroq2/x and /tmp/y"),
            "see /var/lib/zeroq2/x and /tmp/y");
  EXPECT_EQ(r.ForTenant("no path here"), "no path here");
  EXPECT_EQ(r.ForTenant(""), "");
}

TEST(Redactor, RelativeRootsMatchInTheirAbsoluteFormToo) {
  const std::string cwd = std::filesystem::current_path().string();
  Redactor r({"out/server-data"});
  EXPECT_EQ(r.ForTenant("x out/server-data/blobs/ab y"), "x <server file> y");
  EXPECT_EQ(r.ForTenant("x " + cwd + "/out/server-data/jobs/j-2/model.pt y"),
            "x <server file> y");
}

TEST(Redactor, IgnoresRootsThatWouldHideEverything) {
  Redactor r({"/", "data", ""});
  const std::string text = "the data in /etc/passwd";
  EXPECT_EQ(r.ForTenant(text), text);
}

}  // namespace
}  // namespace zeroq::server
