// options.h: the plain option structs of the ZeroQ core, free of LibTorch
// types so that the worker, tools and tests can fill them without the heavy
// headers. Every field documents its default; the defaults are the reference
// implementation's choices (ZEROQ.md), except the activation range: the MSE
// search, measured better than the reference's min/max at 4-bit activations
// and no worse at 8 (README).
//
//   DistillOptions d;            // 1 batch of 32, 500 Adam iterations
//   d.iterations = 200;
//   d.early_stop_window = 150;   // a batch ends once its loss stops improving
//   QuantOptions q;              // W8A8, ReLU/ReLU6 outputs, MSE ranges
//   q.weight_bits = 4;
#ifndef ZEROQ_CORE_OPTIONS_H_
#define ZEROQ_CORE_OPTIONS_H_

#include <cstdint>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "common/config_schema.h"

namespace zeroq::core {

// How distillation starts its inputs.
enum class DistillInit {
  // Reference: uniform integers 0..254, minus 127.5, divided by 5418.75.
  kReference,
  // The paper's text: N(0, 1).
  kGaussian,
};

// Over what the BN-input statistics are computed.
enum class DistillStats {
  // Reference: per sample over H*W (batch x C), loss divided by batch.
  kPerSample,
  // Per channel over the whole batch (C), no division.
  kPerBatch,
};

struct DistillOptions {
  // Defaults and ranges: common/config_schema.h.
  int batch_size = static_cast<int>(kBatchSize.def);    // images per batch
  int num_batches = static_cast<int>(kNumBatches.def);  // each optimised alone
  int iterations = static_cast<int>(kIterations.def);   // Adam steps per batch
  double lr = kLearningRate.def;                        // Adam learning rate
  bool plateau_scheduler = true;  // ReduceLROnPlateau on the loss, per step
  double plateau_factor = 0.1;
  int plateau_patience = 100;
  double min_lr = 1e-4;
  double eps = 1e-6;           // in sqrt(var + eps), for targets and batches
  DistillInit init = DistillInit::kReference;
  DistillStats stats = DistillStats::kPerSample;
  bool match_input_stats = true;  // also pull the input to mean 0 / std 1
  // Early stop, per batch: after iteration t > early_stop_window, stop once
  // best(t - window) - best(t) <= early_stop_tolerance * best(t - window),
  // best(t) being the least loss of iterations 1..t. 0 = off: always
  // `iterations` steps (the reference). Never stops before window + 1.
  int early_stop_window = static_cast<int>(kEarlyStopWindow.def);
  double early_stop_tolerance = kEarlyStopTolerance.def;
  // Weight of the input's total variation (see BnStatisticsLoss), added to the
  // loss: a prior toward flat regions, as natural images have. 0: off.
  double tv_weight = kTvWeight.def;
  uint64_t seed = 0;           // same seed + thread count = same data
};

// How each activation site's range is set from its calibration values.
enum class ActivationRange {
  // kPercentile when activation_percentile is below 100, else
  // kDefaultActivationRange: what an unset config field means.
  kAuto,
  // The reference: the running min/max.
  kMinMax,
  // The [100 - p, p] percentiles, p = activation_percentile (100: min/max).
  kPercentile,
  // The clipping range (a fraction of min/max, on a grid of 100) with the
  // least mean squared error between the values and their quantized values at
  // the site's width.
  kMse,
};
// The schema's words are these methods, in this order from 1 (as the proto).
static_assert(kActivationRange.Find("minmax") + 1 ==
                  static_cast<int>(ActivationRange::kMinMax) &&
              kActivationRange.Find("percentile") + 1 ==
                  static_cast<int>(ActivationRange::kPercentile) &&
              kActivationRange.Find("mse") + 1 ==
                  static_cast<int>(ActivationRange::kMse));
inline constexpr ActivationRange kDefaultActivationRange =
    static_cast<ActivationRange>(kActivationRange.def + 1);

struct QuantOptions {
  // Uniform weight width for every conv/linear layer, 2..8; 0 keeps weights
  // in float. `layer_bits` overrides it per layer (module path name -> bits).
  int weight_bits = static_cast<int>(kWeightBits.def);
  std::map<std::string, int> layer_bits;
  // Activation width, 2..16; 0 keeps activations in float.
  int activation_bits = static_cast<int>(kActivationBits.def);
  // Reference: only ReLU/ReLU6 outputs are quantized. This also quantizes the
  // input of every conv/linear layer (network input, residual sums, pooled
  // features before the classifier).
  bool quantize_layer_inputs = false;
  // kAuto: percentile clipping when activation_percentile < 100, else
  // kDefaultActivationRange.
  ActivationRange activation_range = ActivationRange::kAuto;
  // For kPercentile (and kAuto): 100 = min/max range (reference); below 100,
  // e.g. 99.99, clips the range to the [100 - p, p] percentiles of the
  // calibration activations. Must stay 100 with kMinMax and kMse.
  double activation_percentile = kActivationPercentile.def;
};

// The method kAuto stands for with these options (never kAuto).
inline ActivationRange ResolvedActivationRange(const QuantOptions& o) {
  if (o.activation_range != ActivationRange::kAuto) return o.activation_range;
  return o.activation_percentile < 100.0 ? ActivationRange::kPercentile
                                         : kDefaultActivationRange;
}

// How the reconstruction stage (reconstruct.h) learns weight rounding. The
// values are QuantizationConfig.reconstruct's (kReconstruct's words from 1).
enum class ReconstructMethod {
  kNone = 1,      // round to nearest (plain ZeroQ)
  kAdaRound = 2,  // learned rounding, layer by layer (AdaRound)
  kBlock = 3,     // learned rounding, block by block (BRECQ, QDrop)
  // kBlock where it pays (a weight or activation width under 5 bits), else
  // kNone: the measured choice (README).
  kAuto = 4,
};
static_assert(kReconstruct.Find("none") + 1 == static_cast<int>(ReconstructMethod::kNone) &&
              kReconstruct.Find("adaround") + 1 == static_cast<int>(ReconstructMethod::kAdaRound) &&
              kReconstruct.Find("block") + 1 == static_cast<int>(ReconstructMethod::kBlock) &&
              kReconstruct.Find("auto") + 1 == static_cast<int>(ReconstructMethod::kAuto));
inline constexpr ReconstructMethod kDefaultReconstruct =
    static_cast<ReconstructMethod>(kReconstruct.def + 1);

struct ReconstructOptions {
  ReconstructMethod method = kDefaultReconstruct;
  // Adam steps per layer (adaround) or block (block).
  int iterations = static_cast<int>(kReconstructIterations.def);
  int batch_size = 32;            // calibration samples per step (fewer: all)
  double lr = 1e-2;               // Adam on the rounding variables
  double reg_weight = 0.01;       // lambda of the rounding regulariser
  double warmup = 0.2;            // share of steps without the regulariser
  double beta_start = 20, beta_end = 2;  // its annealed exponent
  // Per step and input element: the float model's input instead of the
  // quantized model's, with this probability (0: always the quantized one).
  double drop_probability = 0;
  // Weight ranges per channel by least squared error instead of min/max.
  bool weight_range_mse = true;
  // Also learn a per-channel output shift, folded into the BatchNorm's (or
  // the layer's) bias: the mean error the rounding cannot remove.
  bool learn_shift = true;
  // Block method: Adam's learning rate on the step size of every activation
  // quantizer in a block, learned with its rounding (LSQ's gradient through
  // the rounding); the block's output is then compared after its closing
  // quantizer, so that one is fitted too. 0: the calibrated steps stay.
  double activation_lr = 0;
  // With activation_lr: also the step of the quantizer that closes a block,
  // its output then compared after that quantizer (false: only the
  // quantizers inside, the output compared before the closing one).
  bool learn_closing_step = true;
  // A block (or layer) whose narrowest weight width is at most
  // low_width_bits learns with low_width_lr and low_width_iterations
  // instead of lr and iterations (0: those). Few-level grids overfit the
  // calibration samples at the rate that suits wider ones.
  int low_width_bits = 0;
  double low_width_lr = 0;
  int low_width_iterations = 0;
  // Block method: this share of the calibration samples (the last ones,
  // rounded down) is left out of the steps, and a block's learned result is
  // judged on them: kept only where it beats round to nearest there; 0:
  // judged on the samples it learned from. (fashion_resnet W2A8: 74.32
  // top-1 judged on all, 81.65 with 0.25 held out and check_every 50; but
  // fashion_mobilenet_v2 W2A8 75.06 against 59.51.)
  double holdout = 0;
  // Block method: every check_every steps the hard rounding as it stands is
  // judged too, and the best judged result is kept (0: the last one).
  int check_every = 0;
  // Block method: a block whose every weight width is at most fisher_bits
  // has its output error weighted element by element by the
  // squared gradient of the float model's cross-entropy against its own
  // predictions (per sample scaled to mean 1) instead of uniformly; 0:
  // never. Measured (README, "Learned rounding"): at W2A8 fashion_resnet
  // 82.04 top-1 against 74.32, fashion_mobilenet_v2 78.03 against 75.06,
  // fashion_cnn 88.53 against 87.92; at W4A4 fashion_mobilenet_v2 87.23
  // against 88.13, hence only at 2 bits; and only where the whole block is
  // that narrow: under MP4 a block with one 2-bit layer among wider ones,
  // weighted, cost fashion_mobilenet_v2 its mixed point's lead.
  int fisher_bits = 2;
  uint64_t seed = 0;
};

struct SensitivityOptions {
  // Candidate widths, each 2..8.
  std::vector<int> bits = {std::begin(kDefaultCandidateBits),
                           std::end(kDefaultCandidateBits)};
  bool others_at_8bit = false;        // other layers' weights at 8 bits
  bool slice_graph = true;            // false: naive full forwards
};

// One row of the sensitivity table.
struct LayerSensitivity {
  std::string name;                   // Model::summary().layers order
  int64_t params = 0;
  std::vector<int> bits;              // = SensitivityOptions::bits
  std::vector<double> omega;          // Omega_i(bits[j])
};

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_OPTIONS_H_
