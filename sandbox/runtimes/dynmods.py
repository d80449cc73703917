"""cgroup2's `favordynmods`: makes moving a process into a cgroup cheap, host-wide.

Why: every job's launcher writes its own pid into the job's cgroup.procs files. The kernel guards
migrations against fork and exit with one global percpu rwsem (cgroup_threadgroup_rwsem). In its
default fast-reader mode a writer must first wait one RCU grace period: the first join of each job
measured 5-17 ms (0.04 ms for later writes). favordynmods keeps that rwsem in its slow mode
(6.0-6.17), and from 6.18 also makes cgroup.procs writes take a per-thread-group rwsem instead of
the global one: a join costs ~0.1 ms, and every fork and exit on the host pays a little more
(shared instead of per-cpu counters, plus the per-thread-group lock). The flag lives on the cgroup2
root but the rwsem is global, so v1 hierarchies (these hybrid hosts) gain too, and it stays on after
the mount that set it is gone. From 6.18 the per-thread-group part is one-way until reboot: a
remount without the option clears the root flag (and logs "per threadgroup rwsem mechanism can't
be disabled") but joins stay cheap; kernels with the later fix keep the flag on as well.

How: mount(2) through ctypes rather than mount(8). A cgroup2 remount replaces the root's whole
option set (a remount naming only favordynmods would silently drop nsdelegate or
memory_recursiveprot) and a classic remount also resets the mount's nosuid/nodev/noexec; here we
pass exactly the options mountinfo shows plus the one we add, with no libmount version-dependent
merging (util-linux 2.39 switched remounts to the new mount API) and no process spawned.

Never fatal: without CAP_SYS_ADMIN, in a cgroup namespace of its own (the kernel then ignores root
options), or on a kernel without the feature, a warning names the setting and the cost.
"""
from __future__ import annotations

import ctypes
import logging
import os
import tempfile
from dataclasses import dataclass

log = logging.getLogger("sandbox.runtime")

OPTION = "favordynmods"
FEATURES = "/sys/kernel/cgroup/features"  # lists "favordynmods" on kernels that have it (6.0+)
SETTING = "SANDBOX_CGROUP_FAVOR_DYNMODS"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
_MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Cgroup2Mount:
    """One cgroup2 mount from mountinfo: where, its per-mount options and its root (super) options."""

    point: str
    mount_options: tuple[str, ...]
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def cgroup2_mounts(mountinfo: str | None = None) -> list[Cgroup2Mount]:
    """Every cgroup2 mount visible to this process."""
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mountinfo = f.read()
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 6 and len(tail) >= 3 and tail[0] == "cgroup2":
            out.append(Cgroup2Mount(_unescape(fields[4]), tuple(fields[5].split(",")), tuple(tail[2].split(","))))
    return out


def supported(features: str = FEATURES) -> bool:
    """Whether this kernel knows the option."""
    try:
        with open(features, encoding="ascii") as f:
            return OPTION in f.read().split()
    except OSError:
        return False


def state() -> str:
    """"on" or "off" as the kernel reports it on a visible cgroup2 mount, "unknown" without one,
    "unsupported" on a kernel without the option."""
    if not supported():
        return "unsupported"
    mounts = cgroup2_mounts()
    if not mounts:
        return "unknown"
    return "on" if OPTION in mounts[0].super_options else "off"


def _mount(source: bytes, target: str, fstype: bytes, flags: int, data: str) -> None:
    if _libc.mount(source, target.encode(), fstype, flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def remount(m: Cgroup2Mount, on: bool) -> None:
    """Remount `m` with favordynmods added (or removed, for tests), every other option kept as it is."""
    options = [o for o in m.super_options if o not in ("rw", "ro", OPTION)] + ([OPTION] if on else [])
    flags = MS_REMOUNT
    for o in m.mount_options:
        flags |= _MOUNT_FLAGS.get(o, 0)  # atime flags left out: the kernel keeps the mount's own
    _mount(b"none", m.point, b"cgroup2", flags, ",".join(options))


def _temporary_mount() -> bool:
    """Pure v1 (no cgroup2 mounted here): mount one privately with the option, read it, unmount.
    A cgroup2 mount applies its options to the one cgroup2 root; none was mounted, so none is lost.
    Side effect: from the first cgroup2 mount on, the kernel lists a "0::/..." line in every
    /proc/<pid>/cgroup (detect() and tools that read v1 lines by controller name ignore it)."""
    point = tempfile.mkdtemp(prefix="sandbox-cgroup2-")
    try:
        _mount(b"none", point, b"cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, OPTION)
        try:
            mine = [m for m in cgroup2_mounts() if m.point == point]
            return bool(mine) and OPTION in mine[0].super_options
        finally:
            _libc.umount2(point.encode(), 0)
    finally:
        os.rmdir(point)


def ensure(enabled: bool) -> str:
    """Turn favordynmods on if `enabled`; return what happened ("on", "enabled", "disabled by setting",
    "unsupported", "failed: ..."). Never raises: a failure costs speed, not correctness."""
    if not enabled:
        return "disabled by setting"
    if not supported():
        return "unsupported"
    try:
        mounts = cgroup2_mounts()
        if mounts and OPTION in mounts[0].super_options:
            return "on"  # the common case after the first worker of a boot: one file read
        if os.geteuid() != 0:
            raise PermissionError("not root")
        if mounts:
            remount(mounts[0], on=True)
            done = OPTION in cgroup2_mounts()[0].super_options
        else:
            done = _temporary_mount()
        if not done:  # remount accepted but ignored: a cgroup namespace of our own
            raise OSError("the kernel did not apply it (not in the host's cgroup namespace?)")
        log.info("turned on cgroup2 favordynmods: cheap cgroup joins for every job")
        return "enabled"
    except OSError as e:
        log.warning("%s: could not turn on cgroup2 favordynmods (%s); each job's start then waits "
                    "about one RCU grace period (5-17 ms measured) to join its cgroup. Mount cgroup2 with "
                    "-o favordynmods on the host (or boot with cgroup_favordynmods=true), or set %s=false "
                    "to silence this", SETTING, e, SETTING)
        return f"failed: {e}"
