#include "client/cli.h"

#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace zeroq::client {
namespace {

namespace v1 = ::zeroq::v1;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

const std::vector<FlagSpec>& Globals() {
  static const auto* globals = new std::vector<FlagSpec>{
      {"server", "ADDR", "the server"}, {"json", "", "json output"}};
  return *globals;
}

CommandSpec Download() {
  return {"download",
          "JOB [ARTIFACT...]",
          "download",
          "",
          {{"out", "DIR", "folder", 'o'}, {"force", "", "overwrite"}},
          1,
          -1};
}

CommandSpec Submit() {
  return {"submit",
          "MODEL_ID",
          "submit",
          "",
          {{"budget", "SPEC", ""},
           {"weight_bits", "N", ""},
           {"activation_bits", "N", ""},
           {"candidate_bits", "LIST", ""},
           {"iterations", "N", ""},
           {"batch_size", "N", ""},
           {"seed", "N", ""},
           {"threads", "N", ""},
           {"priority", "N", ""},
           {"device", "KIND", ""},
           {"sensitivity_from", "JOB", ""},
           {"request_id", "ID", ""},
           {"activation_range", "METHOD", ""},
           {"activation_percentile", "P", ""},
           {"early_stop_window", "N", ""},
           {"early_stop_tolerance", "T", ""},
           {"tv_weight", "W", ""},
           {"reconstruct", "METHOD", ""},
           {"reconstruct_iterations", "N", ""}},
          1,
          1};
}

TEST(ParseArgsTest, FlagForms) {
  absl::StatusOr<ParsedArgs> p = ParseArgs(
      Download(), Globals(),
      {"j-1", "--out=/tmp/a", "report.json", "--server", "h:1", "--json", "-o",
       "/tmp/b", "--force=false", "--", "--odd-name"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->args, ElementsAre("j-1", "report.json", "--odd-name"));
  EXPECT_EQ(p->Get("out"), "/tmp/b");  // the last one wins
  EXPECT_EQ(p->Get("server"), "h:1");
  EXPECT_TRUE(p->GetBool("json"));
  EXPECT_FALSE(p->GetBool("force"));
  EXPECT_FALSE(p->Has("missing"));
  EXPECT_EQ(p->Get("missing", "x"), "x");
  EXPECT_FALSE(p->help);
}

TEST(ParseArgsTest, NegativeNumberIsAValue) {
  absl::StatusOr<ParsedArgs> p =
      ParseArgs(Submit(), Globals(), {"m-1", "--priority", "-5"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->Get("priority"), "-5");
}

TEST(ParseArgsTest, UsageErrors) {
  auto error = [](const CommandSpec& c, std::vector<std::string> argv) {
    absl::StatusOr<ParsedArgs> p = ParseArgs(c, Globals(), argv);
    EXPECT_FALSE(p.ok());
    EXPECT_TRUE(IsUsageError(p.status())) << p.status();
    EXPECT_EQ(ExitCodeFor(p.status()), kExitUsage);
    return std::string(p.status().message());
  };
  EXPECT_THAT(error(Submit(), {"m-1", "--bugdet", "MP4"}),
              HasSubstr("unknown flag --bugdet (did you mean --budget?)"));
  EXPECT_THAT(error(Submit(), {"m-1", "--zzzzzzzz"}),
              Not(HasSubstr("did you mean")));
  EXPECT_THAT(error(Submit(), {"m-1", "--budget"}),
              HasSubstr("--budget needs a SPEC"));
  EXPECT_THAT(error(Submit(), {}), HasSubstr("missing MODEL_ID"));
  EXPECT_THAT(error(Submit(), {"m-1", "m-2"}),
              HasSubstr("unexpected argument \"m-2\""));
  EXPECT_THAT(error(Download(), {"j-1", "--json=yes"}),
              HasSubstr("--json is a switch"));
  EXPECT_THAT(error(Download(), {"j-1", "-x"}), HasSubstr("unknown flag -x"));
}

TEST(ParseArgsTest, HelpSkipsArgumentChecks) {
  absl::StatusOr<ParsedArgs> p = ParseArgs(Submit(), Globals(), {"--help"});
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->help);
  p = ParseArgs(Submit(), Globals(), {"-h", "a", "b"});
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->help);
}

TEST(HelpTest, CommandAndMainHelp) {
  std::string help = CommandHelp(Download(), Globals());
  EXPECT_THAT(help, HasSubstr("usage: zeroq download JOB [ARTIFACT...]"));
  EXPECT_THAT(help, HasSubstr("-o, --out DIR"));
  EXPECT_THAT(help, HasSubstr("--server ADDR"));
  EXPECT_THAT(help, HasSubstr("--help"));
  std::string main = MainHelp({Download(), Submit()}, Globals());
  EXPECT_THAT(main, HasSubstr("download"));
  EXPECT_THAT(main, HasSubstr("submit"));
  EXPECT_THAT(main, HasSubstr("3 the server cannot be reached"));
}

TEST(ValuesTest, Shape) {
  absl::StatusOr<std::vector<int64_t>> s = ParseShape("input_shape", "1,28,28");
  ASSERT_TRUE(s.ok());
  EXPECT_THAT(*s, ElementsAre(1, 28, 28));
  for (const char* bad : {"", "1,x,28", "1,,28", "0,28,28", "-1"}) {
    s = ParseShape("input_shape", bad);
    EXPECT_FALSE(s.ok()) << bad;
    EXPECT_TRUE(IsUsageError(s.status()));
    EXPECT_THAT(s.status().message(), HasSubstr("--input_shape"));
  }
}

TEST(ValuesTest, IntsDevicesStates) {
  EXPECT_EQ(*ParseInt("n", "7", 0, 8), 7);
  EXPECT_THAT(ParseInt("n", "9", 0, 8).status().message(),
              HasSubstr("--n: 9 is out of range 0..8"));
  EXPECT_THAT(ParseInt("n", "seven", 0, 8).status().message(),
              HasSubstr("not an integer"));
  EXPECT_THAT(*ParseIntList("candidate_bits", "2,4,8", 0, 8),
              ElementsAre(2, 4, 8));
  EXPECT_FALSE(ParseIntList("candidate_bits", "2,4,", 0, 8).ok());
  EXPECT_EQ(*ParseReal("t", "0.02"), 0.02);
  EXPECT_EQ(*ParseReal("t", "-1"), -1.0);  // ranges: the config check's
  EXPECT_THAT(ParseReal("t", "tiny").status().message(),
              HasSubstr("--t: \"tiny\" is not a number"));
  EXPECT_FALSE(ParseReal("t", "inf").ok());
  EXPECT_EQ(*ParseDevice("CPU"), v1::DEVICE_CPU);
  EXPECT_EQ(*ParseDevice("cuda"), v1::DEVICE_CUDA);
  EXPECT_EQ(*ParseDevice("any"), v1::DEVICE_ANY);
  EXPECT_FALSE(ParseDevice("tpu").ok());
  EXPECT_EQ(*ParseJobState("succeeded"), v1::JOB_SUCCEEDED);
  EXPECT_EQ(*ParseJobState("RUNNING"), v1::JOB_RUNNING);
  EXPECT_FALSE(ParseJobState("state_unspecified").ok());
  EXPECT_FALSE(ParseJobState("done").ok());
}

TEST(BuildSubmitRequestTest, EveryFlag) {
  absl::StatusOr<ParsedArgs> p =
      ParseArgs(Submit(), Globals(),
                {"m-1", "--budget",         "MP4", "--activation_bits",
                 "8",   "--candidate_bits", "2,4", "--iterations",
                 "20",  "--batch_size",     "8",   "--seed",
                 "7",   "--threads",        "1",   "--priority",
                 "-3",  "--device",         "cpu", "--sensitivity_from",
                 "j-0", "--request_id",     "r-1"});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<v1::SubmitJobRequest> r = BuildSubmitRequest(*p, "m-1");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->model_id(), "m-1");
  EXPECT_EQ(r->config().budget(), "MP4");
  EXPECT_FALSE(r->config().has_weight_bits());
  EXPECT_EQ(r->config().activation_bits(), 8);
  EXPECT_THAT(r->config().candidate_bits(), ElementsAre(2, 4));
  EXPECT_EQ(r->config().distillation().iterations(), 20);
  EXPECT_EQ(r->config().distillation().batch_size(), 8);
  EXPECT_EQ(r->config().distillation().seed(), 7u);
  EXPECT_EQ(r->config().threads(), 1);
  EXPECT_EQ(r->priority(), -3);
  EXPECT_EQ(r->device(), v1::DEVICE_CPU);
  EXPECT_EQ(r->config().sensitivity_from_job(), "j-0");
  EXPECT_EQ(r->request_id(), "r-1");
}

