"""The run dir: where LocalRuntime keeps each sandbox's volatile state, on a tmpfs of its own.

Why: per job the runtime made about ten inodes (sandbox dir, meta.json and its temp name, markers,
logs, results, the mount point, the uid claim) and deleted them at teardown. On ext4 without a
journal every inode allocation scans the recently freed inodes (`recently_deleted()`), which
measured ~7 ms of CPU per job; and meta.json was fsynced, one disk flush per job. None of that
state can outlive the sandbox: the mount, the cgroup and the processes all die with a reboot, so
it belongs in memory, as containerd and runc keep theirs in /run. Only the disk image, whose size
admission checks against the work dir's real free space, stays on the work dir
(<work_dir>/images/<sandbox id>.img).

Where: SANDBOX_RUN_DIR, default <work_dir>/run. At start-up the runtime mounts a tmpfs there
(mode 0711: bwrap runs as the sandbox uid and must walk down to mnt/; nosuid,nodev,noexec: nothing
in it is ever run) unless it already is a mount point: a restarted worker finds the live sandboxes'
state in the existing one and must never hide it. Without CAP_SYS_ADMIN it warns and uses the plain
directory (correct, only slower). The size cap is the most the node's sandboxes can write there:
SANDBOX_NODE_MAX_SANDBOXES x (four capped log streams, setup's and execute's, of
SANDBOX_MAX_LOG_BYTES + a little for meta.json, results and markers). tmpfs takes memory only for
what is written, charged to the worker's cgroup (the worker writes the logs).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os

log = logging.getLogger("sandbox.runtime")

SETTING = "SANDBOX_RUN_DIR"
LOG_STREAMS_PER_SANDBOX = 4  # stdout and stderr of setup and of execute, each capped
PER_SANDBOX_SLACK_BYTES = 256 << 10  # meta.json, results, markers, truncation notes; tmpfs rounds to pages
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
_libc = ctypes.CDLL(None, use_errno=True)


def default_path(work_dir: str) -> str:
    return os.path.join(work_dir, "run")


def size_bytes(max_sandboxes: int, max_log_bytes: int) -> int:
    """The tmpfs cap: every admitted sandbox with all its logs full, plus 1 MiB for the uid claims."""
    return max_sandboxes * (LOG_STREAMS_PER_SANDBOX * max_log_bytes + PER_SANDBOX_SLACK_BYTES) + (1 << 20)


def _fstype(mount_point: str) -> str | None:
    """The file system type of the topmost mount at `mount_point`, None if none is there."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4].encode().decode("unicode_escape") == mount_point:
                found = right.split()[0]  # later lines are mounted on top of earlier ones
    return found


def ensure(run_dir: str, lock_dir: str, cap_bytes: int) -> bool:
    """Make `run_dir` a tmpfs unless it is a mount point already; True if it is in memory now
    (a tmpfs or ramfs: nothing in it survives a reboot, so nothing there needs an fsync).

    Under an flock in `lock_dir` (the work dir), so two workers starting together never stack two
    tmpfs mounts (the second would hide the first's sandboxes).
    """
    os.makedirs(run_dir, mode=0o711, exist_ok=True)
    lock_fd = os.open(os.path.join(lock_dir, ".run.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if os.path.ismount(run_dir):  # ours from an earlier start (live sandboxes' state) or the operator's
            return _fstype(os.path.realpath(run_dir)) in ("tmpfs", "ramfs")
        data = f"mode=0711,uid=0,gid=0,size={cap_bytes}".encode()
        if _libc.mount(b"tmpfs", run_dir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, data) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EPERM, errno.EACCES, errno.ENODEV):
                raise OSError(err, f"mount of a tmpfs at {run_dir} failed: {os.strerror(err)}", run_dir)
            log.warning("%s: could not mount a tmpfs at %s (%s): sandbox state stays on its file system, "
                        "which costs CPU per job on ext4 (see sandbox/runtimes/rundir.py)",
                        SETTING, run_dir, os.strerror(err))
            return False
        return True
    finally:
        os.close(lock_fd)
