// One config schema, end to end: at every edge of every field of
// common/config_schema.h, a real server's SubmitJob and the zeroq-quantize
// binary (--check_config: its flags, the model's layers, the core's checks)
// give the same verdict, and it is the schema's. A value the server accepts
// is never refused later by the core for a range reason (core's LimitsTest
// shows the worker's conversion agrees too).
#include <stdio.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/config_schema.h"
#include "gtest/gtest.h"
#include "tests/e2e_util.h"
#include "tests/server_process.h"

namespace zeroq {
namespace {

namespace v1 = ::zeroq::v1;
using testing::ModelPath;
using testing::ServerProcess;

// How a field is set in a SubmitJobRequest and on zeroq-quantize's command
// line.
struct Route {
  std::function<void(v1::QuantizationConfig&, const std::string&)> config;
  std::function<std::vector<std::string>(const std::string&)> flags;
};

int64_t ToInt(const std::string& v) { return std::stoll(v); }

std::map<std::string, Route> Routes() {
  auto flag = [](const char* name) {
    return [name](const std::string& v) {
      return std::vector<std::string>{absl::StrCat("--", name, "=", v)};
    };
  };
  auto choice_flag = [](const char* name, const ChoiceField& field) {
    return [name, &field](const std::string& v) {
      const int64_t i = ToInt(v);
      const std::string word =
          i >= 1 && i <= field.count ? field.choices[i - 1] : "bogus";
      return std::vector<std::string>{absl::StrCat("--", name, "=", word)};
    };
  };
  return {
      {"weight_bits",
       {[](auto& c, const std::string& v) { c.set_weight_bits(ToInt(v)); },
        flag("weight_bits")}},
      {"layer_bits",
       {[](auto& c, const std::string& v) {
          (*c.mutable_layer_bits())["fc"] = ToInt(v);
        },
        [](const std::string& v) {
          return std::vector<std::string>{"--layer_bits=fc=" + v};
        }}},
      {"candidate_bits",
       {[](auto& c, const std::string& v) {
          // A budget every single width reaches.
          c.set_budget("MP8");
          c.add_candidate_bits(ToInt(v));
        },
        [](const std::string& v) {
          return std::vector<std::string>{"--budget=MP8",
                                          "--candidate_bits=" + v};
        }}},
      {"activation_bits",
       {[](auto& c, const std::string& v) { c.set_activation_bits(ToInt(v)); },
        flag("activation_bits")}},
      {"distillation.batch_size",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_batch_size(ToInt(v));
        },
        flag("batch_size")}},
      {"distillation.num_batches",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_num_batches(ToInt(v));
        },
        flag("num_batches")}},
      {"distillation.iterations",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_iterations(ToInt(v));
        },
        flag("iterations")}},
      {"threads",
       {[](auto& c, const std::string& v) { c.set_threads(ToInt(v)); },
        flag("threads")}},
      {"activation_percentile",
       {[](auto& c, const std::string& v) {
          c.set_activation_percentile(std::stod(v));
        },
        flag("activation_percentile")}},
      {"distillation.lr",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_lr(std::stod(v));
        },
        flag("lr")}},
      {"distillation.early_stop_window",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_early_stop_window(ToInt(v));
        },
        flag("early_stop_window")}},
      {"distillation.early_stop_tolerance",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_early_stop_tolerance(std::stod(v));
        },
        flag("early_stop_tolerance")}},
      {"distillation.tv_weight",
       {[](auto& c, const std::string& v) {
          c.mutable_distillation()->set_tv_weight(std::stod(v));
        },
        flag("tv_weight")}},
      {"reconstruction.iterations",
       {[](auto& c, const std::string& v) {
          c.mutable_reconstruction()->set_iterations(ToInt(v));
        },
        flag("reconstruct_iterations")}},
      // A method field: the value is the index of its word from 1 (the
      // proto enum's value), the flag takes the word ("bogus" past the end).
      {"activation_range",
       {[](auto& c, const std::string& v) {
          c.set_activation_range(static_cast<v1::ActivationRange>(ToInt(v)));
        },
        choice_flag("activation_range", kActivationRange)}},
      {"reconstruct",
       {[](auto& c, const std::string& v) {
          c.set_reconstruct(static_cast<v1::ReconstructMethod>(ToInt(v)));
        },
        choice_flag("reconstruct", kReconstruct)}},
  };
}

// Integer fields outside kIntFields (config_schema.h says why), walked the
// same way.
constexpr const IntField* kOtherIntFields[] = {&kReconstructIterations};
// Method fields: every word, and one past the last.
constexpr const ChoiceField* kChoiceFields[] = {&kActivationRange,
                                                &kReconstruct};

struct Verdict {
  int exit_code = -1;
  std::string output;
};

// zeroq-quantize --check_config on the test model with `flags`.
Verdict CheckOffline(const std::vector<std::string>& flags) {
  std::string command =
      absl::StrCat(ZEROQ_QUANTIZE, " --check_config --model=",
                   ModelPath("fashion_cnn.pt"), " --input_shape=1,28,28");
  for (const std::string& f : flags) absl::StrAppend(&command, " '", f, "'");
  absl::StrAppend(&command, " 2>&1");
  Verdict v;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return v;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) v.output.append(buffer, n);
  const int status = pclose(pipe);
  v.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return v;
}

