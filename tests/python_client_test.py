"""The service driven from Python: stubs generated from the proto, Debian's
python3-grpcio, a real server and worker.

    python3 tests/python_client_test.py SERVER WORKER PYTHONPATH MODELS_DIR
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

server_bin, worker_bin, py_path, models = sys.argv[1:5]
sys.path[:0] = [py_path, os.path.join(os.path.dirname(__file__), "..", "client", "python")]

import grpc  # noqa: E402
import torch  # noqa: E402
from zeroq.v1 import zeroq_pb2 as pb  # noqa: E402
from zeroq_client import ZeroQClient  # noqa: E402

checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        raise AssertionError(what)


with tempfile.TemporaryDirectory() as tmp:
    port_file = os.path.join(tmp, "port")
    log = open(os.path.join(tmp, "server.log"), "w")
    server = subprocess.Popen([server_bin, "--listen=127.0.0.1:0", "--http_listen=", "--port_file=" + port_file,
                               "--data_dir=" + os.path.join(tmp, "data"), "--worker=" + worker_bin,
                               "--threads_per_job=1", "--metrics_listen="], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(500):
            if os.path.exists(port_file):
                break
            time.sleep(0.02)
        port = open(port_file).read().strip()
        c = ZeroQClient("127.0.0.1:" + port)

        model = c.upload_model(os.path.join(models, "fashion_cnn.pt"), "fashion", [1, 28, 28])
        model = c.wait_for_model(model.id)
        check(model.state == pb.MODEL_READY, f"model not ready: {model.state_reason}")
        check(len(model.summary.bn_layers) > 0, "no BN layers found")

        config = pb.QuantizationConfig(budget="MP4", distillation=pb.DistillationConfig(
            batch_size=8, iterations=20, seed=3), threads=1,
            reconstruction=pb.ReconstructionConfig(iterations=20))
        job = c.submit_job(model.id, config=config, request_id="py-1")
        again = c.submit_job(model.id, config=config, request_id="py-1")
        check(again.id == job.id, "request id not idempotent")
        seqs, stages = [], set()
        for e in c.watch_job(job.id):
            seqs.append(e.seq)
            stages.add(pb.Stage.Name(e.stage))
        check(seqs == list(range(1, len(seqs) + 1)), "events missing or out of order")
        done = c.get_job(job.id)
        check(done.state == pb.JOB_SUCCEEDED, f"job {pb.JobState.Name(done.state)}: {done.error.message}")
        check({"STAGE_DISTILL", "STAGE_SENSITIVITY", "STAGE_PARETO", "STAGE_EXPORT"} <= stages,
              f"stages seen: {stages}")
        check(len(done.result.frontier) > 0 and len(done.result.chosen.bits) == len(done.result.layers),
              "no frontier / chosen point")

        out = os.path.join(tmp, "q.pt")
        size = c.download_artifact(job.id, "model.zeroq.pt", out)
        check(size == os.path.getsize(out), "size mismatch")
        q = torch.jit.load(out)
        y = q(torch.randn(2, 1, 28, 28))
        check(tuple(y.shape) == (2, 10), f"output shape {tuple(y.shape)}")

        try:
            c.submit_job(model.id, weight_bits=9)
            check(False, "weight_bits=9 accepted")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"code {err.code()}")
            check("config.weight_bits" in err.details(), err.details())
        # The methods by their words, the early stop and the reconstruction's
        # steps reach the stored config; an out-of-range step count is refused.
        words = c.submit_job(model.id, weight_bits=4, activation_range="percentile",
                             activation_percentile=99.9, reconstruct="none",
                             reconstruction=pb.ReconstructionConfig(iterations=20),
                             distillation=pb.DistillationConfig(
                                 iterations=5, batch_size=2, early_stop_window=150,
                                 early_stop_tolerance=0.02), threads=1)
        check(words.config.activation_range == pb.ACTIVATION_RANGE_PERCENTILE, str(words.config))
        check(words.config.reconstruct == pb.RECONSTRUCT_NONE, str(words.config))
        check(words.config.reconstruction.iterations == 20, str(words.config))
        check(words.config.distillation.early_stop_window == 150, str(words.config))
        c.cancel_job(words.id)
        for bad, field in [({"reconstruction": pb.ReconstructionConfig(iterations=100001)},
                            "config.reconstruction.iterations"),
                           ({"reconstruct": 9}, "config.reconstruct"),
                           ({"distillation": pb.DistillationConfig(early_stop_tolerance=2)},
                            "config.distillation.early_stop_tolerance")]:
            try:
                c.submit_job(model.id, **bad)
                check(False, f"{bad} accepted")
            except grpc.RpcError as err:
                check(err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"code {err.code()}")
                check(field in err.details(), err.details())
        try:
            c.get_job("j-missing")
            check(False, "unknown job found")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.NOT_FOUND, f"code {err.code()}")
        freed = c.delete_job(job.id)
        check(freed == sum(a.size_bytes for a in done.result.artifacts), f"freed {freed}")
        try:
            c.get_job(job.id)
            check(False, "deleted job found")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.NOT_FOUND, f"code {err.code()}")
        print(f"python client: {checks} checks passed (job {job.id}, {len(seqs)} events)")
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=60)
        if rc != 0:
            print(open(os.path.join(tmp, "server.log")).read())
            sys.exit(f"server exited {rc}")
