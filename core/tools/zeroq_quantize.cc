// zeroq-quantize: runs a ZeroQ job on one machine, without the service.
//
//   zeroq-quantize --model model.pt --input-shape 3,224,224 --out out/
//
// Prints a progress bar on a terminal (plain lines otherwise), then the
// per-layer summary; writes the quantized model, the recipe, the data and a
// JSON report into --out. Exit status: 0 done, 1 job failed, 2 bad usage.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/config_schema.h"
#include "core/model.h"
#include "core/pipeline.h"

ABSL_FLAG(std::string, model, "", "TorchScript model file (required)");
ABSL_FLAG(std::string, input_shape, "",
          "one input sample without the batch, e.g. 3,224,224 (required)");
ABSL_FLAG(std::string, out, "", "output folder, created if missing (required)");
ABSL_FLAG(int, weight_bits, zeroq::kWeightBits.def, zeroq::kWeightBits.help);
ABSL_FLAG(std::string, layer_bits, "",
          "per-layer widths overriding --weight_bits: name=bits,name=bits");
ABSL_FLAG(int, activation_bits, zeroq::kActivationBits.def,
          zeroq::kActivationBits.help);
ABSL_FLAG(bool, quantize_layer_inputs, false,
          "also quantize every conv/linear input, not only ReLU outputs");
ABSL_FLAG(double, activation_percentile, zeroq::kActivationPercentile.def,
          zeroq::kActivationPercentile.help);
ABSL_FLAG(std::string, activation_range, "", zeroq::kActivationRange.help);
ABSL_FLAG(std::string, budget, "",
          "mixed precision within a weight budget: MP4 or 4 (average bits), "
          "8x (compression against float), 120KB / 1.5MiB / 30000B");
ABSL_FLAG(std::string, candidate_bits, "",
          "mixed-precision widths (default 2,3,4,6,8; with --sensitivity_from, "
          "the stored table's, or some of them)");
ABSL_FLAG(int, measured_points, zeroq::core::JobSpec().measured_points,
          "mixed precision: quantize this many frontier points nearest the "
          "budget (and the widest uniform width within it) and take the one "
          "whose outputs are closest to float's on the calibration data, "
          "0..64 (0: the lowest sensitivity sum)");
ABSL_FLAG(bool, sensitivity_others_8bit, false,
          "measure each layer's sensitivity with the others at 8 bits");
ABSL_FLAG(std::string, sensitivity_from, "",
          "re-plan from the sensitivity table in an earlier report.json "
          "(pass its distilled.pt as --calibration to reuse its data)");
ABSL_FLAG(int, batch_size, zeroq::kBatchSize.def, zeroq::kBatchSize.help);
ABSL_FLAG(int, num_batches, zeroq::kNumBatches.def, zeroq::kNumBatches.help);
// Unset: the default for the job's widths (DefaultDistillIterations).
ABSL_FLAG(std::optional<int>, iterations, std::nullopt, zeroq::kIterations.help);
ABSL_FLAG(double, lr, zeroq::kLearningRate.def, zeroq::kLearningRate.help);
ABSL_FLAG(int, early_stop_window, zeroq::kEarlyStopWindow.def,
          zeroq::kEarlyStopWindow.help);
ABSL_FLAG(double, early_stop_tolerance, zeroq::kEarlyStopTolerance.def,
          zeroq::kEarlyStopTolerance.help);
// Unset: the default for the job's widths (DefaultTvWeight).
ABSL_FLAG(std::optional<double>, tv_weight, std::nullopt,
          zeroq::kTvWeight.help);
ABSL_FLAG(std::string, reconstruct,
          zeroq::kReconstruct.choices[zeroq::kReconstruct.def],
          zeroq::kReconstruct.help);
ABSL_FLAG(int, reconstruct_iterations, zeroq::kReconstructIterations.def,
          zeroq::kReconstructIterations.help);
ABSL_FLAG(double, reconstruct_lr, 0,
          "Adam's learning rate on the rounding (0: the default, 0.01)");
ABSL_FLAG(double, reconstruct_activation_lr, -1,
          "block reconstruction: Adam's learning rate on the activation "
          "quantizers' steps (0: kept as calibrated; negative: the default)");
