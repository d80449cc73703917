"""cgroup file logic against a fake cgroupfs: v2 (not available on these v1 hosts) and v1 parsing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.errors import SandboxFailure
from sandbox.runtimes import cgroups
from sandbox.runtimes.cgroups import CgroupLimits, CgroupV1, CgroupV2

LIMITS = CgroupLimits(cpu=0.5, memory_bytes=256 << 20, pids=64)


def fake_v2(root: Path) -> Path:
    """A unified hierarchy as the kernel lays it out, minus the magic."""
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_is_detected_and_controllers_are_delegated(tmp_path: Path) -> None:
    cg = cgroups.detect(str(fake_v2(tmp_path)))
    assert isinstance(cg, CgroupV2) and cg.version == 2
    own = cgroups._own_paths(open("/proc/self/cgroup").read()).get("", "/")
    parent = Path(cg.parent)
    assert parent == tmp_path / own.lstrip("/") / "sandbox"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_v2_create_writes_limits_with_swap_off(tmp_path: Path) -> None:
    cg = CgroupV2(str(tmp_path))
    os.makedirs(tmp_path / "job")
    (tmp_path / "job" / "memory.swap.max").write_text("max\n")
    cg.create("job", LIMITS)
    d = tmp_path / "job"
    assert (d / "memory.max").read_text() == str(256 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert cg.procs_files("job") == [str(d / "cgroup.procs")]


def test_v2_usage_reads_oom_kill_from_memory_events(tmp_path: Path) -> None:
    cg = CgroupV2(str(tmp_path))
    d = tmp_path / "job"
    d.mkdir()
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
                                "nr_periods 10\nnr_throttled 4\nthrottled_usec 250000\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    (d / "pids.events").write_text("max 3\n")
    (d / "memory.peak").write_text("1048576\n")
    (d / "pids.peak").write_text("7\n")
    assert cg.usage("job") == {"cpu_seconds": 1.5, "memory_peak_bytes": 1048576, "pids_peak": 7,
                               "cpu_throttled_s": 0.25, "oom_kills": 1, "pids_max_hits": 3}


def test_v2_kill_writes_cgroup_kill_and_fails_if_processes_remain(tmp_path: Path) -> None:
    cg = CgroupV2(str(tmp_path))
    d = tmp_path / "job"
    d.mkdir()
    (d / "cgroup.procs").write_text("")
    cg.kill("job")
    assert (d / "cgroup.kill").read_text() == "1"
    (d / "cgroup.procs").write_text("4242\n")  # a fake group never empties: the kill must not claim success
    with pytest.raises(SandboxFailure):
        cg.kill("job")
    cg.kill("absent")  # a missing group is nothing to kill


def test_v2_remove_is_idempotent(tmp_path: Path) -> None:
    cg = CgroupV2(str(tmp_path))
    (tmp_path / "job").mkdir()
    cg.remove("job")
    cg.remove("job")
    assert not (tmp_path / "job").exists()


def test_v2_delegation_failure_names_the_cause(tmp_path: Path) -> None:
    fake_v2(tmp_path)
    own = cgroups._own_paths(open("/proc/self/cgroup").read()).get("", "/").lstrip("/")
    blocker = tmp_path / own / "sandbox" / "cgroup.subtree_control"
    blocker.mkdir(parents=True)  # writing to it fails like EBUSY on a cgroup holding processes
    with pytest.raises(SandboxFailure, match="delegate"):
        cgroups.detect(str(tmp_path))


def test_v1_mounts_and_own_paths_place_jobs_under_the_worker(tmp_path: Path) -> None:
    mountinfo = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
                 "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
                 "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                 "36 31 0:33 /docker/abc /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
                 "40 31 0:37 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    mounts = cgroups._v1_mounts(mountinfo)
    assert mounts["cpu"] == mounts["cpuacct"] == ("/", "/sys/fs/cgroup/cpu,cpuacct")
    own = cgroups._own_paths("4:memory:/process_api/x\n2:cpu,cpuacct:/\n3:pids:/docker/abc\n0::/\n")
    assert own["memory"] == "/process_api/x" and own["cpuacct"] == "/" and own[""] == "/"
    assert cgroups._under(mounts["memory"], own["memory"]) == "/sys/fs/cgroup/memory/process_api/x/sandbox"
    assert cgroups._under(mounts["pids"], own["pids"]) == "/sys/fs/cgroup/pids/sandbox"


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
    monkeypatch.setattr(cgroups, "_v1_mounts", lambda text: {})
    with pytest.raises(SandboxFailure, match="no cgroup v2"):
        cgroups.detect(str(tmp_path))
