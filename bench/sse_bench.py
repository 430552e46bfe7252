#!/usr/bin/env python3
"""1,000 HTTP event streams against 1,000 gRPC WatchJob streams, side by side.

    $ZEROQ_PYTHON bench/sse_bench.py [--streams 1000] [--iterations 300]
        [--build build]

One zeroq-server (open tenant, one CPU slot, --threads_per_job=1, HTTP and
gRPC on 127.0.0.1, no metrics port) serves both transports, one after the
other (--order sse,grpc):

  1. a "blocker" job (100k iterations) holds the slot; the measured job
     (--iterations x --num_batches batches of --batch_size) waits behind it;
  2. server threads (/proc/PID/task), VmRSS and open fds with no stream;
     GetJob p50/p99 over the phase's transport, no stream open;
  3. --streams streams of that transport open on the queued job (each one has
     received the replayed QUEUED event); threads, RSS, fds again; GetJob
     again while they are open (quiet);
  4. the blocker is cancelled, the job runs and every stream receives its
     events: event latency = the client's time.time() at receipt minus the
     event's `time` (set by the server just before it stores and fans the
     event out), over the live events (those created after the blocker was
     cancelled) of every stream; GetJob once more while the events fan out;
     threads/RSS sampled every 0.25 s for the peak;
  5. the job ends, every stream ends ("event: end" / OK) and is checked
     (seqs 1..N, each once); threads/RSS once the streams are gone.

The two transports watch two identical jobs, one after the other, so that
each is measured alone: this client is one Python process on the same
machine as the server and the worker, and 2,000 streams at once would make
each transport's latency depend on the other's load on the client's event
loop and on the server's fan-out. Event latency therefore includes this
client's own queueing; the load average is printed beside the figures.

SSE clients: raw asyncio streams speaking HTTP/1.1 (one connection each).
gRPC clients: grpc.aio, one channel (own TCP connection, local subchannel
pool) per stream unless --grpc_channels says fewer. GetJob latency is
measured by a separate probe process (this script with --probe) so that the
stream clients' work does not delay it: HTTP on one keep-alive connection
(GET /v1/jobs/{id}), gRPC on one channel.

Besides the latency over every stream, the table gives the latency of the
first stream to receive each event (the store-to-socket path without the
wait for the other 999) and the spread from the first to the last receipt
of one event (the fan-out plus this client's serial handling of 1,000
copies), and the CPU seconds of the server and of this client from the
cancel to the last stream's end, also per event delivered. The worker
thins progress events to one per 1% of a batch and 50 ms, so the number of
events depends on how fast the job runs (and so on the load).

The server: --listen/--http_listen=127.0.0.1:0 with port files,
--metrics_listen= --devices=cpu:1 --threads_per_job=1
--heartbeat_interval=10s --shutdown_grace=2s, its own data dir in a
temporary folder, RLIMIT_NOFILE raised to the hard limit (as for this
process); stopped with SIGTERM (SIGKILL after 30 s) whatever happens.
"""
import argparse
import asyncio
import calendar
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# ---------------------------------------------------------------- helpers