TEST(BuildSubmitRequestTest, MethodsEarlyStopAndReconstruction) {
  absl::StatusOr<ParsedArgs> p = ParseArgs(
      Submit(), Globals(),
      {"m-1", "--activation_range", "percentile", "--activation_percentile",
       "99.9", "--early_stop_window", "150", "--early_stop_tolerance", "0.02",
       "--tv_weight", "2.5", "--reconstruct", "ADAROUND",
       "--reconstruct_iterations", "200"});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<v1::SubmitJobRequest> r = BuildSubmitRequest(*p, "m-1");
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::QuantizationConfig& c = r->config();
  EXPECT_EQ(c.activation_range(), v1::ACTIVATION_RANGE_PERCENTILE);
  EXPECT_EQ(c.activation_percentile(), 99.9);
  EXPECT_EQ(c.distillation().early_stop_window(), 150);
  EXPECT_EQ(c.distillation().early_stop_tolerance(), 0.02);
  EXPECT_EQ(c.distillation().tv_weight(), 2.5);
  EXPECT_EQ(c.reconstruct(), v1::RECONSTRUCT_ADAROUND);
  EXPECT_TRUE(c.reconstruction().has_iterations());
  EXPECT_EQ(c.reconstruction().iterations(), 200);

  // Every word of the schema is the enum value of its name.
  for (const char* word : {"minmax", "percentile", "mse"}) {
    p = ParseArgs(Submit(), Globals(), {"m-1", "--activation_range", word});
    ASSERT_TRUE(p.ok()) << p.status();
    r = BuildSubmitRequest(*p, "m-1");
    ASSERT_TRUE(r.ok()) << word << ": " << r.status();
    EXPECT_EQ(v1::ActivationRange_Name(r->config().activation_range()),
              "ACTIVATION_RANGE_" + absl::AsciiStrToUpper(word));
  }
  for (const char* word : {"none", "adaround", "block", "auto"}) {
    p = ParseArgs(Submit(), Globals(), {"m-1", "--reconstruct", word});
    ASSERT_TRUE(p.ok()) << p.status();
    r = BuildSubmitRequest(*p, "m-1");
    ASSERT_TRUE(r.ok()) << word << ": " << r.status();
    EXPECT_EQ(v1::ReconstructMethod_Name(r->config().reconstruct()),
              "RECONSTRUCT_" + absl::AsciiStrToUpper(word));
  }
  // 0: off, or the default (1000 steps), sent as set.
  p = ParseArgs(Submit(), Globals(),
                {"m-1", "--early_stop_window=0", "--reconstruct_iterations=0",
                 "--tv_weight=0"});
  ASSERT_TRUE(p.ok()) << p.status();
  r = BuildSubmitRequest(*p, "m-1");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->config().distillation().has_early_stop_window());
  EXPECT_TRUE(r->config().distillation().has_tv_weight());
  EXPECT_EQ(r->config().distillation().tv_weight(), 0);
  EXPECT_TRUE(r->config().reconstruction().has_iterations());
}

