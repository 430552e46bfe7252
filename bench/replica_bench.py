#!/usr/bin/env python3
"""zeroq-server replicas on one PostgreSQL against one replica on SQLite.

    $ZEROQ_PYTHON bench/replica_bench.py [--runs 2] [--jobs 1000]
        [--configs sqlite-1,pg-1,pg-3] [--phases latency,watchers]
        [--watchers 1000] [--build build]

Needs zeroq-server, zeroq-worker and trivial_worker (bench/trivial_worker.cc)
built, PostgreSQL 15's binaries (scripts/pg_test_server.sh) and Python 3
with grpcio (Debian's /usr/bin/python3, or the torch venv). About 3-4
minutes with the defaults on 2 cores.

Configurations (--configs), each one fresh each run (its own data dir and,
for PostgreSQL, its own throwaway cluster from scripts/pg_test_server.sh):
  sqlite-1   one replica, the default store (SQLite in the data dir)
  pg-1       one replica on PostgreSQL (--store=postgresql://...)
  pg-N       N replicas on one PostgreSQL and one --data_dir, each with
             its own --replica_id
Every replica: --devices=cpu:SLOTS (--slots, 4), --threads_per_job=1, gRPC
on 127.0.0.1:0, no HTTP or metrics port, and bench/trivial_worker as its
--worker: a worker that does no work (no LibTorch), so that what is
measured is the server around a job. It writes config.distillation
.iterations progress events, config.distillation.seed ms apart, then an
empty result; model inspections go to the real zeroq-worker.

Phases, in each configuration:
  1. claims: a "loader" replica (whose worker holds its one job until
     SIGTERM) takes the model upload and --jobs SubmitJobs, then stops
     (its held job is re-queued): --jobs jobs wait in the store. The measured
     replicas start together and drain them. From the jobs' start and end
     times: claims/s = (jobs - 1) / (last start - first start), also over the
     middle 80% of the starts (without the replicas' start-up), drain
     jobs/s = jobs / (last end - first start), and the mean number of jobs
     running at once (sum of run times / span; the slots are REPLICAS x
     SLOTS). Checked: every job SUCCEEDED, one attempt each (the loader's
     held job two), at most REPLICAS x SLOTS running at any moment. Jobs per
     replica come from the replicas' logs.
  2. event latency: --latency_jobs jobs, one after the other, each writing
     --latency_events progress events --event_ms apart; on each replica
     --latency_watchers gRPC WatchJob streams. Latency = the client's
     time.time() at receipt minus the event's `time` (set by the owner just
     before it stores the event; one machine, one clock), for the events
     made after every stream was open. Split by where the watcher is: on
     the replica running the job (found from its job folder,
     DATA_DIR/replicas/NAME/jobs/JOB) or on another one (PostgreSQL
     LISTEN/NOTIFY, or the 250 ms poll).
  3. GetJob under watchers: a job writing an event every --watch_event_ms;
     GetJob p50/p99 (a separate probe process, one channel per replica,
     round-robin over the replicas, --probe_count calls 5 ms apart) while it
     runs with no watcher, then with --watchers WatchJob streams spread
     evenly over the replicas (--grpc_channels connections in all); also
     the event latency those streams see (this one Python client handles
     every copy, so it includes the client's own queueing). Then the job is
     cancelled and every stream must end.

With --runs > 1 the figures are medians over the runs (configurations
interleaved within a run). The load average is printed before and after:
the machine is shared and has few cores, and the replicas, PostgreSQL and
this client all share them.
"""
import argparse
import asyncio
import collections
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# ---------------------------------------------------------------- helpers

