// convert.h: between the worker protocol (zeroq/v1/worker.proto) and the
// core's plain structs (core/pipeline.h). Free of LibTorch types and of any
// I/O except reading the files a RunRequest names and sizing artifacts.
//
//   ZQ_ASSIGN_OR_RETURN(core::JobSpec spec, JobSpecFromRunRequest(request));
//   auto on_progress = [&](const core::ProgressEvent& e) {
//     Send(EventFromProgress(e));
//   };
//   ZQ_ASSIGN_OR_RETURN(core::JobResult r, core::RunJob(spec, on_progress));
//   v1::JobResult proto = ResultToProto(r);
#ifndef ZEROQ_CORE_WORKER_CONVERT_H_
#define ZEROQ_CORE_WORKER_CONVERT_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/pipeline.h"
#include "zeroq/v1/worker.pb.h"

namespace zeroq::worker {

namespace v1 = ::zeroq::v1;

// The job a RunRequest describes. Unset optional fields take the core's
// defaults (core/options.h), as do an unset activation_range or reconstruct
// and a reconstruction.iterations of 0; an empty candidate_bits is
// {2, 3, 4, 6, 8}. A non-empty
// sensitivity_report_path is read as a report.json and its sensitivity table
// becomes precomputed_sensitivity (it needs a budget); a non-empty
// calibration_data_path replaces the configured calibration with that tensor
// file. config.sensitivity_from_job is the server's business (it resolves it
// into those two paths) and is ignored here. threads: request.threads when
// > 0, else config.threads, else 0 (all cores). device: "cpu" when empty.
// INVALID_ARGUMENT naming the field, e.g. "config.weight_bits: 9 is outside
// 2..8", for values outside the ranges zeroq.proto documents and for report
// files that cannot be read or hold no sensitivity table.
absl::StatusOr<core::JobSpec> JobSpecFromRunRequest(
    const v1::RunRequest& request);

// A progress event as the protocol's JobEvent (seq and time unset):
//  - SENSITIVITY stage with a layer: EVENT_SENSITIVITY (layer, bits, omega);
//  - PARETO stage with a size and no message: EVENT_PARETO (size_bits, omega,
//    chosen = bits == 1);
//  - step, total or a loss: EVENT_PROGRESS (with the message, if any);
//  - otherwise EVENT_MESSAGE.
// Stage, step, total and message are always copied; NaN loss, lr and omega
// become 0 (JSON clients cannot take NaN).
v1::JobEvent EventFromProgress(const core::ProgressEvent& event);

// The result as the protocol's JobResult. Layers carry their candidate widths
// and Omega from result.sensitivity, matched by name (mixed precision only);
// NaN losses become 0; stage_seconds keep their order, as v1::Stage.
// Artifacts: the files RunJob wrote that exist, named by their basenames,
// with their sizes; sha256 is left empty (the server computes it).
// `calibration` is "distilled", "gaussian" or, for a calibration file, the
// file's basename: the server's paths are not shown to clients.
v1::JobResult ResultToProto(const core::JobResult& result);

// The google.rpc.Code of a status: absl's codes equal gRPC's numerically.
int RpcCode(const absl::Status& status);

// JobError{code, message} of a non-OK status.
v1::JobError ErrorFromStatus(const absl::Status& status);

// v1::Stage of a core stage: the same value (convert.cc asserts that the
// enums agree); STAGE_UNSPECIFIED for a value outside the protocol's.
v1::Stage StageToProto(core::Stage stage);

}  // namespace zeroq::worker

#endif  // ZEROQ_CORE_WORKER_CONVERT_H_