ABSL_FLAG(bool, reconstruct_learn_closing_step, true,
          "with --reconstruct_activation_lr: also learn the step of the "
          "quantizer that closes each block");
ABSL_FLAG(int, reconstruct_low_width_bits, -1,
          "blocks or layers with a weight width at most this learn with "
          "--reconstruct_low_width_lr/_iterations (negative: the default)");
ABSL_FLAG(double, reconstruct_low_width_lr, -1,
          "learning rate at low widths (0: --reconstruct_lr; negative: the "
          "default)");
ABSL_FLAG(int, reconstruct_low_width_iterations, -1,
          "steps at low widths (0: --reconstruct_iterations; negative: the "
          "default)");
ABSL_FLAG(double, reconstruct_holdout, -1,
          "block reconstruction: share of the calibration samples held out "
          "of the steps to judge each block's result on, 0..1 (negative: the "
          "default, 0)");
ABSL_FLAG(double, reconstruct_drop_probability, -1,
          "reconstruction: per step and element, the float model's input to "
          "a layer or block (and to each quantizer inside a block) instead of "
          "the quantized one with this probability, 0..1 (QDrop; negative: "
          "the default, 0)");
ABSL_FLAG(int, reconstruct_check_every, -1,
          "block reconstruction: judge the rounding every this many steps "
          "and keep the best (0: the last; negative: the default, 0)");
ABSL_FLAG(int, reconstruct_fisher_bits, -1,
          "block reconstruction: blocks whose weight widths are all at most this "
          "weigh their output error by the squared gradient of the float "
          "model's loss on its own predictions (0: none; negative: the "
          "default, 2)");
ABSL_FLAG(bool, plateau, true, "ReduceLROnPlateau on the distillation loss");
ABSL_FLAG(std::string, init, "reference",
          "distillation start: reference (tiny uniform noise) or gaussian");
ABSL_FLAG(std::string, stats, "per-sample",
          "BN statistics over: per-sample (reference) or per-batch");
ABSL_FLAG(double, eps, 1e-6, "eps in sqrt(var + eps)");
ABSL_FLAG(uint64_t, seed, 0, "random seed");
ABSL_FLAG(std::string, calibration, "distilled",
          "calibration data: distilled, gaussian, or a tensor file [N,...]");
ABSL_FLAG(int, threads, zeroq::kThreads.def, zeroq::kThreads.help);
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, progress, "auto", "auto, bar, lines or none");
ABSL_FLAG(bool, json, false, "print the report as JSON instead of a table");
ABSL_FLAG(bool, check_config, false,
          "check the options against their ranges and the model's layers, "
          "print \"config ok\" and exit, without quantizing");

namespace {

zeroq::core::CancellationToken* g_cancel = nullptr;
void OnSignal(int) {
  if (g_cancel != nullptr) g_cancel->Cancel();
}

int Usage(const std::string& message) {
  std::cerr << "zeroq-quantize: " << message
            << "\nRun zeroq-quantize --help for the options.\n";
  return 2;
}

// A method flag's word as its proto value (1..): 0 for an empty flag (the
// config's unset). False for a word the schema does not know.
bool ParseChoice(const zeroq::ChoiceField& field, const std::string& word, int* value) {
  *value = 0;
  if (word.empty()) return true;
  const int i = field.Find(word);
  if (i < 0) return false;
  *value = i + 1;
  return true;
}

class ProgressPrinter {
 public:
  explicit ProgressPrinter(bool bar) : bar_(bar) {}
  ~ProgressPrinter() { Finish(); }

