"""Per-job cgroups behind one small interface, for cgroup v1 (these hosts) and v2 (most users').

A job's group is named after its sandbox id and lives under a "sandbox" parent inside the
worker's own cgroup, so jobs stay within whatever the operator gave the worker. Finding that
hierarchy at start-up (detect) is cgrouphost.py's.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from sandbox.errors import SandboxFailure
from sandbox.runtimes import fsutil

CPU_PERIOD_US = 100_000
PARENT = "sandbox"
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class CgroupLimits:
    """Limits to apply: cpu in cores, memory in bytes (swap off), pids as a count."""

    cpu: float
    memory_bytes: int
    pids: int


class Cgroups(Protocol):
    """What the runtime needs from a cgroup hierarchy, keyed by the job's group name."""

    version: int

    def create(self, name: str, limits: CgroupLimits) -> None:
        """Make the group (idempotent) and apply the limits."""

    def procs_files(self, name: str) -> list[str]:
        """Every cgroup.procs a new process must write its pid to, to join the group."""

    def pids(self, name: str) -> list[int]:
        """The pids currently in the group."""

    def kill(self, name: str) -> None:
        """SIGKILL every process in the group, including ones forking while we kill."""

    def usage(self, name: str) -> dict[str, float | int | None]:
        """cpu_seconds, memory_peak_bytes, pids_peak, cpu_throttled_s, oom_kills, pids_max_hits."""

    def remove(self, name: str) -> None:
        """Remove the group; a missing group is fine."""


# os.open/os.read/os.write rather than open(): a cgroup file in 3-4 syscalls instead of 7-9, each
# a point where the worker's other threads take the GIL (fsutil.read_file says more).
def _read(path: str) -> str:
    return fsutil.read_file(path).decode("ascii")


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)  # as open(path, "w")
    try:
        fsutil.write_all(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _mkdir(path: str) -> None:
    """os.makedirs(path, exist_ok=True) without its stat of the parent, which exists (made at cgrouphost.detect)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError:  # the parent was removed under us: make it again
        os.makedirs(path, exist_ok=True)


def _keyed(text: str) -> dict[str, int]:
    """Parse 'key value' lines (memory.events, cpu.stat, pids.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).strip())
    except (OSError, ValueError):
        return None


def _pids_in(procs_file: str) -> list[int]:
    try:
        return [int(p) for p in _read(procs_file).split()]
    except FileNotFoundError:
        return []


def _populated(group_dir: str) -> bool:
    """cgroup v2's own answer: a process in the group or any group below it."""
    return _keyed(_read(os.path.join(group_dir, "cgroup.events"))).get("populated", 0) == 1


def _rmdir(path: str) -> None:
    for _ in range(500):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.001)  # the kernel frees the group a moment after its last task exits
    os.rmdir(path)


