"""Sandbox start + teardown cost beside a plain subprocess and a bare bwrap (+cgroup), in one run.

Run as root:  .venv/bin/python bench/sandbox_start.py [iterations]
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.settings import load_settings  # noqa: E402
from sandbox.runtimes import cgroups  # noqa: E402
from sandbox.runtimes.local import LocalRuntime  # noqa: E402
from sandbox.spec import JobSpec, ResourceLimits  # noqa: E402

BARE = ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--proc", "/proc", "--dev", "/dev", "/bin/true"]


def measure(fn: Callable[[], None], n: int) -> list[float]:
    """Wall time in ms of `n` calls after two warm-ups."""
    fn(), fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    """Print p50/p95 per variant and ratios against bare bwrap + cgroup."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    work = tempfile.mkdtemp(prefix="sbx-bench-", dir="/tmp")
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

    def full() -> None:
        s = spec()
        h = rt.create(s, "bench")
        r = rt.execute(h, s, lambda *_: None)
        assert r.outcome == "succeeded", r
        rt.destroy(h)

    ready: list = []

    def execute_only() -> None:
        s, h = ready.pop()
        rt.execute(h, s, lambda *_: None)

    def prepare_ready() -> None:
        s = spec()
        ready.append((s, rt.create(s, "bench")))

    variants: dict[str, list[float]] = {
        "plain subprocess /bin/true": measure(lambda: subprocess.run(["/bin/true"], check=True), n),
        "bare bwrap /bin/true": measure(lambda: subprocess.run(BARE, env={}, check=True), n),
        "bare bwrap + cgroup": measure(bare_cgroup, n),
        "LocalRuntime create+execute+destroy": measure(full, n),
    }
    for _ in range(n + 2):
        prepare_ready()
    handles = [h for _, h in ready]
    variants["LocalRuntime execute only"] = measure(execute_only, n)
    for h in handles:
        rt.destroy(h)
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(variants["bare bwrap + cgroup"])
    print(f"{'variant':40} {'p50 ms':>8} {'p95 ms':>8} {'x bwrap+cg':>11}")
    for name, times in variants.items():
        times.sort()
        p50, p95 = statistics.median(times), times[int(len(times) * 0.95) - 1]
        print(f"{name:40} {p50:8.2f} {p95:8.2f} {p50 / base:11.2f}")


if __name__ == "__main__":
    main()