def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ts(t):
    return t.seconds + t.nanos * 1e-9


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_all(pid):
    """CPU seconds of a process and of its reaped children (utime, stime,
    cutime, cstime): a replica and the workers it has started."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def tree_cpu(root):
    """CPU seconds of a process, its reaped children and its live children
    (a PostgreSQL postmaster and its backends)."""
    total = proc_cpu_all(root)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        la = os.getloadavg()
        return f"load average: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


# ---------------------------------------------------------------- GetJob probe

def probe_main(args):
    """A separate process: --count GetJob calls round-robin over --target
    (comma-separated), --interval apart; prints the latencies (ms) as JSON."""
    sys.path[:0] = [os.path.join(args.build, "python")]
    import grpc
    from zeroq.v1 import zeroq_pb2 as pb
    from zeroq.v1 import zeroq_pb2_grpc as pb_grpc
    targets = args.target.split(",")
    channels = [grpc.insecure_channel(t) for t in targets]
    stubs = [pb_grpc.ZeroQStub(c) for c in channels]
    req = pb.GetJobRequest(job_id=args.job)
    lat, errors = [], []
    for i in range(args.count + 10 * len(stubs)):
        stub = stubs[i % len(stubs)]
        t0 = time.perf_counter()
        try:
            stub.GetJob(req, timeout=10)
            ok = True
        except grpc.RpcError as e:
            ok = False
            errors.append(f"{e.code().name}: {e.details()}")
        dt = (time.perf_counter() - t0) * 1e3
        if i >= 10 * len(stubs) and ok:  # the first ten per channel warm up
            lat.append(dt)
        if args.interval:
            time.sleep(args.interval)
    for c in channels:
        c.close()
    print(json.dumps({"lat": lat, "errors": errors[:5]}))


def run_probe(args, targets, job_id):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--probe", "--target", ",".join(targets),
         "--job", job_id, "--count", str(args.probe_count), "--interval", "0.005",
         "--build", args.build],
        stdout=subprocess.PIPE, timeout=args.probe_count * 0.3 + 60)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- servers

# What is still running, stopped whatever happens when the bench ends.
LIVE_REPLICAS = set()
LIVE_CLUSTERS = set()
LIVE_TMP = set()

class Replica:
    def __init__(self, bench, tmp, name, store, slots, hold=False):
        self.name = name
        self.tmp = tmp
        self.port_file = os.path.join(tmp, f"port-{name}")
        self.log_path = os.path.join(tmp, f"server-{name}.log")
        env = dict(os.environ)
        env["ZEROQ_BENCH_REAL_WORKER"] = bench.worker_bin
        if hold:
            env["ZEROQ_BENCH_HOLD"] = "1"
        else:
            env.pop("ZEROQ_BENCH_HOLD", None)
        flags = [f"--data_dir={tmp}/data", "--listen=127.0.0.1:0",
                 f"--port_file={self.port_file}", "--http_listen=", "--metrics_listen=",
                 f"--worker={bench.trivial_bin}", f"--devices=cpu:{slots}",
                 "--threads_per_job=1", "--heartbeat_interval=10s",
                 f"--shutdown_grace={'0s' if hold else '2s'}", f"--replica_id={name}"]
        if store:
            flags.append(f"--store={store}")
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)

        def limits():
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        self.proc = subprocess.Popen([bench.server_bin, *flags], env=env,
                                     stderr=open(self.log_path, "a"), preexec_fn=limits)
        LIVE_REPLICAS.add(self)
        self.target = None

    def wait_ready(self, timeout=30):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if os.path.exists(self.port_file):
                port = open(self.port_file).read().strip()
                if port:
                    self.target = f"127.0.0.1:{port}"
                    return self.target
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited {self.proc.returncode}: "
                                   + self.log_tail())
            time.sleep(0.01)
        raise RuntimeError(f"replica {self.name} did not start: " + self.log_tail())

    def log_tail(self):
        try:
            return " | ".join(open(self.log_path).read().splitlines()[-5:])
        except OSError:
            return ""

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return "killed"
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        LIVE_REPLICAS.discard(self)

    def log_lines(self):
        try:
            return open(self.log_path).read().splitlines()
        except OSError:
            return []


class PgCluster:
    def __init__(self, path):
        self.path = path
        out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pg_test_server.sh"),
                              "start", path], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"pg_test_server.sh start: {out.stderr.strip()}")
        self.uri = out.stdout.strip().splitlines()[-1]
        LIVE_CLUSTERS.add(self)
        try:
            with open(os.path.join(os.path.realpath(path), "data", "postmaster.pid")) as f:
                self.pid = int(f.readline())
        except (OSError, ValueError):
            self.pid = None

    def cpu(self):
        return tree_cpu(self.pid) if self.pid else float("nan")

    def stop(self):
        LIVE_CLUSTERS.discard(self)
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "pg_test_server.sh"), "stop",
                        self.path], capture_output=True, timeout=120)


# ---------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args):
        self.args = args
        sys.path[:0] = [os.path.join(args.build, "python"), os.path.join(ROOT, "client", "python")]
        import grpc
        import grpc.aio  # noqa: F401
        from zeroq.v1 import zeroq_pb2 as pb
        from zeroq.v1 import zeroq_pb2_grpc as pb_grpc
        from zeroq_client import ZeroQClient
        self.grpc, self.pb, self.pb_grpc, self.Client = grpc, pb, pb_grpc, ZeroQClient
        self.server_bin = os.path.join(args.build, "server", "zeroq-server")
        self.worker_bin = os.path.join(args.build, "core", "worker", "zeroq-worker")
        self.trivial_bin = os.path.join(args.build, "bench", "trivial_worker")
        self.model_path = os.path.join(ROOT, "tests", "models", "fashion_cnn.pt")
        for p in (self.server_bin, self.worker_bin, self.trivial_bin):
            if not os.access(p, os.X_OK):
                sys.exit(f"missing {p}: build zeroq-server zeroq-worker trivial_worker")

    def on_loop(self, coro):
        """Runs a coroutine on the event loop from this (executor) thread.

        The loop runs for the whole bench: once grpc.aio is in use in a
        process, blocking gRPC calls made while no loop is running can hang
        (aio's poller thread blocks writing its wake-up socket)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def config(self, events=0, interval_ms=0):
        pb = self.pb
        c = pb.QuantizationConfig(weight_bits=8, activation_bits=8, threads=1)
        if events:
            c.distillation.iterations = events
            c.distillation.seed = interval_ms
        return c

    # -------------------------------------------------- one configuration

    def run_config(self, name, run_index):
        args, pb = self.args, self.pb
        m = re.fullmatch(r"(sqlite|pg)-(\d+)", name)
        if not m or (m.group(1) == "sqlite" and m.group(2) != "1"):
            raise ValueError(f"--configs: {name!r} is not sqlite-1 or pg-N")
        kind, n_replicas = m.group(1), int(m.group(2))
        tmp = tempfile.mkdtemp(prefix=f"zq_replica_bench_{name}_")
        LIVE_TMP.add(tmp)
        pg = None
        replicas = []
        res = {"name": name, "replicas": n_replicas}
        try:
            store = ""
            if kind == "pg":
                pg = PgCluster(f"/tmp/zq-pg-rb-{os.getpid()}-{run_index}-{name}")
                store = pg.uri
            # 1. The loader queues the jobs, then stops.
            loader = Replica(self, tmp, "loader", store, 1, hold=True)
            replicas.append(loader)
            client = self.Client(loader.wait_ready())
            model = client.wait_for_model(
                client.upload_model(self.model_path, "fashion", [1, 28, 28]).id, timeout=120)
            assert model.state == pb.MODEL_READY, pb.ModelState.Name(model.state)
            cfg = self.config()
            t0 = time.monotonic()
            for _ in range(args.jobs):
                client.submit_job(model.id, cfg)
            res["submit_per_s"] = args.jobs / (time.monotonic() - t0)
            t0 = time.monotonic()
            while not client.stub.ListJobs(pb.ListJobsRequest(page_size=1,
                                                             state=pb.JOB_RUNNING)).jobs:
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("the loader did not start its held job")
                time.sleep(0.02)
            client.channel.close()
            rc = loader.stop()
            if rc != 0:
                raise RuntimeError(f"the loader exited {rc}: {loader.log_tail()}")

            # The measured replicas, started together.
            names = [f"r{i}" for i in range(n_replicas)]
            replicas = [loader] + [Replica(self, tmp, n, store, args.slots) for n in names]
            t_launch = time.time()
            pg_cpu0 = pg.cpu() if pg else 0.0
            for r in replicas[1:]:
                r.wait_ready()
            measured = replicas[1:]
            res["ready_s"] = time.time() - t_launch
            targets = [r.target for r in measured]
            clients = [self.Client(t) for t in targets]
            c0 = clients[0]
            t0 = time.monotonic()
            while True:
                busy = (c0.stub.ListJobs(pb.ListJobsRequest(page_size=1, state=pb.JOB_QUEUED)).jobs
                        or c0.stub.ListJobs(pb.ListJobsRequest(page_size=1,
                                                               state=pb.JOB_RUNNING)).jobs)
                if not busy:
                    break
                if time.monotonic() - t0 > args.timeout:
                    raise RuntimeError(f"{name}: jobs still queued/running after {args.timeout} s")
                time.sleep(0.2)
            res["drain_cpu"] = sum(proc_cpu_all(r.proc.pid) for r in measured)
            res["drain_pg_cpu"] = (pg.cpu() - pg_cpu0) if pg else None
            jobs = []
            token = ""
            while True:
                page = c0.stub.ListJobs(pb.ListJobsRequest(page_size=500, page_token=token))
                jobs.extend(page.jobs)
                token = page.next_page_token
                if not token:
                    break
            res.update(self.claim_figures(jobs, measured, n_replicas))

            # 2. Event latency, owner replica against the others.
            if "latency" in args.phases:
                res.update(self.on_loop(
                    self.latency_phase(clients, targets, measured, tmp, model.id)))
            # 3. GetJob with --watchers streams spread over the replicas.
            if "watchers" in args.phases:
                res.update(self.on_loop(self.watchers_phase(clients, targets, measured, tmp,
                                                            model.id)))
            for c in clients:
                c.channel.close()
            res["exit"] = [r.stop() for r in measured]
            odd = []
            for r in replicas:
                for line in r.log_lines():
                    if " WARNING " in line or " ERROR " in line:
                        odd.append(f"{r.name}: {line[:220]}")
            res["log_odd"] = odd
        finally:
            for r in replicas:
                r.kill()
            if pg:
                pg.stop()
            if args.keep:
                print(f"  [{name}] data and logs kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            LIVE_TMP.discard(tmp)
        return res

    def claim_figures(self, jobs, measured, n_replicas):
        pb, args = self.pb, self.args
        out = {}
        states = {}
        for j in jobs:
            states[pb.JobState.Name(j.state)] = states.get(pb.JobState.Name(j.state), 0) + 1
        out["states"] = states
        done = [j for j in jobs if j.state == pb.JOB_SUCCEEDED]
        starts = sorted(ts(j.start_time) for j in done)
        ends = sorted(ts(j.end_time) for j in done)
        n = len(done)
        out["jobs_done"] = n
        out["multi_attempt"] = sum(1 for j in jobs if len(j.attempt_history) > 1)
        if n >= 2:
            out["claims_per_s"] = (n - 1) / max(1e-9, starts[-1] - starts[0])
            lo, hi = int(n * 0.1), int(n * 0.9)
            out["claims_per_s_mid"] = (hi - lo) / max(1e-9, starts[hi] - starts[lo])
            out["drain_per_s"] = n / max(1e-9, ends[-1] - starts[0])
            out["span_s"] = ends[-1] - starts[0]
            runs = [ts(j.end_time) - ts(j.start_time) for j in done]
            out["job_ms_p50"] = pct(runs, 50) * 1e3
            out["mean_running"] = sum(runs) / max(1e-9, ends[-1] - starts[0])
            # Most running at once.
            edges = sorted([(ts(j.start_time), 1) for j in done]
                           + [(ts(j.end_time), -1) for j in done])
            cur = peak = 0
            for _, d in edges:
                cur += d
                peak = max(peak, cur)
            out["peak_running"] = peak
        out["slots"] = n_replicas * args.slots
        per = {}
        for r in measured:
            per[r.name] = sum(1 for line in r.log_lines() if line.endswith(" succeeded")
                              and " job=" in line)
        out["per_replica"] = per
        return out

    # -------------------------------------------------- event latency

    async def watch(self, stub, job_id, rec, first_evt, errors, stop_at_end=True):
        """One WatchJob stream; appends (seq, created, received) to rec."""
        pb, grpc = self.pb, self.grpc
        call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
        seqs = []
        try:
            async for e in call:
                now = time.time()
                if e.type == pb.EVENT_HEARTBEAT:
                    continue
                if not seqs:
                    first_evt()
                seqs.append(e.seq)
                rec.append((e.seq, ts(e.time), now))
            if seqs != list(range(1, len(seqs) + 1)):
                errors.append("seqs are not 1..N each once")
        except grpc.RpcError as e:  # aio raises AioRpcError
            errors.append(f"{e.code().name}: {e.details()}")
        except asyncio.CancelledError:
            call.cancel()
            errors.append("still open at the timeout")
            raise
        return len(seqs)

    async def latency_phase(self, clients, targets, measured, tmp, model_id):
        args, pb, pb_grpc, grpc = self.args, self.pb, self.pb_grpc, self.grpc
        loop = asyncio.get_running_loop()
        owner_lat, cross_lat, errors, owners = [], [], [], []
        events_seen = 0
        for k in range(args.latency_jobs):
            client = clients[k % len(clients)]
            channels, tasks, recs = [], [], []
            n_first = [0]
            all_open = asyncio.Event()
            total = len(targets) * args.latency_watchers
            job = await loop.run_in_executor(
                None, client.submit_job, model_id,
                self.config(args.latency_events, args.event_ms))

            def opened():
                n_first[0] += 1
                if n_first[0] >= total:
                    all_open.set()
            for ri, t in enumerate(targets):
                for _ in range(args.latency_watchers):
                    ch = grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)])
                    channels.append(ch)
                    rec = []
                    recs.append((ri, rec))
                    tasks.append(asyncio.ensure_future(
                        self.watch(pb_grpc.ZeroQStub(ch), job.id, rec, opened, errors)))
            # Which replica runs it: the one with its job folder.
            owner = None
            t0 = time.monotonic()
            while owner is None and time.monotonic() - t0 < 10:
                for ri, r in enumerate(measured):
                    if os.path.isdir(os.path.join(tmp, "data", "replicas", r.name, "jobs", job.id)):
                        owner = ri
                        break
                else:
                    await asyncio.sleep(0.005)
            try:
                await asyncio.wait_for(all_open.wait(), 20)
            except asyncio.TimeoutError:
                errors.append("not every stream opened")
            t_open = time.time()
            timeout = args.latency_events * args.event_ms / 1e3 + 30
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in channels:
                await ch.close()
            if owner is None:
                errors.append(f"job {job.id}: no replica's job folder seen")
                continue
            owners.append(measured[owner].name)
            for ri, rec in recs:
                live = [(now - created) * 1e3 for seq, created, now in rec if created >= t_open]
                events_seen = max(events_seen, len(live))
                (owner_lat if ri == owner else cross_lat).extend(live)
            final = await loop.run_in_executor(None, client.get_job, job.id)
            if final.state != pb.JOB_SUCCEEDED:
                errors.append(f"latency job {pb.JobState.Name(final.state)}")
        return {"lat_owner": owner_lat, "lat_cross": cross_lat, "lat_errors": errors,
                "lat_owners": owners, "lat_events": events_seen}

    # -------------------------------------------------- GetJob under watchers

    async def watchers_phase(self, clients, targets, measured, tmp, model_id):
        args, pb, pb_grpc, grpc = self.args, self.pb, self.pb_grpc, self.grpc
        loop = asyncio.get_running_loop()
        out = {}
        job = await loop.run_in_executor(
            None, clients[0].submit_job, model_id, self.config(100000, args.watch_event_ms))
        t0 = time.monotonic()
        while (await loop.run_in_executor(None, clients[0].get_job, job.id)).state != pb.JOB_RUNNING:
            if time.monotonic() - t0 > 30:
                raise RuntimeError("the watched job did not start")
            await asyncio.sleep(0.02)
        owner = None
        for ri, r in enumerate(measured):
            if os.path.isdir(os.path.join(tmp, "data", "replicas", r.name, "jobs", job.id)):
                owner = ri
        await asyncio.sleep(0.5)
        out["getjob_idle"] = await loop.run_in_executor(None, run_probe, args, targets, job.id)

        n_ch = max(len(targets), min(args.grpc_channels or args.watchers, args.watchers))
        channels = [grpc.aio.insecure_channel(targets[i % len(targets)],
                                              options=[("grpc.use_local_subchannel_pool", 1)])
                    for i in range(n_ch)]
        stubs = [pb_grpc.ZeroQStub(c) for c in channels]
        errors, recs = [], []
        n_first = [0]
        all_open = asyncio.Event()

        def opened():
            n_first[0] += 1
            if n_first[0] >= args.watchers:
                all_open.set()

        async def one(i):
            rec = []
            recs.append(((i % n_ch) % len(targets), rec))
            return await self.watch(stubs[i % n_ch], job.id, rec, opened, errors)
        t_open = time.monotonic()
        tasks = [asyncio.ensure_future(one(i)) for i in range(args.watchers)]
        try:
            await asyncio.wait_for(all_open.wait(), 60)
        except asyncio.TimeoutError:
            errors.append(f"only {n_first[0]} of {args.watchers} streams opened")
        out["open_s"] = time.monotonic() - t_open
        out["opened"] = n_first[0]
        await asyncio.sleep(1.0)
        t_go = time.time()
        out["getjob_watch"] = await loop.run_in_executor(None, run_probe, args, targets, job.id)
        t_stop = time.time()
        await loop.run_in_executor(None, clients[0].cancel_job, job.id)
        done, pending = await asyncio.wait(tasks, timeout=60)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()
        out["watch_ended"] = sum(1 for t in done if not t.cancelled() and t.exception() is None
                                 and t.result() > 0)
        out["watch_errors"] = errors
        out["watch_lat"] = [(now - created) * 1e3 for _, rec in recs
                            for seq, created, now in rec if t_go <= created <= t_stop]
        out["watch_lat_cross"] = [(now - created) * 1e3 for ri, rec in recs if ri != owner
                                  for seq, created, now in rec if t_go <= created <= t_stop]
        out["watch_lat_owner"] = [(now - created) * 1e3 for ri, rec in recs if ri == owner
                                  for seq, created, now in rec if t_go <= created <= t_stop]
        final = await loop.run_in_executor(None, clients[0].get_job, job.id)
        out["watch_job_state"] = pb.JobState.Name(final.state)
        return out