TEST(BuildSubmitRequestTest, DefaultsStayUnset) {
  absl::StatusOr<ParsedArgs> p = ParseArgs(Submit(), Globals(), {"m-1"});
  ASSERT_TRUE(p.ok());
  absl::StatusOr<v1::SubmitJobRequest> r = BuildSubmitRequest(*p, "m-1");
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->config().has_weight_bits());
  EXPECT_FALSE(r->config().has_activation_bits());
  EXPECT_FALSE(r->config().has_distillation());
  EXPECT_FALSE(r->config().has_activation_percentile());
  EXPECT_EQ(r->config().activation_range(), v1::ACTIVATION_RANGE_UNSPECIFIED);
  EXPECT_EQ(r->config().reconstruct(), v1::RECONSTRUCT_UNSPECIFIED);
  EXPECT_FALSE(r->config().has_reconstruction());
  EXPECT_EQ(r->device(), v1::DEVICE_ANY);
  EXPECT_TRUE(r->request_id().empty());
}

TEST(BuildSubmitRequestTest, BadValuesAreUsageErrors) {
  for (std::vector<std::string> argv : std::vector<std::vector<std::string>>{
           {"m-1", "--budget", "MP4", "--weight_bits", "4"},
           {"m-1", "--weight_bits", "9"},
           {"m-1", "--activation_bits", "x"},
           {"m-1", "--priority", "101"},
           {"m-1", "--threads", "257"},
           {"m-1", "--device", "tpu"},
           {"m-1", "--candidate_bits", "2,16"},
           {"m-1", "--budget="},
           {"m-1", "--activation_range", "median"},
           {"m-1", "--activation_range", "mse", "--activation_percentile",
            "99"},
           {"m-1", "--activation_percentile", "50"},
           {"m-1", "--activation_percentile", "x"},
           {"m-1", "--early_stop_window", "-1"},
           {"m-1", "--early_stop_window", "100001"},
           {"m-1", "--early_stop_tolerance", "0"},
           {"m-1", "--early_stop_tolerance", "1.5"},
           {"m-1", "--early_stop_tolerance", "nan"},
           {"m-1", "--reconstruct", "brecq"},
           {"m-1", "--reconstruct="},
           {"m-1", "--reconstruct_iterations", "-1"},
           {"m-1", "--reconstruct_iterations", "100001"},
           {"m-1", "--reconstruct_iterations", "many"}}) {
    absl::StatusOr<ParsedArgs> p = ParseArgs(Submit(), Globals(), argv);
    ASSERT_TRUE(p.ok()) << p.status();
    absl::StatusOr<v1::SubmitJobRequest> r = BuildSubmitRequest(*p, "m-1");
    EXPECT_FALSE(r.ok()) << argv[1];
    EXPECT_EQ(ExitCodeFor(r.status()), kExitUsage) << r.status();
  }
}