class CgroupV1:
    """cgroup v1: one directory per controller hierarchy (memory, pids, cpu, cpuacct, freezer)."""

    version = 1

    def __init__(self, parents: dict[str, str]) -> None:
        self.parents = parents  # controller -> the "sandbox" parent directory in its hierarchy
        self._swap_accounted: bool | None = None  # memory.memsw.* exists (a boot-time setting)

    def _dir(self, controller: str, name: str) -> str:
        return os.path.join(self.parents[controller], name)

    def _dirs(self, name: str) -> list[str]:
        return sorted({self._dir(c, name) for c in V1_CONTROLLERS})

    def create(self, name: str, limits: CgroupLimits) -> None:
        """Make the group in every hierarchy and apply the limits."""
        for d in self._dirs(name):
            _mkdir(d)
        mem = self._dir("memory", name)
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_bytes))
        memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
        if self._swap_accounted is None:
            self._swap_accounted = os.path.exists(memsw)
        if self._swap_accounted:  # swap accounting on: memory+swap == memory means no swap
            _write(memsw, str(limits.memory_bytes))
        try:
            _write(os.path.join(mem, "memory.swappiness"), "0")
        except OSError:
            pass  # not settable in every nesting; memsw above is the real guarantee
        _write(os.path.join(self._dir("pids", name), "pids.max"), str(limits.pids))
        cpu = self._dir("cpu", name)
        _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(max(1000, int(limits.cpu * CPU_PERIOD_US))))

    def procs_files(self, name: str) -> list[str]:
        """cgroup.procs of the group in every hierarchy."""
        return [os.path.join(d, "cgroup.procs") for d in self._dirs(name)]

    def pids(self, name: str) -> list[int]:
        """Pids in the freezer hierarchy (every job process joins all hierarchies)."""
        return _pids_in(os.path.join(self._dir("freezer", name), "cgroup.procs"))

    def kill(self, name: str) -> None:
        """Freeze, SIGKILL everything listed, thaw; repeat until empty (a frozen group cannot fork)."""
        state = os.path.join(self._dir("freezer", name), "freezer.state")
        for _ in range(100):  # (a missing group lists no pid: nothing to do)
            if not self.pids(name):
                return
            _write(state, "FROZEN")
            for _ in range(200):
                if _read(state).strip() == "FROZEN":
                    break
                time.sleep(0.002)
            for pid in self.pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _write(state, "THAWED")  # SIGKILL is delivered only once the tasks run again
            deadline = time.monotonic() + 1.0
            while self.pids(name) and time.monotonic() < deadline:
                time.sleep(0.002)
        if self.pids(name):
            raise SandboxFailure(f"cgroup {name} still has processes after kill")

    def usage(self, name: str) -> dict[str, float | int | None]:
        """Accounting read from the group's own counters."""
        mem, cpu = self._dir("memory", name), self._dir("cpu", name)
        usage_ns = _read_int(os.path.join(self._dir("cpuacct", name), "cpuacct.usage"))
        cpu_stat = _keyed(_read(os.path.join(cpu, "cpu.stat")))
        oom = _keyed(_read(os.path.join(mem, "memory.oom_control")))
        pids_events = _keyed(_read(os.path.join(self._dir("pids", name), "pids.events")))
        return {
            "cpu_seconds": (usage_ns or 0) / 1e9,
            "memory_peak_bytes": _read_int(os.path.join(mem, "memory.max_usage_in_bytes")),
            "pids_peak": _read_int(os.path.join(self._dir("pids", name), "pids.peak")),
            "cpu_throttled_s": cpu_stat.get("throttled_time", 0) / 1e9,
            "oom_kills": oom.get("oom_kill", 0),
            "pids_max_hits": pids_events.get("max", 0),
        }

    def remove(self, name: str) -> None:
        """rmdir the group in every hierarchy."""
        for d in self._dirs(name):
            _rmdir(d)

    def idle_groups(self, prefix: str) -> dict[str, float]:
        """Groups named `prefix`... with no process listed in any hierarchy (v1 has no `populated`
        flag; a group only some hierarchies hold still counts): name -> when made."""
        return _idle_under(sorted(set(self.parents.values())), prefix,
                           lambda d: bool(_pids_in(os.path.join(d, "cgroup.procs"))))