# ---------------------------------------------------------------- report

def med(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def report(args, results, load_start, up_start, wall):
    names = [c for c in args.configs.split(",") if c]
    W = 24
    print()
    print(f"replica_bench: {args.jobs} jobs, --slots={args.slots} per replica, trivial worker "
          f"(no LibTorch), --threads_per_job=1; {os.cpu_count()} cores; runs {args.runs}"
          f"{' (medians)' if args.runs > 1 else ''}; wall {wall:.0f} s")
    print(f"  before: {up_start}")
    print(f"  after:  {uptime()}")

    def row(label, fn, fmt="{:.1f}", agg=None):
        cells = []
        for n in names:
            if agg is not None:
                try:
                    cells.append(agg(results.get(n, [])) or "-")
                except (KeyError, ValueError):
                    cells.append("-")
                continue
            vals = []
            for r in results.get(n, []):
                try:
                    vals.append(fn(r))
                except KeyError:  # a phase not run
                    pass
            vals = [v for v in vals if v is not None]
            if not vals:
                cells.append("-")
            elif isinstance(vals[0], str):
                cells.append(vals[0] if len(set(vals)) == 1 else "; ".join(vals))
            else:
                cells.append(fmt.format(med(vals)))
        print(f"  {label:<40}" + "".join(f"{c:>{W}}" for c in cells))

    def nice(n):
        k, r = re.fullmatch(r"(sqlite|pg)-(\d+)", n).groups()
        return f"{r} on {'SQLite' if k == 'sqlite' else 'PostgreSQL'}"
    print(f"  {'':<40}" + "".join(f"{nice(n):>{W}}" for n in names))
    print("  -- claims (draining the queued jobs)")
    row("slots (replicas x slots)", lambda r: r.get("slots"), "{:.0f}")
    row("claims/s, first to last start", lambda r: r.get("claims_per_s"))
    row("claims/s, middle 80% of starts", lambda r: r.get("claims_per_s_mid"))
    row("drain jobs/s, first start to last end", lambda r: r.get("drain_per_s"))
    row("span s", lambda r: r.get("span_s"), "{:.2f}")
    row("job run ms p50 (start to end)", lambda r: r.get("job_ms_p50"))
    row("jobs running at once: mean", lambda r: r.get("mean_running"))
    row("  peak", lambda r: r.get("peak_running"), "{:.0f}")
    row("jobs per replica (from logs)", None, agg=lambda rs: "/".join(
        f"{med([r['per_replica'][k] for r in rs]):.0f}" for k in rs[0]["per_replica"]))
    row("SUCCEEDED (in all runs)", None,
        agg=lambda rs: str(sum(r["states"].get("JOB_SUCCEEDED", 0) for r in rs)))
    row("  with >1 attempt (the loader's: 1/run)", None,
        agg=lambda rs: str(sum(r["multi_attempt"] for r in rs)))
    row("CPU ms/job: replicas + their workers",
        lambda r: r["drain_cpu"] / r["jobs_done"] * 1e3, "{:.2f}")
    row("CPU ms/job: PostgreSQL (all backends)",
        lambda r: r["drain_pg_cpu"] / r["jobs_done"] * 1e3 if r["drain_pg_cpu"] else None,
        "{:.2f}")
    row("SubmitJob/s via one replica (loader)", lambda r: r.get("submit_per_s"))
    print(f"  -- event latency ms ({args.latency_jobs} jobs x {args.latency_events} events "
          f"{args.event_ms} ms apart, {args.latency_watchers} watchers per replica)")
    row("watcher on the owner: p50",
        lambda r: pct(r["lat_owner"], 50) if r.get("lat_owner") else None,
        "{:.2f}")
    row("  p99", lambda r: pct(r["lat_owner"], 99) if r["lat_owner"] else None, "{:.2f}")
    row("watcher on another replica: p50",
        lambda r: pct(r["lat_cross"], 50) if r["lat_cross"] else None, "{:.2f}")
    row("  p99", lambda r: pct(r["lat_cross"], 99) if r["lat_cross"] else None, "{:.2f}")
    row("  max", lambda r: max(r["lat_cross"]) if r["lat_cross"] else None, "{:.2f}")
    row("live events per stream", lambda r: r["lat_events"], "{:.0f}")
    row("jobs run on", None, agg=lambda rs: " ".join(
        f"{o}:{c}" for o, c in sorted(collections.Counter(
            o for r in rs for o in r["lat_owners"]).items())))
    print(f"  -- GetJob under watchers (a job writing an event every {args.watch_event_ms} ms; "
          f"{args.probe_count} GetJobs round-robin over the replicas)")

    def gj(key, p):
        def f(r):
            lat = r.get(key, {}).get("lat")
            return pct(lat, p) if lat else None
        return f
    row("GetJob ms, no watcher: p50", gj("getjob_idle", 50), "{:.2f}")
    row("  p99", gj("getjob_idle", 99), "{:.2f}")
    row(f"GetJob ms, {args.watchers} watchers: p50", gj("getjob_watch", 50), "{:.2f}")
    row("  p99", gj("getjob_watch", 99), "{:.2f}")
    row("streams opened", lambda r: r["opened"], "{:.0f}")
    row("  in s", lambda r: r["open_s"], "{:.2f}")
    row("streams ended after the cancel", lambda r: r["watch_ended"], "{:.0f}")
    row("  the job ended", None, agg=lambda rs: ",".join(sorted(
        {r["watch_job_state"].replace("JOB_", "") for r in rs})))
    row(f"event latency, {args.watchers} watchers p50",
        lambda r: pct(r["watch_lat"], 50) if r["watch_lat"] else None, "{:.1f}")
    row("  p99", lambda r: pct(r["watch_lat"], 99) if r["watch_lat"] else None, "{:.1f}")
    row("  watchers on the owner p50",
        lambda r: pct(r["watch_lat_owner"], 50) if r["watch_lat_owner"] else None)
    row("  watchers on another replica p50",
        lambda r: pct(r["watch_lat_cross"], 50) if r["watch_lat_cross"] else None)
    row("  watchers on another replica p99",
        lambda r: pct(r["watch_lat_cross"], 99) if r["watch_lat_cross"] else None)
    for n in names:
        for i, r in enumerate(results.get(n, [])):
            errs = (r.get("lat_errors", []) + r.get("watch_errors", [])
                    + r.get("getjob_idle", {}).get("errors", [])
                    + r.get("getjob_watch", {}).get("errors", []))
            if errs:
                print(f"  {n} run {i + 1}: {len(errs)} errors, e.g. {errs[:3]}")
            if r.get("exit") and any(e != 0 for e in r["exit"]):
                print(f"  {n} run {i + 1}: replica exit statuses {r['exit']}")
            if r.get("log_odd"):
                print(f"  {n} run {i + 1}: {len(r['log_odd'])} WARNING/ERROR log lines, e.g.:")
                for line in r["log_odd"][:4]:
                    print("    " + line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="sqlite-1,pg-1,pg-3")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--phases", default="latency,watchers",
                    help="after the claims: latency, watchers (comma-separated; empty: none)")
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=4, help="--devices=cpu:SLOTS per replica")
    ap.add_argument("--latency_jobs", type=int, default=3)
    ap.add_argument("--latency_events", type=int, default=100)
    ap.add_argument("--event_ms", type=int, default=20)
    ap.add_argument("--latency_watchers", type=int, default=2, help="per replica")
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--watch_event_ms", type=int, default=250)
    ap.add_argument("--grpc_channels", type=int, default=100,
                    help="connections the --watchers streams share (0: one per stream)")
    ap.add_argument("--probe_count", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a drain may take")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=300, help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.005, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)
    if args.probe:
        return probe_main(args)
    nofile = raise_nofile()
    if nofile < 2 * args.watchers + 500:
        sys.exit(f"RLIMIT_NOFILE is {nofile}; {args.watchers} watchers need more")
    bench = Bench(args)

    def on_signal(signum, frame):
        # The phases run in an executor thread that asyncio.run would wait
        # for: stop what runs and leave at once.
        for r in list(LIVE_REPLICAS):
            r.kill()
        for c in list(LIVE_CLUSTERS):
            c.stop()
        if not args.keep:
            for d in list(LIVE_TMP):
                shutil.rmtree(d, ignore_errors=True)
        print(f"replica_bench: stopped by signal {signum}", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    up_start = uptime()
    print(f"replica_bench: {up_start}", flush=True)
    load_start = os.getloadavg()
    t_start = time.monotonic()
    results = {}
    names = [c for c in args.configs.split(",") if c]

    async def on_loop():
        bench.loop = asyncio.get_running_loop()
        await bench.loop.run_in_executor(None, run_all)

    def run_all():
        for run in range(args.runs):
            for n in names:
                t0 = time.monotonic()
                r = bench.run_config(n, run)
                results.setdefault(n, []).append(r)
                print(f"  run {run + 1} {n}: {r.get('claims_per_s', float('nan')):.0f} claims/s, "
                      f"drain {r.get('drain_per_s', float('nan')):.0f} jobs/s, "
                      f"{time.monotonic() - t0:.0f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    try:
        asyncio.run(on_loop())
    finally:
        for r in list(LIVE_REPLICAS):
            r.kill()
        for c in list(LIVE_CLUSTERS):
            c.stop()
        if results:
            report(args, results, load_start, up_start, time.monotonic() - t_start)


if __name__ == "__main__":
    main()
