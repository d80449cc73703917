"""How many sandboxes one node runs at once, at what memory, and whether bursts stay bounded.

    .venv/bin/python bench/capacity.py [--sleepers 50] [--burst 500] [--prefork 0]

Starts its own Redis, SeaweedFS and ONE worker node with the default settings (threads pool,
admission from the host), then:
  1. N jobs of `sleep 2` (cpu 0.1, memory 64Mi) submitted at once: makespan beside the ideal for
     the node's admitted capacity (ceil(N / admitted at once) x 2 s), worker RSS per admitted sandbox;
  2. 40 trivial jobs submitted right after 10 `sleep 5` jobs: the slowest trivial job's latency
     beside what one admission slot would imply (it should never wait for a sleeper to finish);
  3. a burst of M trivial jobs: peak live sandboxes (sampled every 10 ms) beside the admission
     limit, every job `succeeded`, nothing left on the host (sandbox dirs, admitted entries).
--prefork K also runs scenario 1 on the old model (prefork pool, K processes) as a baseline.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery  # noqa: E402

from config import load_settings  # noqa: E402
from devstack.processes import RedisServer, Worker  # noqa: E402
from devstack.seaweed import seaweed_server  # noqa: E402
from sandbox.admission import Capacity, Request, admitted_key  # noqa: E402
from tests.support.services import remove_work_dir  # noqa: E402
from bench.hostmounts import describe as describe_mounts  # noqa: E402

NODE = "cap@host"
SMALL = {"cpu": "0.1", "memory": "64Mi", "disk": "16Mi"}


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def worker_pids(pid: int) -> list[int]:
    """The worker and its children running the same program (prefork's pool processes), found
    once: a sample then reads one small file per process. Walking every thread's children and
    every sandbox's processes each 10 ms took a quarter of a core from the 2-core node measured."""
    exe = os.readlink(f"/proc/{pid}/exe")
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                children += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    same = []
    for child in children:
        try:
            if os.readlink(f"/proc/{child}/exe") == exe:
                same.append(child)
        except (FileNotFoundError, PermissionError):
            continue  # a sandbox that ended meanwhile, or one whose exe is not ours to read
    return [pid, *same]


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes (statm's second field: VmRSS, in pages)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_BYTES
        except (FileNotFoundError, ProcessLookupError):
            continue  # a pool process that ended; the sample counts the ones alive
    return total


class Sampler:
    """Samples live sandbox dirs, admitted entries and the worker's RSS every 10 ms, and what the
    sampling itself cost (CPU seconds of its thread, taken from the node it measures)."""

    def __init__(self, work: Path, client: redis.Redis, pid: int) -> None:
        self.run_dir, self.client, self.pids = work / "run", client, worker_pids(pid)
        self.peak_live = self.peak_admitted = self.peak_rss = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start_cpu_s = time.thread_time()
        while not self._stop.is_set():
            with os.scandir(self.run_dir) as entries:
                live = sum(1 for e in entries if e.name.startswith("sbx-"))
            self.peak_live = max(self.peak_live, live)
            self.peak_admitted = max(self.peak_admitted, self.client.hlen(admitted_key(NODE)))
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pids))
            time.sleep(0.01)
        self.cpu_s = time.thread_time() - start_cpu_s


def run_jobs(client: Celery, jobs: list[dict]) -> tuple[list[dict], list[float], float]:
    """Submit all at once; (records, latency of each from the first submit, makespan)."""
    start = time.perf_counter()
    pending = [client.send_task("sandbox.submit", args=[json.dumps(j)]) for j in jobs]
    records, latencies = [], []
    done: dict[int, float] = {}
    # One MGET of the result keys per poll (0.1-0.6 ms of client CPU): a GET per pending job took
    # 2.9 ms of client CPU per poll for 50 jobs, 30 ms for 500 (plus Redis's), from the 2-core host
    # whose node is being measured.
    backend, rc = client.backend, client.backend.client
    keys = [backend.get_key_for_task(p.id) for p in pending]
    while len(done) < len(pending):
        waiting = [i for i in range(len(pending)) if i not in done]
        now = time.perf_counter() - start
        for i, value in zip(waiting, rc.mget([keys[i] for i in waiting])):
            if value is not None and json.loads(value).get("status") in ("SUCCESS", "FAILURE"):
                done[i] = now
        time.sleep(0.005)
    for i, p in enumerate(pending):
        records.append(p.get(timeout=30))
        latencies.append(done[i])
    return records, latencies, max(latencies)


def job(command: str, timeout_s: int = 60) -> dict:
    return {"id": f"cap-{uuid.uuid4().hex[:12]}", "command": command, "timeout": timeout_s, "resources": SMALL}


