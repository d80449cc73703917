"""Sandbox start + teardown cost beside a plain subprocess and a bare bwrap (+cgroup), in one run.

Run as root:  .venv/bin/python bench/sandbox_start.py [iterations]

The sandboxes live in a fresh directory under $SANDBOX_BENCH_DIR (default /var/lib, beside the
production default work dir /var/lib/sandbox). Why not /tmp: on these shared hosts creating a
file in some fresh directories under /tmp measured 0.4-0.8 ms (ext4 inode placement in busy block
groups) against 0.02-0.1 ms under /var/lib, and each sandbox creates about ten files and dirs.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.settings import load_settings  # noqa: E402
from sandbox.runtimes import cgroups, dynmods  # noqa: E402
from sandbox.runtimes.local import LocalRuntime  # noqa: E402
from sandbox.spec import JobSpec, ResourceLimits  # noqa: E402
from tests.support.services import remove_work_dir  # noqa: E402  (unmounts the run dir's tmpfs too)
from bench.hostmounts import describe as describe_mounts  # noqa: E402

BARE = ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--proc", "/proc", "--dev", "/dev", "/bin/true"]


def measure(variants: dict[str, Callable[[], None]], n: int) -> dict[str, list[float]]:
    """Wall time in ms of `n` calls of each variant after two warm-ups, interleaved round-robin
    so that load from other processes on the host falls on every variant alike."""
    for fn in variants.values():
        fn(), fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(n):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    """Print p50/p95 per variant and ratios against bare bwrap + cgroup."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    mounts = describe_mounts()
    work = tempfile.mkdtemp(prefix="sandbox-bench-", dir=os.environ.get("SANDBOX_BENCH_DIR", "/var/lib"))
    os.chmod(work, 0o711)
    rt = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": work}))
    limits = cgroups.CgroupLimits(1.0, 256 << 20, 64)

    def bare_cgroup() -> None:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        rt.cgroups.create(name, limits)
        files = rt.cgroups.procs_files(name)

        def join() -> None:
            for f in files:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))
        subprocess.run(BARE, env={}, preexec_fn=join, check=True)
        rt.cgroups.kill(name)
        rt.cgroups.remove(name)

    def spec() -> JobSpec:
        return JobSpec(id=f"b{uuid.uuid4().hex[:10]}", command="/bin/true", argv=("/bin/true",), environment={},
                       timeout_s=30, resources=ResourceLimits(cpu=1.0, memory_bytes=256 << 20,
                                                              disk_bytes=1 << 30, pids=64))

    phases: dict[str, list[float]] = {"  of which create": [], "  of which execute": [], "  of which destroy": []}

    def full() -> None:
        s = spec()
        t0 = time.perf_counter()
        h = rt.create(s, "bench")
        t1 = time.perf_counter()
        r = rt.execute(h, s, lambda *_: None)
        t2 = time.perf_counter()
        assert r.outcome == "succeeded", r
        rt.destroy(h)
        t3 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[name].append(dt * 1000)

    ready: list = []

    def execute_only() -> None:
        s, h = ready.pop()
        rt.execute(h, s, lambda *_: None)

    for _ in range(n + 2):  # sandboxes made ahead, so "execute only" times just the run
        s = spec()
        ready.append((s, rt.create(s, "bench")))
    handles = [h for _, h in ready]
    try:
        variants = measure({
            "plain subprocess /bin/true": lambda: subprocess.run(["/bin/true"], check=True),
            "bare bwrap /bin/true": lambda: subprocess.run(BARE, env={}, check=True),
            "bare bwrap + cgroup": bare_cgroup,
            "LocalRuntime create+execute+destroy": full,
            "LocalRuntime execute only": execute_only,
        }, n)
    finally:
        for h in handles:
            rt.destroy(h)
        remove_work_dir(work)
    for name, times in phases.items():
        variants[name] = times[2:]  # drop the warm-ups

    base = statistics.median(variants["bare bwrap + cgroup"])
    low = min(variants["bare bwrap + cgroup"])
    print(mounts)
    print(f"work dir {work}; {n} interleaved rounds; cgroup favordynmods: {dynmods.state()} "
          f"(start-up: {rt.favordynmods}; off costs each job's cgroup join 5-17 ms)")
    print(f"{'variant':40} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8} {'x bwrap+cg':>11} {'min x':>6}")
    for name, times in variants.items():
        times.sort()
        p50, p95 = statistics.median(times), times[int(len(times) * 0.95) - 1]
        # min/min: the cost without the other engineers' load that swings p50 on a shared host
        print(f"{name:40} {p50:8.2f} {p95:8.2f} {times[0]:8.2f} {p50 / base:11.2f} {times[0] / low:6.2f}")


if __name__ == "__main__":
    main()