TEST(ConfigSchemaTest, SubmitJobAndZeroqQuantizeGiveTheSchemasVerdict) {
  ServerProcess server({"--devices=cpu:1"});
  ASSERT_TRUE(server.Start()) << server.Log();
  auto client = server.NewClient();
  v1::Model model = testing::UploadReady(client.get(), "fashion_cnn.pt");
  ASSERT_EQ(model.state(), v1::MODEL_READY);

  struct Case {
    std::string field;
    std::string value;
    bool want;
  };
  std::vector<Case> cases;
  std::vector<const IntField*> int_fields(std::begin(kIntFields),
                                          std::end(kIntFields));
  int_fields.insert(int_fields.end(), std::begin(kOtherIntFields),
                    std::end(kOtherIntFields));
  for (const IntField* f : int_fields) {
    std::vector<int64_t> edges = {f->lo - 1, f->lo, f->hi, f->hi + 1, -1, 0, 1};
    std::sort(edges.begin(), edges.end());
    edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
    for (int64_t v : edges) cases.push_back({f->name, absl::StrCat(v), f->Contains(v)});
  }
  // Unset (0) is each method field's default; a value past the last word is
  // refused.
  for (const ChoiceField* f : kChoiceFields) {
    for (int i = 1; i <= f->count + 1; ++i) {
      cases.push_back({f->name, absl::StrCat(i), i <= f->count});
    }
  }
  for (const RealField* f : kRealFields) {
    for (double v : {f->lo - 1, f->lo, f->lo + 1e-3, f->def, f->hi, f->hi + 1e-3}) {
      cases.push_back({f->name, absl::StrFormat("%.17g", v), f->Contains(v)});
    }
  }
  const std::map<std::string, Route> routes = Routes();
  int accepted = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field + " = " + c.value);
    auto route = routes.find(c.field);
    ASSERT_NE(route, routes.end()) << "no route for " << c.field;

    v1::SubmitJobRequest request;
    request.set_model_id(model.id());
    request.set_device(v1::DEVICE_CPU);
    route->second.config(*request.mutable_config(), c.value);
    absl::StatusOr<v1::Job> job = client->SubmitJob(request);
    EXPECT_EQ(job.ok(), c.want) << job.status();
    if (job.ok()) {
      ++accepted;
      // Only the verdict matters here: the job need not run.
      absl::StatusOr<v1::Job> cancelled = client->CancelJob(job->id());
      EXPECT_TRUE(cancelled.ok()) << cancelled.status();
    } else {
      EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(job.status().message().find("config." + c.field),
                std::string::npos)
          << job.status();
    }

    const std::vector<std::string> flags = route->second.flags(c.value);
    const Verdict offline = CheckOffline(flags);
    EXPECT_EQ(offline.exit_code, c.want ? 0 : 2) << offline.output;
    if (c.want) {
      EXPECT_NE(offline.output.find("config ok"), std::string::npos)
          << offline.output;
    } else if (absl::EndsWith(flags.back(), "=bogus")) {
      // A word the flag does not know: a usage error naming the flag.
      EXPECT_NE(offline.output.find(flags.back().substr(
                    0, flags.back().find('='))),
                std::string::npos)
          << offline.output;
    } else {
      EXPECT_NE(offline.output.find("INVALID_ARGUMENT"), std::string::npos)
          << offline.output;
    }
  }
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, static_cast<int>(cases.size()));

  // Checks that depend on the model, not on one field's range, agree too.
  struct Whole {
    const char* what;
    std::function<void(v1::QuantizationConfig&)> config;
    std::vector<std::string> flags;
    bool want;
  };
  const std::vector<Whole> wholes = {
      {"a budget the widths reach", [](auto& c) { c.set_budget("MP4"); },
       {"--budget=MP4"}, true},
      {"a budget below the narrowest width",
       [](auto& c) {
         c.set_budget("MP4");
         c.add_candidate_bits(8);
       },
       {"--budget=MP4", "--candidate_bits=8"}, false},
      {"a pin that keeps the budget out of reach",
       [](auto& c) {
         c.set_budget("MP2");
         (*c.mutable_layer_bits())["block.conv1"] = 8;
       },
       {"--budget=MP2", "--layer_bits=block.conv1=8"}, false},
      {"a repeated width",
       [](auto& c) {
         c.set_budget("MP4");
         c.add_candidate_bits(4);
         c.add_candidate_bits(4);
       },
       {"--budget=MP4", "--candidate_bits=4,4"}, false},
      {"a pin on no layer", [](auto& c) { (*c.mutable_layer_bits())["nope"] = 4; },
       {"--layer_bits=nope=4"}, false},
  };
  for (const Whole& w : wholes) {
    SCOPED_TRACE(w.what);
    v1::SubmitJobRequest request;
    request.set_model_id(model.id());
    request.set_device(v1::DEVICE_CPU);
    w.config(*request.mutable_config());
    absl::StatusOr<v1::Job> job = client->SubmitJob(request);
    EXPECT_EQ(job.ok(), w.want) << job.status();
    if (job.ok()) {
      absl::StatusOr<v1::Job> cancelled = client->CancelJob(job->id());
      EXPECT_TRUE(cancelled.ok()) << cancelled.status();
    }
    const Verdict offline = CheckOffline(w.flags);
    EXPECT_EQ(offline.exit_code, w.want ? 0 : 2) << offline.output;
  }
}

}  // namespace
}  // namespace zeroq