class CgroupV2:
    """cgroup v2: one unified directory per group; `parent` must have the controllers delegated."""

    version = 2

    def __init__(self, parent: str) -> None:
        self.parent = parent

    def _dir(self, name: str) -> str:
        return os.path.join(self.parent, name)

    def create(self, name: str, limits: CgroupLimits) -> None:
        """Make the group, forbid nesting in it, and write memory.max, memory.swap.max, pids.max, cpu.max."""
        d = self._dir(name)
        os.makedirs(d, exist_ok=True)
        missing = [c for c in V2_CONTROLLERS if c not in _read(os.path.join(d, "cgroup.controllers")).split()]
        if missing:
            # Without them the limit files do not exist (EACCES on write): never run a job unlimited.
            try:
                os.rmdir(d)
            except OSError:
                pass  # a populated group from an earlier create; kill/remove deal with it
            raise SandboxFailure(f"cgroup {d} lacks the {', '.join(missing)} controller(s): "
                                 f"{self.parent} does not delegate them, so limits cannot be enforced")
        # No sub-groups under a job: kill, populated and rmdir then cover one directory.
        _write(os.path.join(d, "cgroup.max.descendants"), "0")
        _write(os.path.join(d, "memory.max"), str(limits.memory_bytes))
        swap = os.path.join(d, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")
        _write(os.path.join(d, "pids.max"), str(limits.pids))
        quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
        _write(os.path.join(d, "cpu.max"), f"{quota} {CPU_PERIOD_US}")

    def procs_files(self, name: str) -> list[str]:
        """The group's single cgroup.procs."""
        return [os.path.join(self._dir(name), "cgroup.procs")]

    def pids(self, name: str) -> list[int]:
        """Pids listed in cgroup.procs."""
        return _pids_in(os.path.join(self._dir(name), "cgroup.procs"))

    def populated(self, name: str) -> bool:
        """The kernel's own answer (cgroup.events), which also counts processes in sub-groups."""
        try:
            return _populated(self._dir(name))
        except FileNotFoundError:
            return False

    def kill(self, name: str) -> None:
        """cgroup.kill (kernel 5.14+) kills the whole subtree atomically, forks included."""
        d = self._dir(name)
        if not os.path.isdir(d):
            return
        try:
            _write(os.path.join(d, "cgroup.kill"), "1")
        except FileNotFoundError:
            return  # removed meanwhile by another cleanup path
        # A killed task leaves the group in do_exit, so an unreaped zombie child does not keep it
        # populated (checked on a real v2 hierarchy): waiting here cannot deadlock on our own wait().
        deadline = time.monotonic() + 2.0
        while self.populated(name) and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.populated(name):
            raise SandboxFailure(f"cgroup {name} still has processes after cgroup.kill")

    def usage(self, name: str) -> dict[str, float | int | None]:
        """Accounting from cpu.stat, memory.peak, pids.peak, memory.events and pids.events."""
        d = self._dir(name)
        cpu_stat = _keyed(_read(os.path.join(d, "cpu.stat")))
        events = _keyed(_read(os.path.join(d, "memory.events")))
        pids_events = _keyed(_read(os.path.join(d, "pids.events")))
        return {
            "cpu_seconds": cpu_stat.get("usage_usec", 0) / 1e6,
            "memory_peak_bytes": _read_int(os.path.join(d, "memory.peak")),
            "pids_peak": _read_int(os.path.join(d, "pids.peak")),
            "cpu_throttled_s": cpu_stat.get("throttled_usec", 0) / 1e6,
            "oom_kills": events.get("oom_kill", 0),
            "pids_max_hits": pids_events.get("max", 0),
        }

    def remove(self, name: str) -> None:
        """rmdir the group."""
        _rmdir(self._dir(name))

    def idle_groups(self, prefix: str) -> dict[str, float]:
        """Groups named `prefix`... the kernel says are not populated (cgroup.events: one small read,
        and it counts processes in sub-groups, which cgroup.procs does not list): name -> when made."""
        return _idle_under([self.parent], prefix, _populated)


def idle_groups(groups: Cgroups, prefix: str) -> dict[str, float]:
    """Groups named `prefix`... under the parent(s) with no process: name -> when made (mtime).

    When made is the directory's mtime: the kernel sets it at mkdir, and neither a process joining
    nor a limit written changes it (checked on v1). {} for a hierarchy that cannot tell."""
    idle = getattr(groups, "idle_groups", None)
    return idle(prefix) if idle is not None else {}


def _idle_under(parents: list[str], prefix: str, busy: Callable[[str], bool]) -> dict[str, float]:
    """Groups named `prefix`... in any of `parents` that `busy(dir)` is False for in every one of them."""
    made: dict[str, float] = {}
    busy_names: set[str] = set()
    for parent in parents:
        try:
            names = [n for n in os.listdir(parent) if n.startswith(prefix)]
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(parent, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    continue
                if busy(path):
                    busy_names.add(name)
            except (FileNotFoundError, ValueError):
                continue  # removed meanwhile
            made[name] = max(made.get(name, 0.0), st.st_mtime)
    return {name: at for name, at in made.items() if name not in busy_names}
