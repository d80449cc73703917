"""CgroupV2 against a REAL cgroup2 hierarchy: the hybrid host's /sys/fs/cgroup/unified.

Its controllers are bound to v1 (memory.max, pids.max, cpu.max do not exist there), but the core of
v2 is real: cgroup.procs, cgroup.events, cgroup.kill, cgroup.freeze, rmdir's rules, and the
no-internal-process rule (with hugetlb, the one controller not bound to v1). Job groups are made
with mkdir because create() rightly refuses a group without memory, pids and cpu.
Every group a test makes is under pytest-cgv2-<pid>-<hex> and is killed and removed afterwards;
groups of dead test runs are swept at the start.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from sandbox.errors import SandboxFailure
from sandbox.runtimes import cgrouphost, cgroups
from sandbox.runtimes.cgroups import CgroupV1, CgroupV2
from tests.support.services import unavailable

PREFIX = "pytest-cgv2-"
LOCK = "/run/lock/sandbox-cgv2-test.lock"


def _v2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    return None


def _kill_and_remove(d: Path) -> None:
    """Deepest first: cgroup.kill, wait for populated 0, rmdir."""
    for child in [c for c in d.iterdir() if c.is_dir()]:
        _kill_and_remove(child)
    if (d / "cgroup.kill").exists():
        (d / "cgroup.kill").write_text("1")
    for _ in range(1000):
        if "populated 0" in (d / "cgroup.events").read_text():
            break
        time.sleep(0.005)
    os.rmdir(d)


def _sweep_dead_runs(base: Path) -> None:
    for d in base.glob(PREFIX + "*"):
        pid = int(d.name[len(PREFIX):].split("-")[0])
        if not Path(f"/proc/{pid}").exists():
            _kill_and_remove(d)


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A fresh group under this process's own v2 cgroup, removed with all it holds afterwards."""
    mount = _v2_mount()
    if mount is None:
        unavailable("no cgroup2 hierarchy is mounted")
    if os.geteuid() != 0:
        unavailable("managing cgroups needs root")
    own = cgrouphost._own_paths(Path("/proc/self/cgroup").read_text()).get("", "/")
    base = mount / own.lstrip("/")
    _sweep_dead_runs(base)
    d = base / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        _kill_and_remove(d)
        assert not d.exists()