TEST(ErrorsTest, ExitCodesAndMessages) {
  absl::Status not_found = absl::NotFoundError("job \"j-x\" not found");
  EXPECT_EQ(ExitCodeFor(not_found), kExitError);
  EXPECT_EQ(FormatError(not_found), "NOT_FOUND: job \"j-x\" not found");
  EXPECT_EQ(ExitCodeFor(absl::InvalidArgumentError("budget")), kExitError);
  EXPECT_EQ(ExitCodeFor(absl::UnavailableError("gone")), kExitUnreachable);
  absl::Status unreachable = UnreachableError("cannot reach the server at x");
  EXPECT_EQ(ExitCodeFor(unreachable), kExitUnreachable);
  EXPECT_EQ(FormatError(unreachable), "cannot reach the server at x");
  EXPECT_EQ(FormatError(UsageError("bad")), "bad");
  EXPECT_EQ(ExitCodeFor(absl::OkStatus()), kExitOk);

  v1::Job job;
  job.set_id("j-1");
  job.set_state(v1::JOB_FAILED);
  job.mutable_error()->set_code(14);  // UNAVAILABLE, yet a job error: 1
  job.mutable_error()->set_message("worker lost");
  absl::Status failed = JobFailedError(job);
  EXPECT_EQ(ExitCodeFor(failed), kExitError);
  EXPECT_EQ(FormatError(failed), "UNAVAILABLE: job j-1 FAILED: worker lost");
  job.set_state(v1::JOB_CANCELLED);
  job.clear_error();
  EXPECT_THAT(FormatError(JobFailedError(job)), HasSubstr("job j-1 CANCELLED"));
}