def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_sample(pid):
    """(threads, VmRSS KiB, open fds) of a process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return threads, rss, fds


def proc_cpu(pid):
    """User + system CPU seconds of a process (its threads, not children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


_EPOCH = {}


def parse_rfc3339(ts):
    """Seconds since the epoch of protobuf's JSON Timestamp ("...T..Z")."""
    base, _, frac = ts.rstrip("Z").partition(".")
    e = _EPOCH.get(base)
    if e is None:
        e = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
        _EPOCH[base] = e
    return e + (float("0." + frac) if frac else 0.0)


# ---------------------------------------------------------------- GetJob probe

def probe_main(args):
    """A separate process: --count GetJob calls, --interval apart; prints
    the latencies (ms) as JSON."""
    lat, errors = [], []
    if args.probe == "http":
        import http.client
        host, port = args.target.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        path = f"/v1/jobs/{args.job}"
        reconnects = 0
        for i in range(args.count + 10):
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                ok = r.status == 200 and b'"id"' in body
                if not ok:
                    errors.append(f"status {r.status}: {body[:100]!r}")
                if r.will_close:
                    reconnects += 1
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
            except Exception as e:  # noqa: BLE001 (reported, not fatal)
                ok = False
                errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= 10 and ok:  # the first ten warm up
                lat.append(dt)
            if args.interval:
                time.sleep(args.interval)
        conn.close()
        extra = {"reconnects": reconnects}
    else:
        sys.path[:0] = [os.path.join(args.build, "python")]
        import grpc
        from zeroq.v1 import zeroq_pb2 as pb
        from zeroq.v1 import zeroq_pb2_grpc as pb_grpc
        channel = grpc.insecure_channel(args.target)
        stub = pb_grpc.ZeroQStub(channel)
        req = pb.GetJobRequest(job_id=args.job)
        for i in range(args.count + 10):
            t0 = time.perf_counter()
            try:
                stub.GetJob(req, timeout=10)
                ok = True
            except grpc.RpcError as e:
                ok = False
                errors.append(f"{e.code().name}: {e.details()}")
            dt = (time.perf_counter() - t0) * 1e3
            if i >= 10 and ok:
                lat.append(dt)
            if args.interval:
                time.sleep(args.interval)
        channel.close()
        extra = {}
    print(json.dumps({"lat": lat, "errors": errors[:5], **extra}))


async def run_probe(args, kind, target, job_id, count, interval, procs):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--probe", kind, "--target", target,
        "--job", job_id, "--count", str(count), "--interval", str(interval),
        "--build", args.build, stdout=subprocess.PIPE)
    procs.add(proc)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=count * (interval + 0.2) + 30)
    finally:
        procs.discard(proc)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return json.loads(out)


# ---------------------------------------------------------------- stream clients

class Collector:
    """What every stream of one phase received."""

    def __init__(self):
        self.t_go = None          # events created after this are "live"
        self.latency = []         # s, live events of every stream
        self.created = {}         # seq -> the event's time
        self.first_recv = {}      # seq -> first receipt (time.time())
        self.last_recv = {}       # seq -> last receipt
        self.opened = 0
        self.open_failed = []
        self.ok = 0               # ended OK, seqs 1..N each once, terminal state
        self.bad = []             # (stream, reason)
        self.events = []          # events per stream
        self.heartbeats = 0
        self.end_states = {}
        self.running = asyncio.Event()

    def got(self, seq, created, now):
        if self.t_go is not None and created >= self.t_go:
            self.latency.append(now - created)
            f = self.first_recv.get(seq)
            if f is None or now < f:
                self.first_recv[seq] = now
                self.created[seq] = created
            if now > self.last_recv.get(seq, 0):
                self.last_recv[seq] = now


