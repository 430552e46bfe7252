// stage.h: the stages of a ZeroQ job, their progress events, and the sink a
// stage reports them through. Free of LibTorch types: pipeline.h includes it.
//
//   for (Stage s : AllStages()) std::cout << StageName(s) << "\n";
//   StageProgress progress(Stage::kDistill, on_progress);
//   progress.Step(3, 500, "");   // a ProgressEvent with stage kDistill
//
// The order of the stages, their names and which of them run for a job are
// one table, the stage list in core/stages/driver.cc. The enum's values are
// those of zeroq.v1.Stage (proto/zeroq/v1/zeroq.proto), so that the worker
// converts by a cast (core/worker/convert.cc checks it at compile time).
#ifndef ZEROQ_CORE_STAGES_STAGE_H_
#define ZEROQ_CORE_STAGES_STAGE_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace zeroq::core {

// Values equal zeroq.v1.Stage's (0 is its STAGE_UNSPECIFIED); contiguous.
enum class Stage {
  kInspect = 1,
  kDistill,
  kSensitivity,
  kPareto,
  kCalibrate,
  kExport,
  kReconstruct,  // runs between kCalibrate and kExport
};
inline constexpr Stage kFirstStage = Stage::kInspect;
inline constexpr Stage kLastStage = Stage::kReconstruct;

// Every stage in the order a job runs them (whether or not they apply).
const std::vector<Stage>& AllStages();
// "INSPECT", "DISTILL", ...: zeroq.v1.Stage's names without "STAGE_", and
// the keys of report.json's stage_seconds. "UNKNOWN" outside the list.
const char* StageName(Stage stage);

struct ProgressEvent {
  Stage stage = Stage::kInspect;
  int64_t step = 0;      // progress within the stage, of `total`
  int64_t total = 0;     // 0 when unknown
  double loss = std::numeric_limits<double>::quiet_NaN();  // distillation
  double lr = std::numeric_limits<double>::quiet_NaN();
  std::string message;   // human-readable, may be empty
  // SENSITIVITY: the layer and width just measured and its Omega.
  // PARETO: one frontier point per event (size_bits, omega = its total
  // sensitivity, bits = 1 when it is the chosen point), then the choice.
  std::string layer;
  int bits = 0;
  double omega = std::numeric_limits<double>::quiet_NaN();
  int64_t size_bits = 0;
};
using ProgressFn = std::function<void(const ProgressEvent&)>;

// Where one stage reports progress: it stamps its stage on every event, so
// a stage's code never names itself. Cheap to copy; runs the callback on the
// calling thread.
class StageProgress {
 public:
  // `fn` may be empty (nobody listens); it must outlive this object.
  StageProgress(Stage stage, const ProgressFn& fn) : stage_(stage), fn_(&fn) {}

  Stage stage() const { return stage_; }

  // Sends `event` as this stage's (its `stage` field is overwritten).
  void operator()(ProgressEvent event) const {
    if (!*fn_) return;
    event.stage = stage_;
    (*fn_)(event);
  }
  // Step `step` of `total`, with a message (may be empty).
  void Step(int64_t step, int64_t total, std::string message) const {
    ProgressEvent event;
    event.step = step;
    event.total = total;
    event.message = std::move(message);
    (*this)(std::move(event));
  }

 private:
  Stage stage_;
  const ProgressFn* fn_;
};

}  // namespace zeroq::core

#endif  // ZEROQ_CORE_STAGES_STAGE_H_
