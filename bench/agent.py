"""What the agent's HTTP hop costs: one job's sandbox calls through AgentClient beside the same
calls on LocalRuntime in this process, and 64 MiB moved each way, in one run.

Run as root:  .venv/bin/python bench/agent.py [rounds]

Each round starts a fresh agent (one agent serves one job, as in a machine) before the clock
starts: its start-up is reported apart, since on Fly the machine's own start dwarfs it.
"""
from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.settings import load_settings  # noqa: E402
from sandbox.agent.client import AgentClient  # noqa: E402
from sandbox.runtimes.local import LocalRuntime  # noqa: E402
from sandbox.spec import JobSpec, ResourceLimits  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.services import remove_work_dir  # noqa: E402

TOKEN = uuid.uuid4().hex
MiB = 1 << 20


def spec(disk_bytes: int = 64 * MiB) -> JobSpec:
    return JobSpec(id=f"b{uuid.uuid4().hex[:12]}", command="/bin/true", argv=("/bin/true",), environment={},
                   timeout_s=30, resources=ResourceLimits(1.0, 256 * MiB, disk_bytes, 64))


def job_local(rt: LocalRuntime) -> None:
    s = spec()
    h = rt.create(s, "bench")
    rt.put_file(h, "in.txt", io.BytesIO(b"x" * 1024), 0o644)
    rt.execute(h, s, lambda stream, data: None)
    for fh in rt.logs(h).values():
        fh.read()
        fh.close()
    list(rt.collect(h, ("output",)))
    rt.destroy(h)


def job_agent(c: AgentClient) -> None:
    s = spec()
    c.create(s)
    c.put_file("in.txt", io.BytesIO(b"x" * 1024), 0o644)
    c.execute(lambda stream, data: None)
    for fh in c.logs().values():
        fh.read()
        fh.close()
    c.outputs(("output",))
    c.destroy()


class Source(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, 1 << 16 if n is None or n < 0 else n)
        self.left -= n
        return b"z" * n


def move_local(rt: LocalRuntime, size: int) -> None:
    s = spec(size * 2)
    h = rt.create(s, "bench")
    rt.put_file(h, "output/big", Source(size), 0o644)
    for f in rt.collect(h, ("output",)):
        with f.open() as fh:
            while fh.read(MiB):
                pass
    rt.destroy(h)


def move_agent(c: AgentClient, size: int) -> None:
    c.create(spec(size * 2))
    c.put_file("output/big", Source(size), 0o644)
    for f in c.outputs(("output",)):
        with f.open() as fh:
            while fh.read(MiB):
                pass
    c.destroy()


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    work = tempfile.mkdtemp(prefix="sandbox-bench-", dir=os.environ.get("SANDBOX_BENCH_DIR", "/var/lib"))
    os.chmod(work, 0o711)
    env = {"SANDBOX_WORK_DIR": work, "SANDBOX_AGENT_TOKEN": TOKEN}
    rt = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": work}))
    results: dict[str, list[float]] = {"local job": [], "agent job": [], "agent start": [],
                                       "local 64 MiB in+out": [], "agent 64 MiB in+out": []}
    try:
        for i in range(rounds + 2):  # two warm-up rounds
            keep = i >= 2
            t = time.perf_counter()
            agents = [AgentProcess(env, os.path.join(work, "agent.log")).start() for _ in range(2)]
            start_ms = (time.perf_counter() - t) * 1000 / 2
            clients = [AgentClient(a.url, TOKEN) for a in agents]
            try:
                samples = {"local job": timed(lambda: job_local(rt)), "agent job": timed(lambda: job_agent(clients[0])),
                           "local 64 MiB in+out": timed(lambda: move_local(rt, 64 * MiB)),
                           "agent 64 MiB in+out": timed(lambda: move_agent(clients[1], 64 * MiB)),
                           "agent start": start_ms}
            finally:
                for a in agents:
                    a.stop()
            if keep:
                for name, ms in samples.items():
                    results[name].append(ms)
    finally:
        remove_work_dir(work)
    base = {"agent job": "local job", "agent 64 MiB in+out": "local 64 MiB in+out"}
    print(f"{'variant':24} {'p50 ms':>9} {'p95 ms':>9} {'p50 / local':>12}")
    for name, values in results.items():
        p50 = statistics.median(values)
        p95 = statistics.quantiles(values, n=20)[-1] if len(values) > 1 else p50
        ratio = f"{p50 / statistics.median(results[base[name]]):.2f}x" if name in base else ""
        print(f"{name:24} {p50:9.1f} {p95:9.1f} {ratio:>12}")


if __name__ == "__main__":
    main()