async def sse_stream(i, host, port, job_id, col, opened_evt, sem, timeout):
    """One HTTP/1.1 event stream; returns after the end (or an error)."""
    reader = writer = None
    seqs = []
    first = True
    try:
        async with sem:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write((f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
                          "Accept: text/event-stream\r\n\r\n").encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *hdrs = head.decode("latin-1").split("\r\n")
        if " 200 " not in status_line + " ":
            raise RuntimeError(f"status {status_line!r}")
        headers = {h.split(":", 1)[0].strip().lower(): h.split(":", 1)[1].strip()
                   for h in hdrs if ":" in h}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            raise RuntimeError("chunked event stream: not handled by this bench")
        buf = b""
        end_state = None
        while True:
            data = await reader.read(65536)
            now = time.time()
            if not data:
                break
            buf += data
            while True:
                k = buf.find(b"\n\n")
                if k < 0:
                    break
                frame, buf = buf[:k], buf[k + 2:]
                ev_id = ev_type = ev_data = None
                for line in frame.split(b"\n"):
                    if line.startswith(b":"):
                        col.heartbeats += 1
                    elif line.startswith(b"id: "):
                        ev_id = int(line[4:])
                    elif line.startswith(b"event: "):
                        ev_type = line[7:].decode()
                    elif line.startswith(b"data: "):
                        ev_data = line[6:]
                if ev_type == "end":
                    end_state = json.loads(ev_data).get("state")
                elif ev_type == "error":
                    raise RuntimeError(f"event: error {ev_data[:200]!r}")
                elif ev_id is not None:
                    d = json.loads(ev_data)
                    if int(d["seq"]) != ev_id:
                        raise RuntimeError(f"id {ev_id} but seq {d['seq']}")
                    seqs.append(ev_id)
                    col.got(ev_id, parse_rfc3339(d["time"]), now)
                    if ev_type == "state" and d.get("state") == "JOB_RUNNING":
                        col.running.set()
                    if first:
                        first = False
                        col.opened += 1
                        opened_evt()
        col.events.append(len(seqs))
        if end_state is None:
            raise RuntimeError(f"closed without 'event: end' after {len(seqs)} events")
        col.end_states[end_state] = col.end_states.get(end_state, 0) + 1
        if seqs != list(range(1, len(seqs) + 1)):
            raise RuntimeError("seqs are not 1..N each once")
        col.ok += 1
    except asyncio.CancelledError:
        col.bad.append((i, f"still open after the timeout, {len(seqs)} events"))
        raise
    except Exception as e:  # noqa: BLE001 (counted and printed)
        if first:
            col.open_failed.append(repr(e))
            opened_evt()
        else:
            col.bad.append((i, repr(e)))
    finally:
        if writer is not None:
            writer.close()


async def grpc_stream(i, stub, pb, grpc, job_id, col, opened_evt, sem, timeout):
    seqs = []
    first = True
    call = None
    try:
        async with sem:
            call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
            e = await asyncio.wait_for(call.read(), timeout)
        last_state = None
        while e is not grpc.aio.EOF:
            now = time.time()
            if e.type == pb.EVENT_HEARTBEAT:
                col.heartbeats += 1
            else:
                seqs.append(e.seq)
                col.got(e.seq, e.time.seconds + e.time.nanos * 1e-9, now)
                if e.type == pb.EVENT_STATE:
                    last_state = pb.JobState.Name(e.state)
                    if e.state == pb.JOB_RUNNING:
                        col.running.set()
            if first:
                first = False
                col.opened += 1
                opened_evt()
            e = await call.read()
        col.events.append(len(seqs))
        code = await call.code()
        if code != grpc.StatusCode.OK:
            raise RuntimeError(f"ended {code.name}: {await call.details()}")
        col.end_states[last_state] = col.end_states.get(last_state, 0) + 1
        if seqs != list(range(1, len(seqs) + 1)):
            raise RuntimeError("seqs are not 1..N each once")
        col.ok += 1
    except asyncio.CancelledError:
        col.bad.append((i, f"still open after the timeout, {len(seqs)} events"))
        if call is not None:
            call.cancel()
        raise
    except Exception as e:  # noqa: BLE001
        if call is not None:
            call.cancel()
        if first:
            col.open_failed.append(repr(e))
            opened_evt()
        else:
            col.bad.append((i, repr(e)))


# ---------------------------------------------------------------- the bench

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=300,
                    help="distillation iterations per batch of the measured jobs")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--num_batches", type=int, default=4)
    ap.add_argument("--grpc_channels", type=int, default=0,
                    help="gRPC channels the streams share (0: one per stream)")
    ap.add_argument("--order", default="sse,grpc")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds a phase's job and streams may take to end")
    ap.add_argument("--keep", action="store_true", help="keep the server's data dir and log")
    # The GetJob probe (a child process of the bench).
    ap.add_argument("--probe", choices=["http", "grpc"], help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=300, help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.005, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)
    if args.probe:
        return probe_main(args)

    nofile = raise_nofile()
    if nofile < 2 * args.streams + 200:
        sys.exit(f"RLIMIT_NOFILE is {nofile}; {args.streams} streams need more")
    sys.path[:0] = [os.path.join(args.build, "python"), os.path.join(ROOT, "client", "python")]
    import grpc
    import grpc.aio  # noqa: F401
    from zeroq.v1 import zeroq_pb2 as pb
    from zeroq.v1 import zeroq_pb2_grpc as pb_grpc
    from zeroq_client import ZeroQClient

    server_bin = os.path.join(args.build, "server", "zeroq-server")
    worker_bin = os.path.join(args.build, "core", "worker", "zeroq-worker")
    model_path = os.path.join(ROOT, "tests", "models", "fashion_cnn.pt")
    tmp = tempfile.mkdtemp(prefix="zeroq_sse_bench_")
    log_path = os.path.join(tmp, "server.log")
    load_start = os.getloadavg()
    t_start = time.monotonic()

    def server_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen(
        [server_bin, f"--data_dir={tmp}/data",
         "--listen=127.0.0.1:0", f"--port_file={tmp}/port",
         "--http_listen=127.0.0.1:0", f"--http_port_file={tmp}/http_port",
         "--metrics_listen=", f"--worker={worker_bin}", "--devices=cpu:1",
         "--threads_per_job=1", "--heartbeat_interval=10s", "--shutdown_grace=2s"],
        stderr=open(log_path, "a"), preexec_fn=server_nofile)
    probes = set()
    result = {}
    try:
        def read_port(name):
            p = os.path.join(tmp, name)
            return open(p).read().strip() if os.path.exists(p) else ""
        for _ in range(800):
            if read_port("port") and read_port("http_port"):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"zeroq-server exited {proc.returncode}")
            time.sleep(0.025)
        else:
            raise RuntimeError("zeroq-server did not start")
        grpc_target = f"127.0.0.1:{read_port('port')}"
        http_port = int(read_port("http_port"))
        client = ZeroQClient(grpc_target)
        model = client.wait_for_model(
            client.upload_model(model_path, "fashion", [1, 28, 28]).id, timeout=60)
        assert model.state == pb.MODEL_READY, pb.ModelState.Name(model.state)
        time.sleep(0.5)
        result["idle"] = proc_sample(proc.pid)
        asyncio.run(run_phases(args, proc, client, model, pb, pb_grpc, grpc, grpc_target,
                               http_port, probes, result))
    finally:
        for p in list(probes):
            try:
                p.kill()
            except ProcessLookupError:
                pass
        rc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "killed after 30 s"
        else:
            rc = proc.returncode
        result["exit"] = rc
        if result.get("phases"):
            report(args, result, load_start, time.monotonic() - t_start, log_path)
        try:
            log_tail = open(log_path).read().splitlines()
        except OSError:
            log_tail = []
        odd = [l for l in log_tail if " WARNING " in l or " ERROR " in l or "WARN" in l[:40]]
        if odd:
            print(f"  server log: {len(odd)} warning/error lines, e.g.:")
            for l in odd[:5]:
                print("    " + l[:200])
        if args.keep:
            print(f"  data and log kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def run_phases(args, proc, client, model, pb, pb_grpc, grpc, grpc_target, http_port,
                     probes, result):
    result["phases"] = {}
    loop = asyncio.get_running_loop()

    def config(iterations, batch_size, num_batches):
        return pb.QuantizationConfig(
            weight_bits=8, activation_bits=8, threads=1,
            distillation=pb.DistillationConfig(iterations=iterations, batch_size=batch_size,
                                               num_batches=num_batches))

    async def call(fn, *a):
        return await loop.run_in_executor(None, fn, *a)

    for n, kind in enumerate([k.strip() for k in args.order.split(",") if k.strip()]):
        if kind not in ("sse", "grpc"):
            raise ValueError(f"--order: {kind!r} is neither sse nor grpc")
        ph = {"kind": kind}
        key = kind if kind not in result["phases"] else f"{kind}#{n + 1}"
        result["phases"][key] = ph
        # 1. The slot busy; the measured job queued behind it.
        blocker = await call(client.submit_job, model.id, config(100000, 8, 1))
        t0 = time.monotonic()
        while (await call(client.get_job, blocker.id)).state != pb.JOB_RUNNING:
            if time.monotonic() - t0 > 30:
                raise RuntimeError("the blocker job did not start")
            await asyncio.sleep(0.05)
        job = await call(client.submit_job, model.id,
                         config(args.iterations, args.batch_size, args.num_batches))
        assert (await call(client.get_job, job.id)).state == pb.JOB_QUEUED
        await asyncio.sleep(1.0)
        # 2. No stream.
        ph["before"] = proc_sample(proc.pid)
        probe_kind, probe_target = (("http", f"127.0.0.1:{http_port}") if kind == "sse"
                                    else ("grpc", grpc_target))
        ph["getjob_idle"] = await run_probe(args, probe_kind, probe_target, job.id, 300, 0.005,
                                            probes)
        # 3. Open the streams.
        col = Collector()
        n_open = [0]
        all_open = asyncio.Event()

        def opened():
            n_open[0] += 1
            if n_open[0] >= args.streams:
                all_open.set()

        sem = asyncio.Semaphore(100)  # connections being set up at once
        channels = []
        t_open = time.monotonic()
        if kind == "sse":
            tasks = [asyncio.ensure_future(
                sse_stream(i, "127.0.0.1", http_port, job.id, col, opened, sem, 20))
                for i in range(args.streams)]
        else:
            n_ch = args.grpc_channels or args.streams
            channels = [grpc.aio.insecure_channel(
                grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_ch)]
            stubs = [pb_grpc.ZeroQStub(c) for c in channels]
            tasks = [asyncio.ensure_future(
                grpc_stream(i, stubs[i % n_ch], pb, grpc, job.id, col, opened, sem, 20))
                for i in range(args.streams)]
        try:
            try:
                await asyncio.wait_for(all_open.wait(), 60)
            except asyncio.TimeoutError:
                pass
            ph["open_s"] = time.monotonic() - t_open
            await asyncio.sleep(1.5)  # the hub's sweep, allocations settle
            ph["open"] = proc_sample(proc.pid)
            ph["getjob_open"] = await run_probe(args, probe_kind, probe_target, job.id, 300,
                                                0.005, probes)
            # 4. Go: the job runs, its events fan out.
            col.t_go = time.time()
            peak = list(proc_sample(proc.pid))
            sampling = True

            async def sampler():
                while sampling:
                    s = proc_sample(proc.pid)
                    for k in range(3):
                        peak[k] = max(peak[k], s[k])
                    await asyncio.sleep(0.25)

            sampler_task = asyncio.ensure_future(sampler())
            cpu0 = (proc_cpu(proc.pid), time.process_time())
            await call(client.cancel_job, blocker.id)
            t_go = time.monotonic()
            try:
                await asyncio.wait_for(col.running.wait(), 30)
                ph["getjob_fanout"] = await run_probe(args, probe_kind, probe_target, job.id,
                                                      250, 0.02, probes)
            except asyncio.TimeoutError:
                ph["getjob_fanout"] = {"lat": [], "errors": ["the job did not start"]}
            left = max(1.0, args.timeout - (time.monotonic() - t_go))
            _, pending = await asyncio.wait(tasks, timeout=left)
            ph["job_s"] = time.monotonic() - t_go
            ph["cpu"] = (proc_cpu(proc.pid) - cpu0[0], time.process_time() - cpu0[1])
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            sampling = False
            await sampler_task
            ph["peak"] = tuple(peak)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in channels:
                await c.close()
        final = await call(client.get_job, job.id)
        ph["job_state"] = pb.JobState.Name(final.state)
        ph["threads_used"] = final.result.threads
        ph["job_events"] = final.last_seq
        ph["distill_s"] = sum(t.seconds for t in final.result.stage_seconds
                              if t.stage == pb.STAGE_DISTILL)
        # 5. Streams gone.
        await asyncio.sleep(2.0)
        ph["after"] = proc_sample(proc.pid)
        ph["col"] = col
        ph["load"] = os.getloadavg()