def _spawn(procs_file: str, code: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start python `code` joined to the group the way the executor joins bwrap; read its pid line."""
    def join() -> None:
        with open(procs_file, "w") as f:
            f.write("0")
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], preexec_fn=join,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, [int(x) for x in p.stdout.readline().split()]


def _alive(pid: int) -> bool:
    """Running, not a zombie (an unreaped child stays in /proc but holds nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


TREE = """
    import os, sys, time
    pids = [os.getpid()]
    r, w = os.pipe()
    if os.fork() == 0:                    # a setsid daemon, double-forked away from us
        os.setsid()
        if os.fork() == 0:
            os.write(w, f"{os.getpid()} ".encode()); time.sleep(300)
        os._exit(0)
    pids.append(int(os.read(r, 32)))
    for _ in range(3):                    # a fork chain three deep
        if os.fork() != 0:
            break
        pids.append(os.getpid())
    else:
        print(*pids, flush=True)
    time.sleep(300)
"""


def test_kill_takes_a_real_tree_with_a_setsid_daemon_and_a_fork_chain(scratch: Path) -> None:
    cg = CgroupV2(str(scratch))
    (scratch / "job").mkdir()
    p, pids = _spawn(cg.procs_files("job")[0], TREE)
    try:
        assert len(pids) == 5 and all(_alive(x) for x in pids)
        assert set(pids) <= set(cg.pids("job")), "forks and the daemon inherit the group"
        daemon_sid = int(Path(f"/proc/{pids[1]}/stat").read_text().rsplit(")", 1)[1].split()[3])
        assert daemon_sid not in (os.getsid(0), os.getsid(p.pid)), "the daemon left our session"
        assert cg.populated("job")
        cg.kill("job")
        assert not cg.populated("job") and cg.pids("job") == []
        assert not any(_alive(x) for x in pids)
        assert p.wait(timeout=10) == -signal.SIGKILL
        cg.remove("job")
        assert not (scratch / "job").exists()
        cg.remove("job")  # idempotent, as destroy and the sweep may both run
        cg.kill("job")
    finally:
        p.kill()
        p.wait()


def test_kill_contains_a_process_forking_as_fast_as_it_can(scratch: Path) -> None:
    cg = CgroupV2(str(scratch))
    (scratch / "job").mkdir()
    marker = uuid.uuid4().hex
    p, _ = _spawn(cg.procs_files("job")[0], f"""
        import os, time
        print(os.getpid(), flush=True)
        marker = "{marker}"              # in every fork's cmdline, to find survivors by
        procs = "{scratch / 'job' / 'cgroup.procs'}"
        while True:                       # parent and child both keep forking, capped for the host
            if len(open(procs).read().split()) < 150:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
            else:
                time.sleep(0.001)
    """)
    try:
        for _ in range(500):
            if len(cg.pids("job")) > 50:
                break
            time.sleep(0.01)
        assert len(cg.pids("job")) > 50
        cg.kill("job")
        assert not cg.populated("job")
        survivors = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and _alive(int(d.name))
                     and marker.encode() in _cmdline(d)]
        assert survivors == []
        cg.remove("job")
    finally:
        p.kill()
        p.wait()


def _cmdline(d: Path) -> bytes:
    try:
        return (d / "cmdline").read_bytes()
    except OSError:
        return b""


def test_kill_works_on_a_frozen_group(scratch: Path) -> None:
    cg = CgroupV2(str(scratch))
    (scratch / "job").mkdir()
    p, pids = _spawn(cg.procs_files("job")[0], "import os, time; print(os.getpid(), flush=True); time.sleep(300)")
    try:
        (scratch / "job" / "cgroup.freeze").write_text("1")
        for _ in range(500):
            if "frozen 1" in (scratch / "job" / "cgroup.events").read_text():
                break
            time.sleep(0.005)
        assert "frozen 1" in (scratch / "job" / "cgroup.events").read_text()
        cg.kill("job")  # SIGKILL reaches frozen tasks on v2: no thaw needed, unlike v1's freezer
        assert not cg.populated("job") and not _alive(pids[0])
        cg.remove("job")
    finally:
        p.kill()
        p.wait()


def test_remove_refuses_a_populated_group_until_it_is_killed(scratch: Path) -> None:
    cg = CgroupV2(str(scratch))
    (scratch / "job").mkdir()
    p, pids = _spawn(cg.procs_files("job")[0], "import os, time; print(os.getpid(), flush=True); time.sleep(300)")
    try:
        with pytest.raises(OSError) as e:
            cg.remove("job")
        assert e.value.errno == errno.EBUSY  # the kernel's answer (not ENOTEMPTY), checked here
        assert (scratch / "job").is_dir() and _alive(pids[0])
        cg.kill("job")
        cg.remove("job")  # p is still an unreaped zombie: it does not hold the group
        assert not (scratch / "job").exists()
    finally:
        p.kill()
        p.wait()


def test_an_empty_group_is_not_populated_and_kill_is_a_no_op(scratch: Path) -> None:
    cg = CgroupV2(str(scratch))
    (scratch / "job").mkdir()
    assert cg.pids("job") == [] and not cg.populated("job")
    cg.kill("job")
    assert (scratch / "job" / "cgroup.events").read_text().startswith("populated 0")
    cg.remove("job")
    assert not cg.populated("job")


def test_idle_groups_are_those_the_kernel_says_are_unpopulated_a_process_in_a_sub_group_included(
        scratch: Path) -> None:
    # Given empty, busy and nested-busy groups (the process in a sub-group is in no cgroup.procs of
    # the group itself: only cgroup.events' populated counts it), and a group of another prefix
    cg = CgroupV2(str(scratch))
    for name in ("sbx-idle", "sbx-busy", "sbx-nested", "sbx-nested/inner", "other"):
        (scratch / name).mkdir()
    sleep = "import os, time; print(os.getpid(), flush=True); time.sleep(300)"
    procs = [_spawn(str(scratch / where / "cgroup.procs"), sleep)[0] for where in ("sbx-busy", "sbx-nested/inner")]
    try:
        assert (scratch / "sbx-nested" / "cgroup.procs").read_text() == ""
        # When the sweep asks which groups are idle; Then only the empty one, with its mkdir time
        idle = cgroups.idle_groups(cg, "sbx-")
        assert idle == {"sbx-idle": (scratch / "sbx-idle").stat().st_mtime}
        # and once their processes are gone, the others too
        for where in ("sbx-busy", "sbx-nested"):
            (scratch / where / "cgroup.kill").write_text("1")
        for p in procs:
            p.wait(timeout=10)
        deadline = time.monotonic() + 5
        while set(cgroups.idle_groups(cg, "sbx-")) != {"sbx-idle", "sbx-busy", "sbx-nested"}:
            assert time.monotonic() < deadline, cgroups.idle_groups(cg, "sbx-")
            time.sleep(0.005)  # populated drops a moment after the last task's exit
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_group_left_behind_by_a_dead_worker_is_killed_and_removed_by_a_fresh_one(scratch: Path) -> None:
    # Given a worker that put a job's setsid daemon in a group and died without cleaning up
    job = scratch / "job"
    job.mkdir()
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            open("{job / 'cgroup.procs'}", "w").write("0")
            if os.fork() == 0:
                print(os.getpid(), flush=True); time.sleep(300)
            os._exit(0)
        os.wait()
    """)], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    daemon = int(worker.stdout.readline())  # not read to EOF: the daemon holds the pipe
    assert worker.wait(timeout=30) == 0
    assert _alive(daemon) and daemon in CgroupV2(str(scratch)).pids("job")
    # When a new worker (no memory of it) tears the sandbox down, as sweep_orphans' destroy does
    fresh = CgroupV2(str(scratch))
    fresh.kill("job")
    fresh.remove("job")
    # Then the daemon is dead and the group gone
    assert not _alive(daemon) and not job.exists()


def test_create_refuses_a_real_group_without_the_limit_controllers(scratch: Path) -> None:
    if "memory" in (scratch / "cgroup.controllers").read_text().split():
        pytest.skip("this v2 hierarchy has the memory controller; covered by the runtime tests")
    cg = CgroupV2(str(scratch))
    with pytest.raises(SandboxFailure, match="lacks the memory, pids, cpu"):
        cg.create("job", cgroups.CgroupLimits(cpu=0.5, memory_bytes=64 << 20, pids=16))
    assert not (scratch / "job").exists()


def test_detection_on_this_hybrid_host_picks_v1_and_the_bare_v2_mount_fails_clearly() -> None:
    mount = _v2_mount()
    if mount is None:
        unavailable("no cgroup2 hierarchy is mounted")
    if mount == Path("/sys/fs/cgroup"):
        pytest.skip("a pure v2 host: nothing hybrid to check")
    assert isinstance(cgrouphost.detect(), CgroupV1)
    if "memory" in (mount / "cgroup.controllers").read_text().split():
        return
    own = cgrouphost._own_paths(Path("/proc/self/cgroup").read_text()).get("", "/")
    left = mount / own.lstrip("/") / cgroups.PARENT
    existed = left.exists()
    with pytest.raises(SandboxFailure, match="memory, pids, cpu not available"):
        cgrouphost.detect(str(mount))
    assert left.exists() == existed  # checked before anything is made


@pytest.fixture()
def hugetlb_root(scratch: Path) -> Iterator[Path]:
    """scratch with hugetlb in its cgroup.controllers: the one real controller for the v2 rules here."""
    upper = scratch.parent
    if "hugetlb" not in (upper / "cgroup.controllers").read_text().split():
        pytest.skip("no free hugetlb controller on this v2 hierarchy")
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # concurrent runs must not disable it under each other
        enabled_here = "hugetlb" not in (upper / "cgroup.subtree_control").read_text().split()
        if enabled_here:
            (upper / "cgroup.subtree_control").write_text("+hugetlb")
        try:
            (scratch / "cgroup.subtree_control").write_text("+hugetlb")
            yield scratch
        finally:
            for child in [c for c in scratch.iterdir() if c.is_dir()]:
                _kill_and_remove(child)
            (scratch / "cgroup.subtree_control").write_text("-hugetlb")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if enabled_here:
                    (upper / "cgroup.subtree_control").write_text("-hugetlb")
            except OSError:
                pass  # another run still uses it, or a sibling enabled it: leave it on


def test_delegation_obeys_the_no_internal_process_rule(hugetlb_root: Path) -> None:
    # Given a unit cgroup holding the worker (what /proc/self/cgroup names on a v2 host)
    unit = hugetlb_root / "unit"
    unit.mkdir()
    p, pids = _spawn(str(unit / "cgroup.procs"), "import os, time; print(os.getpid(), flush=True); time.sleep(300)")
    try:
        # Then delegating below it fails, as the default layout does on real v2 hosts
        with pytest.raises(SandboxFailure, match="Device or resource busy"):
            cgrouphost._delegate_v2(str(unit / "sandbox"), ("hugetlb",))
        assert not (unit / "sandbox").exists()
        # When the worker moves to a leaf (systemd Delegate=yes layout), delegation works
        (unit / "worker").mkdir()
        (unit / "worker" / "cgroup.procs").write_text(str(pids[0]))
        cgrouphost._delegate_v2(str(unit / "sandbox"), ("hugetlb",))
        assert (unit / "sandbox" / "cgroup.subtree_control").read_text().split() == ["hugetlb"]
        cg = CgroupV2(str(unit / "sandbox"))
        (unit / "sandbox" / "job").mkdir()
        assert (unit / "sandbox" / "job" / "cgroup.controllers").read_text().split() == ["hugetlb"]
        with pytest.raises(OSError) as e:  # the parent with controllers on can never hold a process
            (unit / "sandbox" / "cgroup.procs").write_text(str(pids[0]))
        assert e.value.errno == errno.EBUSY
        (unit / "sandbox" / "job" / "cgroup.procs").write_text(str(pids[0]))
        assert cg.pids("job") == [pids[0]]
        cg.kill("job")
        assert p.wait(timeout=10) == -signal.SIGKILL
        cg.remove("job")
    finally:
        p.kill()
        p.wait()