TEST(TextTest, Names) {
  EXPECT_EQ(JobStateName(v1::JOB_SUCCEEDED), "SUCCEEDED");
  EXPECT_EQ(StageName(v1::STAGE_DISTILL), "DISTILL");
  EXPECT_EQ(StageName(v1::STAGE_RECONSTRUCT), "RECONSTRUCT");
  EXPECT_EQ(ModelStateName(v1::MODEL_READY), "READY");
  EXPECT_EQ(CodeName(5), "NOT_FOUND");
  EXPECT_EQ(FormatClock(75), "1:15");
  EXPECT_EQ(FormatClock(3725), "1:02:05");
  EXPECT_EQ(FormatClock(-1), "-:--");
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatTimestamp(google::protobuf::Timestamp()), "-");
}

v1::Job SucceededJob() {
  v1::Job job;
  job.set_id("j-1");
  job.set_model_id("m-1");
  job.set_state(v1::JOB_SUCCEEDED);
  v1::JobResult* r = job.mutable_result();
  for (const char* name : {"stem.0", "fc"}) {
    v1::LayerResult* l = r->add_layers();
    l->set_name(name);
    l->set_op("conv");
    l->set_params(1000);
    l->set_bits(4);
    for (int b : {2, 4, 8}) {
      l->add_candidate_bits(b);
      l->add_sensitivity(1.0 / b);
    }
  }
  r->set_quantizable_params(2000);
  r->set_weight_bytes(1000);
  r->set_float_weight_bytes(8000);
  r->set_calibration("distilled");
  r->set_distill_tv_weight(2.5);
  for (int i = 0; i < 3; ++i) {
    v1::ParetoPoint* p = r->add_frontier();
    p->set_size_bits(4000 * (i + 1));
    p->set_sensitivity(1.0 / (i + 1));
    p->add_bits(2 * (i + 1));
    p->add_bits(2 * (i + 1));
  }
  *r->mutable_chosen() = r->frontier(1);
  v1::Artifact* a = r->add_artifacts();
  a->set_name("model.zeroq.pt");
  a->set_size_bytes(2048);
  return job;
}

