"""cgroup file logic against a fake cgroupfs: v2 (controllers bound to v1 on these hosts) and v1 parsing.

The fake v2 hierarchy follows what a real one does (checked on the hybrid host's cgroup2 mount for
the core files): the files each controller adds, their default values, read-back formats, and the
kernel's answers: EACCES for a file that does not exist, ENOENT for enabling a controller the
parent does not offer, EBUSY for the no-internal-process rule and for rmdir of a populated group or
one with children, EAGAIN past cgroup.max.descendants, EINVAL for malformed limits.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandbox.errors import SandboxFailure
from sandbox.runtimes import cgrouphost, cgroups
from sandbox.runtimes.cgroups import CgroupLimits, CgroupV1, CgroupV2

LIMITS = CgroupLimits(cpu=0.5, memory_bytes=256 << 20, pids=64)
KERNEL_ORDER = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
CONTROLLER_FILES = {
    "memory": {"memory.max": "max\n", "memory.swap.max": "max\n", "memory.peak": "0\n",
               "memory.current": "0\n",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
    "pids": {"pids.max": "max\n", "pids.peak": "0\n", "pids.current": "0\n", "pids.events": "max 0\n"},
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
}
CPU_STAT_CORE = "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnice_usec 0\n"
CPU_STAT_CPU = "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeCgroup2:
    """A unified hierarchy on a tmp dir; cgroups' os.makedirs/os.rmdir/_write go through it."""

    def __init__(self, root: Path, controllers: str = " ".join(KERNEL_ORDER)) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        for f, v in {"cgroup.controllers": controllers + "\n", "cgroup.subtree_control": "\n",
                     "cgroup.procs": "", "cgroup.max.descendants": "max\n", "cpu.stat": CPU_STAT_CORE}.items():
            (root / f).write_text(v)

    def _set(self, d: Path, key: str) -> list[str]:
        return (d / key).read_text().split()

    def mkdir(self, path: str) -> None:
        d, up = Path(path), Path(path).parent
        if d.exists():
            raise _err(errno.EEXIST, path)
        limit = (up / "cgroup.max.descendants").read_text().strip()
        if limit != "max" and sum(1 for c in up.iterdir() if c.is_dir()) >= int(limit):
            raise _err(errno.EAGAIN, path)
        d.mkdir()
        enabled = self._set(up, "cgroup.subtree_control")
        files = {"cgroup.controllers": " ".join(enabled) + "\n", "cgroup.subtree_control": "\n",
                 "cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.type": "domain\n",
                 "cgroup.max.descendants": "max\n", "cgroup.freeze": "0\n", "cgroup.kill": "",
                 "cpu.stat": CPU_STAT_CORE + (CPU_STAT_CPU if "cpu" in enabled else "")}
        for c in enabled:
            files.update(CONTROLLER_FILES.get(c, {}))
        for f, v in files.items():
            (d / f).write_text(v)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if Path(path).is_dir() and exist_ok:
            return
        if not Path(path).parent.is_dir():
            self.makedirs(str(Path(path).parent), exist_ok=True)
        self.mkdir(path)

    def rmdir(self, path: str) -> None:
        d = Path(path)
        if not d.is_dir():
            raise _err(errno.ENOENT, path)
        if self.populated(d) or any(c.is_dir() for c in d.iterdir()):
            raise _err(errno.EBUSY, path)
        shutil.rmtree(d)

    def populated(self, d: Path) -> bool:
        return bool((d / "cgroup.procs").read_text().split()) or any(
            self.populated(c) for c in d.iterdir() if c.is_dir())

    def join(self, d: Path, pid: int) -> None:
        """Write a pid to cgroup.procs with the kernel's rule, and update populated up the tree."""
        if d != self.root and self._set(d, "cgroup.subtree_control"):
            raise _err(errno.EBUSY, str(d / "cgroup.procs"))  # no internal processes
        with open(d / "cgroup.procs", "a") as f:
            f.write(f"{pid}\n")
        self._refresh(d)

    def _refresh(self, d: Path) -> None:
        while d != self.root:
            (d / "cgroup.events").write_text(f"populated {int(self.populated(d))}\nfrozen 0\n")
            d = d.parent

    def write(self, path: str, value: str) -> None:
        p = Path(path)
        if not p.exists():
            raise _err(errno.EACCES, path)  # what kernfs answers for a controller file that is absent
        handler = getattr(self, "_w_" + p.name.replace(".", "_"), None)
        if handler is None:
            raise AssertionError(f"the fake has no rule for {p.name}; add the kernel's")
        handler(p, value.strip())

    def _w_cgroup_procs(self, p: Path, v: str) -> None:
        self.join(p.parent, int(v))

    def _w_cgroup_kill(self, p: Path, v: str) -> None:
        if v != "1":
            raise _err(errno.ERANGE, str(p))
        (p.parent / "cgroup.procs").write_text("")
        self._refresh(p.parent)

    def _w_cgroup_subtree_control(self, p: Path, v: str) -> None:
        d, current = p.parent, self._set(p.parent, "cgroup.subtree_control")
        for tok in v.split():
            name = tok[1:]
            if tok[0] not in "+-" or name not in KERNEL_ORDER:
                raise _err(errno.EINVAL, str(p))
            if tok[0] == "+" and name not in self._set(d, "cgroup.controllers"):
                raise _err(errno.ENOENT, str(p))
        enable = {t[1:] for t in v.split() if t[0] == "+"}
        if enable - set(current) and d != self.root and (d / "cgroup.procs").read_text().split():
            raise _err(errno.EBUSY, str(p))
        new = (set(current) | enable) - {t[1:] for t in v.split() if t[0] == "-"}
        p.write_text(" ".join(c for c in KERNEL_ORDER if c in new) + "\n")

    def _w_cgroup_max_descendants(self, p: Path, v: str) -> None:
        self._number(p, v, 0)

    def _number(self, p: Path, v: str, minimum: int) -> None:
        if v != "max" and not (v.isdigit() and int(v) >= minimum):
            raise _err(errno.EINVAL, str(p))
        p.write_text(v + "\n")

    def _w_memory_max(self, p: Path, v: str) -> None:
        self._number(p, v, 0)

    def _w_memory_swap_max(self, p: Path, v: str) -> None:
        self._number(p, v, 0)

    def _w_pids_max(self, p: Path, v: str) -> None:
        self._number(p, v, 0)

    def _w_cpu_max(self, p: Path, v: str) -> None:
        parts = v.split()
        quota, period = parts[0], parts[1] if len(parts) > 1 else "100000"
        if not (period.isdigit() and 1000 <= int(period) <= 1_000_000):
            raise _err(errno.EINVAL, str(p))
        if quota != "max" and not (quota.isdigit() and int(quota) >= 1000):
            raise _err(errno.EINVAL, str(p))
        p.write_text(f"{quota} {period}\n")


