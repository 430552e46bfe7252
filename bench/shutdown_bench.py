#!/usr/bin/env python3
"""How long zeroq-server takes to stop on SIGTERM, and what watchers get.

    $ZEROQ_PYTHON bench/shutdown_bench.py [--runs 5] [--watchers 100]
        [--build build]

Cases, each a fresh server (metrics on, one CPU slot), median of --runs:
  idle               no client at all
  idle channel       one connected client channel, no call open
  watch streams      --watchers open WatchJob streams on a queued job behind
                     a running one, with --shutdown_grace=0s (the running job
                     is stopped and re-queued at once)
  running job        one running job, --shutdown_grace=2s: takes the grace
Prints seconds from SIGTERM to exit, and for the streams the status each
watcher got and how long after SIGTERM the last one got it. Then the
heartbeat period 10 watchers of a quiet job observe with
--heartbeat_interval=500ms (gaps between heartbeats over 5 s).
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()
    sys.path[:0] = [os.path.join(args.build, "python"), os.path.join(ROOT, "client", "python")]
    import grpc
    from zeroq.v1 import zeroq_pb2 as pb
    from zeroq_client import ZeroQClient

    server_bin = os.path.join(args.build, "server", "zeroq-server")
    worker_bin = os.path.join(args.build, "core", "worker", "zeroq-worker")
    model_path = os.path.join(ROOT, "tests", "models", "fashion_cnn.pt")

    def start(tmp, *flags):
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen(
            [server_bin, f"--data_dir={tmp}/data", "--listen=127.0.0.1:0", "--http_listen=",
             f"--port_file={port_file}", "--metrics_listen=127.0.0.1:0",
             f"--worker={worker_bin}", "--devices=cpu:1", "--threads_per_job=1", *flags],
            stderr=open(os.path.join(tmp, "server.log"), "a"))
        for _ in range(400):
            if os.path.exists(port_file) and open(port_file).read().strip():
                return proc, f"127.0.0.1:{open(port_file).read().strip()}"
            time.sleep(0.025)
        raise RuntimeError("zeroq-server did not start")

    def stop(proc):
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc == 0, f"exit status {rc}"
        return t0, time.monotonic() - t0

    def busy_server(tmp, *flags):
        proc, target = start(tmp, *flags)
        client = ZeroQClient(target)
        model = client.upload_model(model_path, "fashion", [1, 28, 28])
        model = client.wait_for_model(model.id)
        def config(iterations):
            return pb.QuantizationConfig(
                weight_bits=8, activation_bits=8, threads=1,
                distillation=pb.DistillationConfig(iterations=iterations, batch_size=8))
        running = client.submit_job(model.id, config(100000))
        while client.get_job(running.id).state != pb.JOB_RUNNING:
            time.sleep(0.02)
        queued = client.submit_job(model.id, config(10))
        return proc, target, client, queued

    results = {k: [] for k in ("idle", "idle channel", "watch streams", "running job")}
    last_status = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            proc, _ = start(tmp)
            time.sleep(0.2)
            results["idle"].append(stop(proc)[1])
        with tempfile.TemporaryDirectory() as tmp:
            proc, target = start(tmp)
            client = ZeroQClient(target)
            client.stub.ListModels(pb.ListModelsRequest())  # connected, then idle
            time.sleep(0.2)
            results["idle channel"].append(stop(proc)[1])
        with tempfile.TemporaryDirectory() as tmp:
            proc, target, client, queued = busy_server(tmp, "--shutdown_grace=0s")
            got, lock = [], threading.Lock()
            opened = threading.Barrier(args.watchers + 1)

            def watch():
                stream = client.stub.WatchJob(pb.WatchJobRequest(job_id=queued.id))
                opened.wait()
                try:
                    for _ in stream:
                        pass
                    status = ("OK", "")
                except grpc.RpcError as e:
                    status = (e.code().name, e.details())
                with lock:
                    got.append((time.monotonic(), status))

            threads = [threading.Thread(target=watch) for _ in range(args.watchers)]
            for t in threads:
                t.start()
            opened.wait()
            time.sleep(0.5)
            t0, took = stop(proc)
            for t in threads:
                t.join(timeout=30)
            results["watch streams"].append(took)
            last_status = [s for _, s in got]
            results.setdefault("last watcher told", []).append(max(t for t, _ in got) - t0)
        with tempfile.TemporaryDirectory() as tmp:
            proc, _, _, _ = busy_server(tmp, "--shutdown_grace=2s")
            results["running job"].append(stop(proc)[1])

    print(f"shutdown_bench: {args.runs} runs, {args.watchers} watchers, "
          f"load {os.getloadavg()[0]:.2f}")
    for name, values in results.items():
        print(f"  {name:<18} median {statistics.median(values):7.3f} s   "
              f"max {max(values):7.3f} s")
    codes = {}
    for code, _ in last_status:
        codes[code] = codes.get(code, 0) + 1
    print(f"  watchers' status: {codes}; e.g. {last_status[0][1]!r}")

    # The heartbeat period on quiet streams.
    with tempfile.TemporaryDirectory() as tmp:
        proc, target, client, queued = busy_server(tmp, "--heartbeat_interval=500ms",
                                                   "--shutdown_grace=0s")
        gaps, lock = [], threading.Lock()

        def heartbeats():
            last = None
            stream = client.stub.WatchJob(pb.WatchJobRequest(job_id=queued.id))
            t_end = time.monotonic() + 5.0
            for e in stream:
                now = time.monotonic()
                if e.type == pb.EVENT_HEARTBEAT:
                    if last is not None:
                        with lock:
                            gaps.append(now - last)
                    last = now
                if now > t_end:
                    stream.cancel()
                    break

        threads = [threading.Thread(target=heartbeats) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        stop(proc)
    gaps.sort()
    print(f"  heartbeat gap (500ms asked): median {statistics.median(gaps):.3f} s, "
          f"min {gaps[0]:.3f} s, max {gaps[-1]:.3f} s over {len(gaps)} gaps")


if __name__ == "__main__":
    main()