TEST(TextTest, ReportAndFrontier) {
  v1::Job job = SucceededJob();
  std::string report = JobReport(job);
  EXPECT_THAT(report, HasSubstr("stem.0"));
  EXPECT_THAT(report, HasSubstr("2:0.5  4:0.25  8:0.125"));
  EXPECT_THAT(report, HasSubstr("4.00 bits average"));
  EXPECT_THAT(report, HasSubstr("Pareto frontier: 3 points"));
  EXPECT_THAT(report, HasSubstr("model.zeroq.pt (2.0 KiB)"));
  EXPECT_THAT(report, HasSubstr("image prior weight 2.5"));
  EXPECT_THAT(DescribeJob(job), HasSubstr("state     SUCCEEDED"));

  const v1::JobResult& r = job.result();
  EXPECT_FALSE(IsChosen(r, r.frontier(0)));
  EXPECT_TRUE(IsChosen(r, r.frontier(1)));
  std::string table = FrontierTable(r);
  // Header, three points, the footer.
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), 5);
  EXPECT_THAT(table,
              HasSubstr("   1        0.98     4.000             0.5  *"));
  EXPECT_THAT(FrontierTable(v1::JobResult()), HasSubstr("no Pareto frontier"));

  // A chosen point off the frontier (the uniform width, measured closer to
  // float) gets a row of its own.
  v1::JobResult off = r;
  off.mutable_chosen()->clear_bits();
  off.mutable_chosen()->add_bits(2);
  off.mutable_chosen()->add_bits(6);
  off.mutable_chosen()->set_sensitivity(0.75);
  table = FrontierTable(off);
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), 6);
  EXPECT_EQ(std::count(table.begin(), table.end(), '*'), 2);  // the row, the footer
  EXPECT_THAT(table, HasSubstr("   -        0.98     4.000            0.75  *"));

  // The measured configurations, and the learned rounding, when the job
  // has them.
  v1::JobResult measured = r;
  v1::MeasuredPoint* m = measured.add_measured_points();
  *m->mutable_point() = r.frontier(1);
  m->set_output_kl(0.07);
  m->set_reconstructed_kl(0.0036);
  m = measured.add_measured_points();
  *m->mutable_point() = r.frontier(2);
  m->set_output_kl(0.12);
  m->set_uniform(true);
  table = FrontierTable(measured);
  EXPECT_THAT(table, HasSubstr("measured end to end"));
  EXPECT_THAT(table, HasSubstr("      0.98     4.000          0.07         0.0036  *\n"));
  EXPECT_THAT(table, HasSubstr("      1.46     6.000          0.12              -  uniform \n"));
  EXPECT_THAT(FrontierTable(r), ::testing::Not(HasSubstr("measured end to end")));
  v1::Job rounded = job;
  *rounded.mutable_result() = measured;
  v1::ReconstructionResult* rec = rounded.mutable_result()->mutable_reconstruction();
  rec->set_method("block");
  rec->set_iterations(500);
  for (double e : {0.5, 0.25}) {
    v1::ReconstructedUnit* u = rec->add_units();
    u->set_error_before(e);
    u->set_error_after(e / 4);
  }
  report = JobReport(rounded);
  EXPECT_THAT(report, HasSubstr("the closest to float of 2 measured"));
  EXPECT_THAT(report, HasSubstr("learned rounding: block, 2 units x 500 steps; "
                                "output error summed over them 0.75 -> 0.1875"));
  EXPECT_THAT(JobReport(job), ::testing::Not(HasSubstr("learned rounding")));
}

TEST(TextTest, Tables) {
  v1::Model m;
  m.set_id("m-1");
  m.set_name("net.pt");
  m.set_state(v1::MODEL_READY);
  m.add_input_shape(1);
  m.add_input_shape(28);
  m.add_input_shape(28);
  std::string models = ModelsTable({m});
  EXPECT_THAT(models, HasSubstr("1x28x28"));
  EXPECT_THAT(models, HasSubstr("READY"));
  EXPECT_THAT(DescribeModel(m), HasSubstr("model m-1: net.pt, input 1x28x28"));
  v1::Job j = SucceededJob();
  j.set_state(v1::JOB_RUNNING);
  j.set_stage(v1::STAGE_DISTILL);
  j.set_step(5);
  j.set_total(20);
  std::string jobs = JobsTable({j});
  EXPECT_THAT(jobs, HasSubstr("RUNNING"));
  EXPECT_THAT(jobs, HasSubstr("DISTILL"));
  EXPECT_THAT(jobs, HasSubstr("25%"));
}

v1::JobEvent Event(int64_t seq, v1::EventType type, double t) {
  v1::JobEvent e;
  e.set_seq(seq);
  e.set_type(type);
  e.mutable_time()->set_seconds(1000 + static_cast<int64_t>(t));
  e.mutable_time()->set_nanos(
      static_cast<int32_t>((t - static_cast<int64_t>(t)) * 1e9));
  return e;
}