def report(args, result, load_start, wall, log_path):
    phases = result["phases"]
    kinds = list(phases)
    names = {"sse": f"{args.streams} SSE (HTTP)", "grpc": f"{args.streams} gRPC WatchJob"}
    names.update({k: names[ph["kind"]] + k[len(ph["kind"]):] for k, ph in phases.items()})
    W = 33

    def row(label, cells):
        print(f"  {label:<34}" + "".join(f"{c:>{W}}" for c in cells))

    def res(s):
        return f"{s[0]:4d} thr {s[1] / 1024:7.1f} MiB {s[2]:5d} fd" if s else "-"

    def ms(d):
        lat = d.get("lat", []) if d else []
        if not lat:
            return "n/a " + "; ".join(d.get("errors", [])[:1]) if d else "-"
        err = f" ({len(d['errors'])} err)" if d.get("errors") else ""
        return f"{pct(lat, 50):6.2f} / {pct(lat, 99):6.2f}{err}"

    threads_used = {ph.get("threads_used") for ph in phases.values()}
    print(f"sse_bench: {args.streams} streams per transport, one after the other on one "
          f"server; job: {args.iterations} iterations x {args.num_batches} batches of "
          f"{args.batch_size}, intra-op threads {'/'.join(str(t) for t in threads_used)} "
          f"(--threads_per_job=1, config threads=1); {os.cpu_count()} cores")
    print(f"  load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
          + "".join(f", after {k} {ph['load'][0]:.2f}" for k, ph in phases.items()
                    if "load" in ph)
          + f"; wall {wall:.0f} s; server exit {result.get('exit')}")
    row("server: threads, VmRSS, fds", [names.get(k, k) for k in kinds])
    idle = result.get("idle")
    row("idle (model ready, no job)", [res(idle)] * len(kinds))
    row("no stream (blocker running)", [res(phases[k].get("before")) for k in kinds])
    row(f"{args.streams} streams open (quiet)", [res(phases[k].get("open")) for k in kinds])
    row("peak while events fan out", [res(phases[k].get("peak")) for k in kinds])
    row("after the streams ended", [res(phases[k].get("after")) for k in kinds])

    def per_stream(ph):
        if not ph.get("open") or not ph.get("before"):
            return "-"
        return (f"{(ph['open'][0] - ph['before'][0]):+d} thr "
                f"{(ph['open'][1] - ph['before'][1]) / args.streams:6.1f} KiB/stream")
    row("open minus no stream", [per_stream(phases[k]) for k in kinds])
    row("streams opened / took", [
        f"{phases[k]['col'].opened}/{args.streams} in {phases[k].get('open_s', 0):5.2f} s"
        if "col" in phases[k] else "-" for k in kinds])
    row("GetJob p50 / p99 ms: no stream", [ms(phases[k].get("getjob_idle")) for k in kinds])
    row(f"  {args.streams} streams open (quiet)", [ms(phases[k].get("getjob_open")) for k in kinds])
    row("  while the events fan out", [ms(phases[k].get("getjob_fanout")) for k in kinds])

    def ev(ph, what):
        col = ph.get("col")
        if col is None:
            return "-"
        if what == "lat":
            if not col.latency:
                return "n/a"
            lat = [x * 1e3 for x in col.latency]
            return f"{pct(lat, 50):6.1f} / {pct(lat, 99):6.1f}"
        if what == "max":
            return f"{max(col.latency) * 1e3:8.1f}" if col.latency else "n/a"
        if what == "first":
            first = [(col.first_recv[s] - col.created[s]) * 1e3 for s in col.first_recv]
            return f"{pct(first, 50):6.1f} / {pct(first, 99):6.1f}" if first else "n/a"
        if what == "cpu":
            c = ph.get("cpu")
            return f"server {c[0]:5.1f} s, bench {c[1]:5.1f} s" if c else "-"
        if what == "cpu_per_event":
            c, n = ph.get("cpu"), sum(col.events)
            return (f"server {c[0] / n * 1e6:4.1f}, bench {c[1] / n * 1e6:5.1f}"
                    if c and n else "-")
        if what == "spread":
            sp = [(col.last_recv[s] - col.first_recv[s]) * 1e3 for s in col.first_recv]
            return f"{pct(sp, 50):6.1f} / {pct(sp, 99):6.1f}" if sp else "n/a"
        if what == "count":
            per = col.events
            live = len(col.first_recv)
            return (f"{live} live, {min(per) if per else 0}-{max(per) if per else 0}/stream"
                    if per else "-")
        if what == "ok":
            states = ",".join(f"{k.replace('JOB_', '')}:{v}" for k, v in col.end_states.items())
            return f"{col.ok} ok {len(col.bad) + len(col.open_failed)} bad {states}"
        if what == "job":
            return (f"{ph.get('job_state', '?').replace('JOB_', '')} {ph.get('job_s', 0):5.1f} s"
                    f" (distill {ph.get('distill_s', 0):4.1f})")
    row("event latency p50 / p99 ms", [ev(phases[k], "lat") for k in kinds])
    row("  max ms", [ev(phases[k], "max") for k in kinds])
    row("  the first stream to get it", [ev(phases[k], "first") for k in kinds])
    row("  one event's first-last receipt ms", [ev(phases[k], "spread") for k in kinds])
    row("events (seq) per stream", [ev(phases[k], "count") for k in kinds])
    row("streams checked (1..N, end)", [ev(phases[k], "ok") for k in kinds])
    row("job: state, blocker cancel to end", [ev(phases[k], "job") for k in kinds])
    row("CPU from cancel to end", [ev(phases[k], "cpu") for k in kinds])
    row("  per event delivered, us", [ev(phases[k], "cpu_per_event") for k in kinds])
    row("heartbeats received", [str(phases[k]["col"].heartbeats) if "col" in phases[k] else "-"
                                for k in kinds])
    for k in kinds:
        col = phases[k].get("col")
        if col and (col.bad or col.open_failed):
            print(f"  {k}: failures, e.g. {(col.open_failed + [b for _, b in col.bad])[:3]}")


if __name__ == "__main__":
    main()
