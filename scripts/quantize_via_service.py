#!/usr/bin/env python3
"""Quantizes a model through a running zeroq-server with the Python client:
upload, wait for inspection, submit, follow the progress stream, print the
per-layer report, download the artifacts.

  /usr/bin/python3 scripts/quantize_via_service.py --server 127.0.0.1:50051 \
      --model tests/models/fashion_cnn.pt --input_shape 1,28,28 --budget MP4 --out DIR
"""
import argparse
import os
import sys
import time

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(root, "build", "python"), os.path.join(root, "client", "python")]

from zeroq.v1 import zeroq_pb2 as pb  # noqa: E402
from zeroq_client import ZeroQClient  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input_shape", required=True)
    ap.add_argument("--budget", default="MP4")
    ap.add_argument("--activation_bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    c = ZeroQClient(a.server)
    shape = [int(s) for s in a.input_shape.split(",")]

    t0 = time.monotonic()
    model = c.upload_model(a.model, os.path.basename(a.model), shape)
    print(f"uploaded {a.model}: model {model.id} ({model.size_bytes} bytes, sha256 {model.sha256[:12]}…)"
          + (" (already stored)" if model.deduplicated else ""))
    model = c.wait_for_model(model.id)
    if model.state != pb.MODEL_READY:
        sys.exit(f"model is {pb.ModelState.Name(model.state)}: {model.state_reason}")
    s = model.summary
    print(f"inspected: {len(s.bn_layers)} BatchNorm layers, {len(s.layers)} quantizable layers, "
          f"{s.total_params} parameters, output {list(s.output_shape)}")

    config = pb.QuantizationConfig(budget=a.budget, activation_bits=a.activation_bits)
    if a.threads > 0:
        config.threads = a.threads
    job = c.submit_job(model.id, config=config, request_id=f"main-job-{model.id}-{a.budget}-{time.time()}")
    print(f"submitted job {job.id} (budget {a.budget}, activations {a.activation_bits} bits)")
    stage, last_pct = None, -1
    for e in c.watch_job(job.id):
        name = pb.Stage.Name(e.stage).replace("STAGE_", "")
        if e.type == pb.EVENT_STATE:
            print(f"  [{e.seq:4d}] {pb.JobState.Name(e.state).replace('JOB_', '')}: {e.message}")
            continue
        if name != stage:
            stage, last_pct = name, -1
            print(f"  [{e.seq:4d}] stage {name}")
        if e.type == pb.EVENT_PROGRESS and e.total > 0:
            pct = 100 * e.step // e.total
            if pct >= last_pct + 20 or e.step == e.total:
                last_pct = pct
                loss = f" loss {e.loss:.4f}" if e.loss else ""
                print(f"  [{e.seq:4d}]   {e.step}/{e.total}{loss} {e.message}".rstrip())
    job = c.get_job(job.id)
    if job.state != pb.JOB_SUCCEEDED:
        sys.exit(f"job {pb.JobState.Name(job.state)}: {job.error.message}")
    r = job.result
    print(f"\njob {job.id} SUCCEEDED in {time.monotonic() - t0:.1f} s on {job.device} "
          f"({r.threads} threads)\n")
    print(f"{'layer':28s} {'op':8s} {'params':>8s} {'bits':>4s}  sensitivity per width")
    for l in r.layers:
        sens = "  ".join(f"{b}:{o:.3g}" for b, o in zip(l.candidate_bits, l.sensitivity))
        print(f"{l.name:28s} {l.op:8s} {l.params:8d} {l.bits:4d}  {sens}")
    print(f"\nweights: {r.float_weight_bytes / 1024:.2f} KiB float -> {r.weight_bytes / 1024:.2f} KiB "
          f"({8 * r.weight_bytes / max(1, r.quantizable_params):.2f} bits average)")
    print(f"Pareto frontier: {len(r.frontier)} points; chosen size {r.chosen.size_bits / 8 / 1024:.2f} KiB, "
          f"total sensitivity {r.chosen.sensitivity:.4g}")
    print(f"distillation loss {r.distill_initial_loss:.4g} -> {r.distill_final_loss:.4g}; "
          f"quantized vs float top-1 agreement on distilled data {100 * r.top1_agreement:.1f}%")
    print("stages: " + ", ".join(f"{pb.Stage.Name(t.stage).replace('STAGE_', '')} {t.seconds:.2f}s"
                                 for t in r.stage_seconds))
    for art in r.artifacts:
        c.download_artifact(job.id, art.name, os.path.join(a.out, art.name))
    print(f"artifacts in {a.out}: " + ", ".join(f"{x.name} ({x.size_bytes} B)" for x in r.artifacts))


if __name__ == "__main__":
    main()
