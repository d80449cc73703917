"""End-to-end latency and throughput of a trivial job, beside a five-task no-op chain, same broker.

    .venv/bin/python bench/e2e.py [--jobs 100] [--concurrency 8] [--runtime local|fly]

Starts its own Redis, SeaweedFS and one worker node as `make up` runs it (threads pool, default
admission), then measures sequential latency (p50/p95/p99) and parallel throughput for: (a) the
baseline, a chain of five no-op tasks; (b) the floor issue 10 names, a chain of five tasks on the
same queue that make a cgroup, run `ls` in a bare bubblewrap sandbox in it, make the trivial job's
S3 writes and remove the cgroup, with the product's own code (bench/floor.py); (c) the real
pipeline running `ls` in a sandbox. Prints the three, the ratios floor/chain, job/floor and
job/chain, and the CPU per job (per chain) of the throughput round: of the benchmark's
own processes (the worker, its reaped sandboxes, Redis, SeaweedFS, this client; other tenants of the
host do not count) and of the whole host (from /proc/stat; kernel threads' work such as loop-device
I/O only counts here).
With `--runtime fly` it also runs (d) the same jobs on the Fly runtime against the fake Machines
API (tests/support/fakefly.py, zero delays) whose machines run the real agent, with a worker of
its own, and prints the agent path's overhead over (c), the Machines API calls per job and the
agent requests per job (from each agent's own request log, by route).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery import Celery, chain  # noqa: E402

from devstack.seaweed import seaweed_server  # noqa: E402
from devstack.processes import RedisServer, Worker  # noqa: E402
from tests.support.services import remove_work_dir  # noqa: E402  (unmounts the run dir's tmpfs too)
from bench.floor import floor_signatures  # noqa: E402
from bench.hostmounts import describe as describe_mounts  # noqa: E402


STAGES: dict[str, list[dict[str, Any]]] = {}  # runtime -> each job's stage durations in ms, and its round
FLOOR_TASKS: list[dict[str, Any]] = []  # each floor chain's task durations in ms (bench/floor.py), and its round
ROUND = {"now": "warm-up"}  # measure's round under way (warm-up, sequential, throughput), kept with each row


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def busy_cpu_s() -> float:
    """CPU seconds the whole host spent busy (not idle, not waiting on I/O) since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/<pid>/stat; with
    `reaped_children` also its waited-for children's (a worker's sandboxes: bwrap and the job)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15 if reaped_children else 13]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of the host (everything, other tenants included) and of this benchmark's own
    processes: the worker (with its sandboxes), Redis, SeaweedFS and this client."""

    def __init__(self, worker_pid: int, services: dict[str, int]) -> None:
        self.worker_pid, self.services = worker_pid, services

    def now(self) -> dict[str, float]:
        client = os.times()
        worker = process_cpu_s(self.worker_pid)
        parts = {"worker": worker, "sandboxes": process_cpu_s(self.worker_pid, reaped_children=True) - worker,
                 **{name: process_cpu_s(pid) for name, pid in self.services.items()},
                 "client": client.user + client.system}
        return {"host": busy_cpu_s(), "stack": sum(parts.values()), **parts}


def measure(run_one: Callable[[], None], jobs: int, concurrency: int, meter: CpuMeter) -> dict[str, float]:
    """Sequential latencies, then throughput with `concurrency` submitters; during the throughput
    round also CPU per job (the throughput ratio is CPU-bound on a small host: these say where the
    CPU went)."""
    ROUND["now"] = "warm-up"
    for _ in range(5):
        run_one()  # warm up: first connections, imports in the pool processes
    latencies = []
    ROUND["now"] = "sequential"
    for _ in range(jobs):
        start = time.perf_counter()
        run_one()
        latencies.append(time.perf_counter() - start)
    ROUND["now"] = "throughput"
    start, cpu = time.perf_counter(), meter.now()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: run_one(), range(jobs)))
    elapsed = time.perf_counter() - start
    used = {k: v - cpu[k] for k, v in meter.now().items()}
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p95_ms": percentile(latencies, 95) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "mean_ms": statistics.mean(latencies) * 1e3,
            "throughput_per_s": jobs / elapsed, **{f"{k}_cpu_ms": v / jobs * 1e3 for k, v in used.items()},
            "host_busy": used["host"] / elapsed / (os.cpu_count() or 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runtime", choices=("local", "fly"), default="local")
    args = parser.parse_args()
    mounts = describe_mounts()  # before our own stack adds its run dir
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir="/var/tmp"))
    base.chmod(0o711)
    redis_server = RedisServer(base)
    redis_server.start()
    try:
        with seaweed_server(base / "s3") as s3:
            env = {"SANDBOX_REDIS_URL": redis_server.url, **s3.env(), "SANDBOX_WORK_DIR": str(base),
                   "SANDBOX_DEFAULT_DISK": "16Mi"}
            client = Celery("bench", broker=redis_server.url, backend=redis_server.url)
            client.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"],
                               task_default_queue="sandbox")
            worker = Worker(env, node="bench@host", log_path=base / "worker.log")
            worker.extra_args = ["--include", "bench.noop,bench.floor"]
            worker.start(client)
            services = {"redis": redis_server.proc.pid, "s3": s3._proc.pid}  # (SeaweedFS: one `weed mini` process)
            meter = CpuMeter(worker.proc.pid, services)
            try:
                baseline = measure(lambda: chain(*[client.signature("bench.noop") for _ in range(5)])
                                   .apply_async().get(timeout=60), args.jobs, args.concurrency, meter)

                def one_floor() -> None:
                    ended = chain(*floor_signatures(client)).apply_async().get(timeout=60)
                    assert ended["exit_code"] == 0 and not ended["stderr"] and ended["removed"], ended
                    FLOOR_TASKS.append({**ended["task_ms"], "round": ROUND["now"]})

                floor = measure(one_floor, args.jobs, args.concurrency, meter)

                def one_job() -> None:
                    job = {"id": f"bench-{uuid.uuid4().hex[:12]}", "command": "ls"}
                    record = client.send_task("sandbox.submit", args=[json.dumps(job)]).get(timeout=120)
                    assert record["status"] == "succeeded", record
                    STAGES.setdefault(record["sandbox"]["runtime"], []).append(
                        {"round": ROUND["now"], **{k: v["duration_s"] * 1e3 for k, v in record["stages"].items()}})

                pipeline = measure(one_job, args.jobs, args.concurrency, meter)
            finally:
                worker.stop()
            fly = measure_fly(client, env, base, one_job, args, services) if args.runtime == "fly" else None
    finally:
        redis_server.stop()
        remove_work_dir(str(base))
    print(mounts)
    print(f"{'':24}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'per s':>10}")
    for name, row in (("5 no-op task chain", baseline), ("floor (bwrap, S3)", floor),
                      ("sandbox job (ls)", pipeline)):
        print(f"{name:24}{row['p50_ms']:10.1f}{row['p95_ms']:10.1f}{row['p99_ms']:10.1f}{row['throughput_per_s']:10.1f}")
    keys = ("p50_ms", "p95_ms", "p99_ms", "throughput_per_s")
    for name, (top, bottom) in (("ratio floor/chain", (floor, baseline)), ("ratio job/floor", (pipeline, floor)),
                                ("ratio job/chain", (pipeline, baseline))):
        print(f"{name:24}" + "".join(f"{top[k] / bottom[k]:10.2f}" for k in keys))
    if fly is not None:
        row, calls_per_job, agent_routes = fly
        print(f"{'fly job (ls), fake API':24}{row['p50_ms']:10.1f}{row['p95_ms']:10.1f}{row['p99_ms']:10.1f}"
              f"{row['throughput_per_s']:10.1f}")
        print(f"{'ratio fly/local job':24}" + "".join(f"{row[k] / pipeline[k]:10.2f}" for k in keys))
        print(f"Machines API calls per job: {calls_per_job:.2f} (goal <= 4)")
        print(f"agent requests per job: {sum(agent_routes.values()):.2f} ("
              + ", ".join(f"{route} {n:.2f}" for route, n in sorted(agent_routes.items())) + ")")
    print(f"throughput round, CPU ms per job or chain: stack = the worker with its sandboxes, Redis, SeaweedFS, "
          f"this client; host = all {os.cpu_count()} cores, other tenants included")
    cpu_rows = [("5 no-op task chain", baseline), ("floor", floor), ("sandbox job (ls)", pipeline)]
    for name, row in cpu_rows + ([("fly job (ls), fake API", fly[0])] if fly else []):
        print(f"  {name:22}stack {row['stack_cpu_ms']:6.1f}  worker {row['worker_cpu_ms']:6.1f}  "
              f"host {row['host_cpu_ms']:6.1f} (busy {row['host_busy'] * 100:3.0f}%)   of the stack: "
              + ", ".join(f"{part} {row[part + '_cpu_ms']:.1f}" for part in ("sandboxes", "redis", "s3", "client")))
    for name, (top, bottom) in (("ratio floor/chain", (floor, baseline)), ("ratio job/floor", (pipeline, floor)),
                                ("ratio job/chain", (pipeline, baseline))):
        print(f"  {name:22}" + "  ".join(f"{part} {top[part + '_cpu_ms'] / bottom[part + '_cpu_ms']:6.2f}"
                                           for part in ("stack", "worker", "host")))
    print("stage p50 ms  " + "".join(f"{stage:>10}" for stage in ("create", "prepare", "execute", "collect", "cleanup"))
          + "   (over all rounds, and over the sequential one)")
    # the floor's tasks in the job's columns: its store holds cleanup's audit.jsonl PUT too; prepare is a no-op
    print(f"{'':14}" + "".join(f"{task:>10}" for task in ("cgroup", "no-op", "run", "store", "remove"))
          + "   (the floor's tasks in those columns)")
    columns = {"job": ("create", "prepare", "execute", "collect", "cleanup"), "floor": ("cgroup", "", "run", "store", "remove")}
    rows = [(runtime, "job", stages) for runtime, stages in STAGES.items()] + [("floor", "floor", FLOOR_TASKS)]
    for label, kind, found in rows:
        for suffix, chosen in (("", found), (", 1 by 1", [r for r in found if r["round"] == "sequential"])):
            print(f"{label + suffix:14}" + "".join(f"{statistics.median(r.get(c, 0) for r in chosen):10.1f}" if c
                                                   else f"{'-':>10}" for c in columns[kind]))


def measure_fly(client: Celery, env: dict[str, str], base: Path, one_job: Callable[[], None],
                args: argparse.Namespace, services: dict[str, int]) -> tuple[dict[str, float], float, dict[str, float]]:
    """The same jobs on FlyRuntime against the fake Machines API (zero delays, the real agent)."""
    from devstack.processes import free_port
    from collections import Counter

    from tests.support.fakefly import FakeFly, agent_requests

    token, app = "bench-fly-token", "bench-app"
    fake = FakeFly(token, app, base / "fly-machines", agent_port=free_port()).start()
    fly_env = {**env, "SANDBOX_RUNTIME": "fly", "SANDBOX_FLY_API_URL": fake.url, "SANDBOX_FLY_APP": app,
               "SANDBOX_FLY_API_TOKEN": token, "SANDBOX_FLY_IMAGE": "bench", "SANDBOX_FLY_AGENT_SECRET": "b" * 40,
               "SANDBOX_FLY_AGENT_PORT": str(fake.agent_port)}
    worker = Worker(fly_env, node="bench-fly@host", log_path=base / "worker-fly.log")
    worker.start(client)
    fake.requests.clear()  # the worker's own start-up listing is not a job's
    try:
        row = measure(one_job, args.jobs, args.concurrency, CpuMeter(worker.proc.pid, services))
        jobs = 5 + 2 * args.jobs  # measure's warm-up, sequential and parallel rounds
        routes = Counter(r.rsplit(" ", 1)[0] for m in list(fake.machines.values()) + list(fake.destroyed.values())
                         for r in agent_requests(m))
        return row, len(fake.requests) / jobs, {route: n / jobs for route, n in routes.items()}
    finally:
        worker.stop()
        fake.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