TEST(ProgressViewTest, PlainLinesCarryEverySeq) {
  ProgressView view(/*terminal=*/false);
  std::string out;
  v1::JobEvent running = Event(2, v1::EVENT_STATE, 0);
  running.set_state(v1::JOB_RUNNING);
  running.set_message("running on cpu:0/1");
  out += view.OnEvent(running);
  for (int i = 0; i < 3; ++i) {
    v1::JobEvent e = Event(3 + i, v1::EVENT_PROGRESS, i);
    e.set_stage(v1::STAGE_DISTILL);
    e.set_step(i * 10);
    e.set_total(20);
    e.set_loss(0.5);
    out += view.OnEvent(e);
  }
  v1::JobEvent heartbeat = Event(5, v1::EVENT_HEARTBEAT, 5);
  EXPECT_EQ(view.OnEvent(heartbeat), "");
  v1::JobEvent s = Event(6, v1::EVENT_SENSITIVITY, 6);
  s.set_stage(v1::STAGE_SENSITIVITY);
  s.set_layer("fc");
  s.set_bits(4);
  s.set_omega(0.25);
  out += view.OnEvent(s);
  v1::JobEvent failed = Event(7, v1::EVENT_STATE, 7);
  failed.set_state(v1::JOB_FAILED);
  failed.mutable_error()->set_code(13);
  failed.mutable_error()->set_message("boom");
  out += view.OnEvent(failed);
  out += view.Finish();
  EXPECT_THAT(out, HasSubstr("[    2] RUNNING: running on cpu:0/1\n"));
  EXPECT_THAT(out, HasSubstr("[    4] DISTILL     10/20 loss 0.5\n"));
  EXPECT_THAT(out, HasSubstr("[    6] SENSITIVITY 0/0 fc W4 omega 0.25\n"));
  EXPECT_THAT(out, HasSubstr("[    7] FAILED INTERNAL: boom\n"));
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 6);
  EXPECT_THAT(out, Not(HasSubstr("\r")));
}

TEST(ProgressViewTest, TerminalBarWithEta) {
  ProgressView view(/*terminal=*/true, 120);
  v1::JobEvent running = Event(1, v1::EVENT_STATE, 0);
  running.set_state(v1::JOB_RUNNING);
  std::string out = view.OnEvent(running);
  EXPECT_EQ(out, "[    1] RUNNING\n");
  v1::JobEvent e = Event(2, v1::EVENT_PROGRESS, 0);
  e.set_stage(v1::STAGE_DISTILL);
  e.set_step(0);
  e.set_total(100);
  out = view.OnEvent(e);
  EXPECT_EQ(out.rfind("\rDISTILL", 0), 0u) << out;
  e = Event(3, v1::EVENT_PROGRESS, 10);
  e.set_stage(v1::STAGE_DISTILL);
  e.set_step(25);
  e.set_total(100);
  e.set_loss(1.5);
  out = view.OnEvent(e);
  // 25 steps in 10 s: 75 more take 30 s.
  EXPECT_THAT(out, HasSubstr("[#####...............]  25%"));
  EXPECT_THAT(out, HasSubstr("loss 1.5"));
  EXPECT_THAT(out, HasSubstr("0:10  ETA 0:30"));
  EXPECT_TRUE(absl::EndsWith(out, "\x1b[K"));
  // A new stage keeps the old bar on its own line.
  v1::JobEvent next = Event(4, v1::EVENT_PROGRESS, 12);
  next.set_stage(v1::STAGE_CALIBRATE);
  next.set_total(1);
  out = view.OnEvent(next);
  EXPECT_EQ(out.rfind("\n\rCALIBRATE", 0), 0u) << out;
  // A message goes above the bar; Finish ends nothing more.
  v1::JobEvent m = Event(5, v1::EVENT_MESSAGE, 13);
  m.set_message("hello");
  out = view.OnEvent(m);
  EXPECT_EQ(out, "\n[    5] hello\n");
  EXPECT_EQ(view.Finish(), "");
}

}  // namespace
}  // namespace zeroq::client