  void operator()(const zeroq::core::ProgressEvent& e) {
    using zeroq::core::StageName;
    const bool new_stage = e.stage != stage_ || first_;
    first_ = false;
    stage_ = e.stage;
    if (new_stage) stage_start_ = std::chrono::steady_clock::now();
    const double pct = e.total > 0 ? 100.0 * e.step / e.total : 0.0;
    std::string detail = e.message;
    if (!std::isnan(e.loss)) {
      detail = absl::StrFormat("loss %.4g  lr %.3g", e.loss, e.lr);
    }
    if (bar_) {
      const double secs = std::chrono::duration<double>(
                              std::chrono::steady_clock::now() - stage_start_)
                              .count();
      const int width = 24;
      int filled = static_cast<int>(pct / 100.0 * width);
      std::string bar(filled, '#');
      bar.resize(width, '.');
      if (new_stage && open_) std::fputs("\n", stderr);
      std::string eta;
      if (e.step > 0 && e.total > e.step) {
        eta = absl::StrFormat("  eta %.0fs", secs * (e.total - e.step) / e.step);
      }
      std::fprintf(stderr, "\r%-11s [%s] %5.1f%%  %-40.40s %5.1fs%s\x1b[K",
                   StageName(e.stage), bar.c_str(), pct, detail.c_str(), secs,
                   eta.c_str());
      std::fflush(stderr);
      open_ = true;
      return;
    }
    // Plain lines: every stage change, every message, each 10% of a stage.
    const int decile = static_cast<int>(pct / 10.0);
    if (new_stage || std::isnan(e.loss) || decile != last_decile_) {
      std::fprintf(stderr, "%s %lld/%lld %s\n", StageName(e.stage),
                   static_cast<long long>(e.step),
                   static_cast<long long>(e.total), detail.c_str());
      last_decile_ = decile;
    }
  }

  void Finish() {
    if (bar_ && open_) std::fputs("\n", stderr);
    open_ = false;
  }