class _FakeOs:
    """os for the cgroups module, with makedirs/rmdir of the fake's kernel rules."""

    def __init__(self, fake: FakeCgroup2) -> None:
        self.fake = fake

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.fake.makedirs(path, exist_ok)

    def rmdir(self, path: str) -> None:
        self.fake.rmdir(path)


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroup2:
    """A fresh fake unified hierarchy at tmp_path/cg, wired into cgroups (per job) and cgrouphost (detect)."""
    fs = FakeCgroup2(tmp_path / "cg")
    for module in (cgroups, cgrouphost):
        monkeypatch.setattr(module, "os", _FakeOs(fs))
        monkeypatch.setattr(module, "_write", fs.write)
    return fs


def own_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Pretend the worker's own v2 cgroup is `path`."""
    real = cgrouphost._own_paths
    monkeypatch.setattr(cgrouphost, "_own_paths", lambda text: {**real(text), "": path})


def test_v2_detected_at_the_root_cgroup_delegates_memory_pids_cpu(fake: FakeCgroup2,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    own_path(monkeypatch, "/")  # the real root cgroup is exempt from the no-internal-process rule
    fake.join(fake.root, os.getpid())
    cg = cgrouphost.detect(str(fake.root))
    assert isinstance(cg, CgroupV2) and cg.version == 2
    assert Path(cg.parent) == fake.root / "sandbox"
    assert (fake.root / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    assert (fake.root / "sandbox" / "cgroup.subtree_control").read_text() == "cpu memory pids\n"


def test_v2_worker_cgroup_holding_the_worker_cannot_delegate(fake: FakeCgroup2,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the worker in a plain service cgroup (where a v2 host puts it), holding its own pid
    (fake.root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    fake.mkdir(str(fake.root / "worker.service"))
    fake.join(fake.root / "worker.service", os.getpid())
    own_path(monkeypatch, "/worker.service")
    # Then the default layout fails at start-up, naming the cause, and leaves nothing behind
    with pytest.raises(SandboxFailure, match="delegate.*Device or resource busy"):
        cgrouphost.detect(str(fake.root))
    assert not (fake.root / "worker.service" / "sandbox").exists()


def test_v2_delegated_unit_with_the_worker_in_a_leaf_works(fake: FakeCgroup2,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Given systemd's Delegate=yes layout: unit/worker holds the worker, unit itself holds nothing
    (fake.root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    unit = fake.root / "sandbox-worker.service"
    fake.mkdir(str(unit))
    fake.mkdir(str(unit / "worker"))
    fake.join(unit / "worker", os.getpid())
    own_path(monkeypatch, "/sandbox-worker.service/worker")
    cg = cgrouphost.detect(str(fake.root), v2_parent=str(unit / "sandbox"))
    assert isinstance(cg, CgroupV2)
    cg.create("job", LIMITS)
    assert (unit / "sandbox" / "job" / "cgroup.controllers").read_text() == "cpu memory pids\n"
    with pytest.raises(OSError) as e:  # the parent itself can never hold a job's process
        fake.write(str(unit / "sandbox" / "cgroup.procs"), "4242")
    assert e.value.errno == errno.EBUSY


def test_v2_controllers_bound_to_v1_fail_detection_before_creating_anything(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeCgroup2(tmp_path / "cg", controllers="hugetlb")  # this hybrid host's cgroup2 mount
    for module in (cgroups, cgrouphost):
        monkeypatch.setattr(module, "os", _FakeOs(fs))
        monkeypatch.setattr(module, "_write", fs.write)
    own_path(monkeypatch, "/")
    with pytest.raises(SandboxFailure, match="memory, pids, cpu not available"):
        cgrouphost.detect(str(fs.root))
    assert not (fs.root / "sandbox").exists()


def _v2_parent(fake: FakeCgroup2) -> CgroupV2:
    (fake.root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    fake.mkdir(str(fake.root / "sandbox"))
    (fake.root / "sandbox" / "cgroup.subtree_control").write_text("cpu memory pids\n")
    return CgroupV2(str(fake.root / "sandbox"))


def test_v2_create_writes_limits_in_the_kernel_formats(fake: FakeCgroup2) -> None:
    cg = _v2_parent(fake)
    d = fake.root / "sandbox" / "job"
    assert not d.exists()
    cg.create("job", LIMITS)
    assert (d / "memory.max").read_text() == f"{256 << 20}\n"
    assert (d / "memory.swap.max").read_text() == "0\n"
    assert (d / "pids.max").read_text() == "64\n"
    assert (d / "cpu.max").read_text() == "50000 100000\n"
    assert cg.procs_files("job") == [str(d / "cgroup.procs")]
    cg.create("job", LIMITS)  # idempotent: a retried create stage rewrites the same values
    with pytest.raises(OSError) as e:  # no nesting: a job group cannot grow sub-groups
        fake.mkdir(str(d / "nested"))
    assert e.value.errno == errno.EAGAIN


def test_v2_cpu_quota_never_goes_below_the_kernel_minimum(fake: FakeCgroup2) -> None:
    cg = _v2_parent(fake)
    cg.create("job", CgroupLimits(cpu=0.001, memory_bytes=1 << 20, pids=1))
    assert (fake.root / "sandbox" / "job" / "cpu.max").read_text() == "1000 100000\n"


def test_v2_create_refuses_a_parent_without_the_controllers(fake: FakeCgroup2) -> None:
    fake.mkdir(str(fake.root / "sandbox"))  # nothing enabled in its subtree_control
    cg = CgroupV2(str(fake.root / "sandbox"))
    with pytest.raises(SandboxFailure, match="lacks the memory, pids, cpu"):
        cg.create("job", LIMITS)
    assert not (fake.root / "sandbox" / "job").exists()  # never a group that would run unlimited


def test_v2_usage_of_a_fresh_group_and_of_a_busy_one(fake: FakeCgroup2) -> None:
    cg = _v2_parent(fake)
    cg.create("job", LIMITS)
    assert cg.usage("job") == {"cpu_seconds": 0.0, "memory_peak_bytes": 0, "pids_peak": 0,
                               "cpu_throttled_s": 0.0, "oom_kills": 0, "pids_max_hits": 0}
    d = fake.root / "sandbox" / "job"
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
                                "nice_usec 0\nnr_periods 10\nnr_throttled 4\nthrottled_usec 250000\n"
                                "nr_bursts 0\nburst_usec 0\n")
    # memory.events counts oom (limit hit) and oom_kill (a task killed) apart; only oom_kill decides
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n")
    (d / "pids.events").write_text("max 3\n")
    (d / "memory.peak").write_text("1048576\n")
    (d / "pids.peak").write_text("7\n")
    assert cg.usage("job") == {"cpu_seconds": 1.5, "memory_peak_bytes": 1048576, "pids_peak": 7,
                               "cpu_throttled_s": 0.25, "oom_kills": 1, "pids_max_hits": 3}


def test_v2_kill_empties_the_group_and_fails_if_it_stays_populated(fake: FakeCgroup2,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cg = _v2_parent(fake)
    cg.create("job", LIMITS)
    d = fake.root / "sandbox" / "job"
    fake.join(d, 4242)
    assert cg.pids("job") == [4242] and cg.populated("job")
    cg.kill("job")
    assert not cg.populated("job") and cg.pids("job") == []
    fake.join(d, 4243)
    monkeypatch.setattr(fake, "_w_cgroup_kill", lambda p, v: None)  # a group that never empties
    clock = SimpleNamespace(monotonic=iter(range(0, 1000, 5)).__next__, sleep=lambda s: None)
    monkeypatch.setattr(cgroups, "time", clock)  # the 2 s deadline passes at once
    with pytest.raises(SandboxFailure, match="still has processes"):
        cg.kill("job")
    cg.kill("absent")  # a missing group is nothing to kill


def test_v2_remove_refuses_a_populated_group_and_is_idempotent(fake: FakeCgroup2,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cg = _v2_parent(fake)
    cg.create("job", LIMITS)
    fake.join(fake.root / "sandbox" / "job", 4242)
    monkeypatch.setattr(cgroups, "time", SimpleNamespace(sleep=lambda s: None, monotonic=time.monotonic))
    with pytest.raises(OSError) as e:
        cg.remove("job")
    assert e.value.errno == errno.EBUSY and (fake.root / "sandbox" / "job").is_dir()
    cg.kill("job")
    cg.remove("job")
    cg.remove("job")
    assert not (fake.root / "sandbox" / "job").exists()


def test_v1_mounts_and_own_paths_place_jobs_under_the_worker(tmp_path: Path) -> None:
    mountinfo = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
                 "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
                 "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                 "36 31 0:33 /docker/abc /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
                 "40 31 0:37 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    mounts = cgrouphost._v1_mounts(mountinfo)
    assert mounts["cpu"] == mounts["cpuacct"] == ("/", "/sys/fs/cgroup/cpu,cpuacct")
    own = cgrouphost._own_paths("4:memory:/process_api/x\n2:cpu,cpuacct:/\n3:pids:/docker/abc\n0::/\n")
    assert own["memory"] == "/process_api/x" and own["cpuacct"] == "/" and own[""] == "/"
    assert cgrouphost._under(mounts["memory"], own["memory"]) == "/sys/fs/cgroup/memory/process_api/x/sandbox"
    assert cgrouphost._under(mounts["pids"], own["pids"]) == "/sys/fs/cgroup/pids/sandbox"


def test_v1_create_and_usage_on_a_fake_tree(tmp_path: Path) -> None:
    parents = {c: str(tmp_path / c) for c in cgroups.V1_CONTROLLERS}
    cg = CgroupV1(parents)
    mem = tmp_path / "memory" / "job"
    mem.mkdir(parents=True)
    (mem / "memory.memsw.limit_in_bytes").write_text("")
    cg.create("job", LIMITS)
    assert (mem / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(256 << 20)
    assert (tmp_path / "cpu" / "job" / "cpu.cfs_quota_us").read_text() == "50000"
    assert (tmp_path / "pids" / "job" / "pids.max").read_text() == "64"
    assert len(cg.procs_files("job")) == 5
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (mem / "memory.max_usage_in_bytes").write_text("999\n")
    (tmp_path / "cpu" / "job" / "cpu.stat").write_text("nr_periods 5\nnr_throttled 2\nthrottled_time 3000000000\n")
    (tmp_path / "cpuacct" / "job" / "cpuacct.usage").write_text("2000000000\n")
    (tmp_path / "pids" / "job" / "pids.events").write_text("max 0\n")
    (tmp_path / "pids" / "job" / "pids.peak").write_text("9\n")
    assert cg.usage("job") == {"cpu_seconds": 2.0, "memory_peak_bytes": 999, "pids_peak": 9,
                               "cpu_throttled_s": 3.0, "oom_kills": 2, "pids_max_hits": 0}


def test_detect_without_any_hierarchy_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgrouphost, "_v1_mounts", lambda text: {})
    with pytest.raises(SandboxFailure, match="no cgroup v2"):
        cgrouphost.detect(str(tmp_path))