def admitted_at_once(settings: Any, n: int) -> int:
    """How many SMALL jobs this node's capacity admits together."""
    cap, req = Capacity.of(settings), Request(0.1, 64 << 20, 16 << 20)
    return min(n, cap.max_sandboxes, int(cap.cpu / req.cpu + 1e-9), cap.memory_bytes // req.memory_bytes)


def scenario_sleepers(client: Celery, rc: redis.Redis, work: Path, worker: Worker, n: int, settings: Any) -> dict:
    idle_rss = rss_bytes(worker_pids(worker.proc.pid))
    with Sampler(work, rc, worker.proc.pid) as s:
        records, _, makespan = run_jobs(client, [job("sleep 2") for _ in range(n)])
    assert all(r["status"] == "succeeded" for r in records), [r["error"] for r in records if r["status"] != "succeeded"]
    at_once = admitted_at_once(settings, n)
    ideal = math.ceil(n / at_once) * 2.0
    return {"jobs": n, "makespan_s": makespan, "ideal_s": ideal, "ratio": makespan / ideal,
            "peak_admitted": s.peak_admitted, "admissible": at_once, "idle_rss_mib": idle_rss / 2**20,
            "peak_rss_mib": s.peak_rss / 2**20,
            "rss_per_sandbox_mib": (s.peak_rss - idle_rss) / max(1, s.peak_admitted) / 2**20,
            "sampler_cpu_s": s.cpu_s}


def scenario_mix(client: Celery, settings: Any) -> dict:
    jobs = [job("sleep 5") for _ in range(10)] + [job("ls") for _ in range(40)]
    records, latencies, makespan = run_jobs(client, jobs)
    assert all(r["status"] == "succeeded" for r in records)
    trivial = sorted(latencies[10:])
    slot_s = 5.0 if admitted_at_once(settings, 50) < 50 else 0.0  # waiting one sleeper out, at most
    return {"trivial_p50_s": trivial[len(trivial) // 2], "trivial_max_s": trivial[-1], "sleeper_s": 5.0,
            "one_slot_s": slot_s, "makespan_s": makespan}


def scenario_burst(client: Celery, rc: redis.Redis, work: Path, worker: Worker, n: int, settings: Any) -> dict:
    with Sampler(work, rc, worker.proc.pid) as s:
        records, _, makespan = run_jobs(client, [job("ls") for _ in range(n)])
    time.sleep(0.5)
    left = [p.name for p in (work / "run").iterdir() if p.name.startswith("sbx-")]
    return {"jobs": n, "succeeded": sum(r["status"] == "succeeded" for r in records), "makespan_s": makespan,
            "per_s": n / makespan, "peak_live": s.peak_live, "peak_admitted": s.peak_admitted,
            "limit": Capacity.of(settings).max_sandboxes, "left_sandboxes": len(left),
            "left_admitted": rc.hlen(admitted_key(NODE)), "sampler_cpu_s": s.cpu_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sleepers", type=int, default=50)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--prefork", type=int, default=0, help="also run scenario 1 on a prefork pool of K")
    args = parser.parse_args()
    mounts = describe_mounts()
    base = Path(tempfile.mkdtemp(prefix="bench-cap-", dir="/var/tmp"))
    base.chmod(0o711)
    work = base / "work"
    redis_server = RedisServer(base)
    redis_server.start()
    results: dict[str, dict] = {}
    try:
        with seaweed_server(base / "s3") as s3:
            env = {"SANDBOX_REDIS_URL": redis_server.url, **s3.env(), "SANDBOX_WORK_DIR": str(work),
                   "SANDBOX_ALLOWED_COMMANDS": "ls,sleep"}
            settings = load_settings(env)
            client = Celery("bench", broker=redis_server.url, backend=redis_server.url)
            client.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"],
                               task_default_queue="sandbox")
            rc = redis.Redis.from_url(redis_server.url)
            worker = Worker(env, node=NODE, log_path=base / "worker.log")
            worker.start(client)
            try:
                run_jobs(client, [job("ls") for _ in range(3)])  # warm up
                results["sleepers"] = scenario_sleepers(client, rc, work, worker, args.sleepers, settings)
                results["mix"] = scenario_mix(client, settings)
                results["burst"] = scenario_burst(client, rc, work, worker, args.burst, settings)
            finally:
                worker.stop()
            if args.prefork:
                old = Worker(env, node=NODE, log_path=base / "worker-prefork.log", concurrency=args.prefork)
                # "processes", Celery's other name for prefork: it reads "--pool=prefork" as "the
                # default" and takes celeryconfig's worker_pool (threads) instead, so that flag
                # measured the threads pool again
                old.extra_args = ["--pool=processes"]
                old.start(client)
                try:
                    results["prefork"] = scenario_sleepers(client, rc, work, old, args.sleepers, settings)
                finally:
                    old.stop()
    finally:
        redis_server.stop()
        remove_work_dir(str(base))
    print(json.dumps(results, indent=1))
    print(mounts)
    s, m, b = results["sleepers"], results["mix"], results["burst"]
    print(f"\n{s['jobs']} x sleep 2: makespan {s['makespan_s']:.1f} s, ideal {s['ideal_s']:.1f} s "
          f"({s['admissible']} admitted at once) -> {s['ratio']:.2f}x; peak admitted {s['peak_admitted']}; "
          f"worker RSS {s['idle_rss_mib']:.0f} -> {s['peak_rss_mib']:.0f} MiB, "
          f"{s['rss_per_sandbox_mib']:.2f} MiB per admitted sandbox (the sampler took {s['sampler_cpu_s']:.2f} s CPU)")
    if "prefork" in results:
        p = results["prefork"]
        print(f"  prefork -c {args.prefork} baseline: makespan {p['makespan_s']:.1f} s "
              f"(threads/prefork {s['makespan_s'] / p['makespan_s']:.2f}x), worker RSS {p['peak_rss_mib']:.0f} MiB")
    print(f"10 x sleep 5 + 40 trivial: trivial p50 {m['trivial_p50_s']:.2f} s, max {m['trivial_max_s']:.2f} s "
          f"(a sleeper lasts {m['sleeper_s']:.0f} s; one admission slot implies {m['one_slot_s']:.0f} s)")
    print(f"burst of {b['jobs']}: {b['succeeded']} succeeded in {b['makespan_s']:.1f} s ({b['per_s']:.1f}/s); "
          f"peak live sandboxes {b['peak_live']}, peak admitted {b['peak_admitted']}, limit {b['limit']}; "
          f"left on the host: {b['left_sandboxes']} sandboxes, {b['left_admitted']} admitted entries "
          f"(the sampler took {b['sampler_cpu_s']:.2f} s CPU)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