 private:
  bool bar_;
  bool open_ = false;
  bool first_ = true;
  int last_decile_ = -1;
  zeroq::core::Stage stage_ = zeroq::core::Stage::kInspect;
  std::chrono::steady_clock::time_point stage_start_;
};

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "quantizes a TorchScript model with ZeroQ, without data.\n"
      "  zeroq-quantize --model M.pt --input_shape C,H,W --out DIR [options]");
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) return Usage(absl::StrCat("unexpected argument ", rest[1]));

  zeroq::core::JobSpec spec;
  spec.model_path = absl::GetFlag(FLAGS_model);
  if (spec.model_path.empty()) return Usage("--model is required");
  if (access(spec.model_path.c_str(), R_OK) != 0) {
    return Usage(absl::StrCat("cannot read model file ", spec.model_path));
  }
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_input_shape), ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return Usage(absl::StrCat("--input_shape: \"", part,
                                "\" is not a positive integer"));
    }
    spec.input_shape.push_back(v);
  }
  if (spec.input_shape.empty()) {
    return Usage("--input_shape is required, e.g. --input_shape=3,224,224");
  }
  spec.output_dir = absl::GetFlag(FLAGS_out);
  const bool check_only = absl::GetFlag(FLAGS_check_config);
  if (spec.output_dir.empty() && !check_only) return Usage("--out is required");
  if (!check_only &&
      std::system(absl::StrCat("mkdir -p '", spec.output_dir, "'").c_str()) != 0) {
    return Usage(absl::StrCat("cannot create ", spec.output_dir));
  }

  zeroq::core::QuantOptions& q = spec.quant;
  q.weight_bits = absl::GetFlag(FLAGS_weight_bits);
  q.activation_bits = absl::GetFlag(FLAGS_activation_bits);
  q.quantize_layer_inputs = absl::GetFlag(FLAGS_quantize_layer_inputs);
  q.activation_percentile = absl::GetFlag(FLAGS_activation_percentile);
  int range = 0;  // 0: kAuto, as an unset config field
  if (!ParseChoice(zeroq::kActivationRange, absl::GetFlag(FLAGS_activation_range),
                   &range)) {
    return Usage(absl::StrCat("--activation_range: \"",
                              absl::GetFlag(FLAGS_activation_range), "\" is not ",
                              zeroq::kActivationRange.Describe()));
  }
  if (range > 0) q.activation_range = static_cast<zeroq::core::ActivationRange>(range);
  for (absl::string_view item :
       absl::StrSplit(absl::GetFlag(FLAGS_layer_bits), ',', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(item, '=');
    int bits;
    if (kv.first.empty() || !absl::SimpleAtoi(kv.second, &bits)) {
      return Usage(absl::StrCat("--layer_bits: \"", item, "\" is not name=bits"));
    }
    q.layer_bits[kv.first] = bits;
  }

  const std::string budget = absl::GetFlag(FLAGS_budget);
  if (!budget.empty()) {
    absl::StatusOr<zeroq::core::Budget> b = zeroq::core::ParseBudget(budget);
    if (!b.ok()) return Usage(absl::StrCat("--budget: ", b.status().message()));
    spec.budget = *b;
    const bool explicit_widths = !absl::GetFlag(FLAGS_candidate_bits).empty();
    if (explicit_widths) spec.sensitivity.bits.clear();  // else the default
    for (absl::string_view part :
         absl::StrSplit(absl::GetFlag(FLAGS_candidate_bits), ',', absl::SkipEmpty())) {
      int k;
      if (!absl::SimpleAtoi(part, &k)) {
        return Usage(absl::StrCat("--candidate_bits: \"", part, "\" is not a width"));
      }
      spec.sensitivity.bits.push_back(k);
    }
    spec.sensitivity.others_at_8bit = absl::GetFlag(FLAGS_sensitivity_others_8bit);
    spec.measured_points = absl::GetFlag(FLAGS_measured_points);
    const std::string from = absl::GetFlag(FLAGS_sensitivity_from);
    if (!from.empty()) {
      std::ifstream in(from);
      if (!in) return Usage(absl::StrCat("cannot read ", from));
      std::stringstream text;
      text << in.rdbuf();
      auto table = zeroq::core::SensitivityFromReportJson(text.str());
      if (!table.ok()) return Usage(absl::StrCat(from, ": ", table.status().message()));
      spec.precomputed_sensitivity = std::move(*table);
      // Widths given explicitly narrow the stored table's.
      if (explicit_widths) spec.replan_widths = spec.sensitivity.bits;
    }
  } else if (!absl::GetFlag(FLAGS_sensitivity_from).empty()) {
    return Usage("--sensitivity_from needs --budget");
  }

  zeroq::core::DistillOptions& d = spec.distill;
  d.batch_size = absl::GetFlag(FLAGS_batch_size);
  d.num_batches = absl::GetFlag(FLAGS_num_batches);
  d.lr = absl::GetFlag(FLAGS_lr);
  d.early_stop_window = absl::GetFlag(FLAGS_early_stop_window);
  d.early_stop_tolerance = absl::GetFlag(FLAGS_early_stop_tolerance);
  d.plateau_scheduler = absl::GetFlag(FLAGS_plateau);
  d.eps = absl::GetFlag(FLAGS_eps);
  d.seed = absl::GetFlag(FLAGS_seed);
  spec.reconstruct.seed = d.seed;
  const std::string init = absl::GetFlag(FLAGS_init);
  if (init == "reference") {
    d.init = zeroq::core::DistillInit::kReference;
  } else if (init == "gaussian") {
    d.init = zeroq::core::DistillInit::kGaussian;
  } else {
    return Usage(absl::StrCat("--init: \"", init, "\" is not reference or gaussian"));
  }
  const std::string stats = absl::GetFlag(FLAGS_stats);
  if (stats == "per-sample") {
    d.stats = zeroq::core::DistillStats::kPerSample;
  } else if (stats == "per-batch") {
    d.stats = zeroq::core::DistillStats::kPerBatch;
  } else {
    return Usage(absl::StrCat("--stats: \"", stats, "\" is not per-sample or per-batch"));
  }
  zeroq::core::ReconstructOptions& r = spec.reconstruct;
  int method = 0;  // 0: the default, as an unset config field
  if (!ParseChoice(zeroq::kReconstruct, absl::GetFlag(FLAGS_reconstruct), &method)) {
    return Usage(absl::StrCat("--reconstruct: \"", absl::GetFlag(FLAGS_reconstruct),
                              "\" is not ", zeroq::kReconstruct.Describe()));
  }
  if (method > 0) r.method = static_cast<zeroq::core::ReconstructMethod>(method);
  // 0: the default, as in a QuantizationConfig; the range is the schema's,
  // checked here so that --check_config refuses what SubmitJob refuses.
  if (const int iterations = absl::GetFlag(FLAGS_reconstruct_iterations);
      !zeroq::kReconstructIterations.Contains(iterations)) {
    return Usage(absl::StrCat("INVALID_ARGUMENT: ",
                              zeroq::kReconstructIterations.name, " = ",
                              iterations, " (--reconstruct_iterations): must be ",
                              zeroq::kReconstructIterations.Describe()));
  } else if (iterations != 0) {
    r.iterations = iterations;
  }
  if (const double lr = absl::GetFlag(FLAGS_reconstruct_lr); lr > 0) r.lr = lr;
  if (const double lr = absl::GetFlag(FLAGS_reconstruct_activation_lr); lr >= 0) {
    r.activation_lr = lr;
  }
  r.learn_closing_step = absl::GetFlag(FLAGS_reconstruct_learn_closing_step);
  if (const int bits = absl::GetFlag(FLAGS_reconstruct_low_width_bits); bits >= 0) {
    r.low_width_bits = bits;
  }
  if (const double lr = absl::GetFlag(FLAGS_reconstruct_low_width_lr); lr >= 0) {
    r.low_width_lr = lr;
  }
  if (const int n = absl::GetFlag(FLAGS_reconstruct_low_width_iterations); n >= 0) {
    r.low_width_iterations = n;
  }
  if (const double h = absl::GetFlag(FLAGS_reconstruct_holdout); h >= 0) r.holdout = h;
  if (const double p = absl::GetFlag(FLAGS_reconstruct_drop_probability); p >= 0) {
    r.drop_probability = p;
  }
  if (const int bits = absl::GetFlag(FLAGS_reconstruct_fisher_bits); bits >= 0) {
    r.fisher_bits = bits;
  }
  if (const int n = absl::GetFlag(FLAGS_reconstruct_check_every); n >= 0) {
    r.check_every = n;
  }
  // After the widths, the budget and the method: the default depends on them.
  d.iterations = absl::GetFlag(FLAGS_iterations).value_or(
      zeroq::core::DefaultDistillIterations(spec));
  d.tv_weight = absl::GetFlag(FLAGS_tv_weight).value_or(
      zeroq::core::DefaultTvWeight(spec));
  const std::string calibration = absl::GetFlag(FLAGS_calibration);
  if (calibration == "distilled") {
    spec.calibration = zeroq::core::CalibrationSource::kDistilled;
  } else if (calibration == "gaussian") {
    spec.calibration = zeroq::core::CalibrationSource::kGaussian;
  } else {
    spec.calibration = zeroq::core::CalibrationSource::kFile;
    spec.calibration_file = calibration;
  }
  spec.threads = absl::GetFlag(FLAGS_threads);
  spec.device = absl::GetFlag(FLAGS_device);

  if (check_only) {
    zeroq::core::SetUpProcess(1);
    absl::StatusOr<std::unique_ptr<zeroq::core::Model>> model =
        zeroq::core::Model::LoadFromFile(spec.model_path, spec.device);
    absl::Status status = model.status();
    if (status.ok()) status = zeroq::core::ValidateJobSpec(**model, spec);
    if (!status.ok()) {
      return Usage(absl::StrCat(absl::StatusCodeToString(status.code()), ": ",
                                status.message()));
    }
    std::cout << "config ok\n";
    return 0;
  }

  const std::string mode = absl::GetFlag(FLAGS_progress);
  if (mode != "auto" && mode != "bar" && mode != "lines" && mode != "none") {
    return Usage(absl::StrCat("--progress: \"", mode, "\" is not auto, bar, lines or none"));
  }
  const bool bar = mode == "bar" || (mode == "auto" && isatty(STDERR_FILENO));
  ProgressPrinter printer(bar);
  zeroq::core::ProgressFn on_progress;
  if (mode != "none") on_progress = std::ref(printer);

  zeroq::core::CancellationToken cancel;
  g_cancel = &cancel;
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);

  absl::StatusOr<zeroq::core::JobResult> result =
      zeroq::core::RunJob(spec, on_progress, &cancel);
  printer.Finish();
  if (!result.ok()) {
    std::cerr << "zeroq-quantize: "
              << absl::StatusCodeToString(result.status().code()) << ": "
              << result.status().message() << "\n";
    return 1;
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << zeroq::core::ResultJson(*result) << "\n";
  } else {
    std::cout << zeroq::core::FormatSummary(*result);
  }
  return 0;
}
