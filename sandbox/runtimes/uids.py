"""One host uid per live sandbox, from the operator's range SANDBOX_UID .. + SANDBOX_UID_COUNT - 1.

Why: per-uid kernel counters (inotify instances and watches, pending signals, RLIMIT_NPROC,
user-namespace counts) are shared by every process of a uid, so with one uid for all sandboxes a
job could take all 128 inotify instances and starve every concurrent job.

A uid is held by the entry <run_dir>/.uids/<uid> (root's directory, 0700): a symlink whose target
is the holder's sandbox id. symlink(2) fails with EEXIST like O_CREAT|O_EXCL, so two sandboxes
never get the same uid, and the target says who holds it at no extra write, so a release only ever
removes its own entry and a sandbox that crashed before its meta.json can still find its uid.
The run dir is a tmpfs (rundir.py): a reboot, which ends every sandbox, frees every uid with it.
"""
from __future__ import annotations

import os
import stat
import zlib

from sandbox.errors import RuntimeUnavailable, SandboxFailure

UID_DIR = ".uids"


class UidPool:
    """Allocates and releases the host uids of sandboxes; state lives only in the entry directory."""

    def __init__(self, run_dir: str, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.dir = os.path.join(run_dir, UID_DIR)
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise SandboxFailure(f"{self.dir} must be a directory owned by root with mode 0700")

    def _entry(self, uid: int) -> str:
        return os.path.join(self.dir, str(uid))

    def holder(self, uid: int) -> str | None:
        """The sandbox id holding `uid`, or None if it is free."""
        try:
            return os.readlink(self._entry(uid))
        except FileNotFoundError:
            return None

    def allocate(self, sandbox_id: str) -> int:
        """A uid nobody else holds, probing forward from a hash of the id; RuntimeUnavailable if none."""
        start = zlib.crc32(sandbox_id.encode())  # stable across processes (hash() is salted)
        for i in range(self.count):
            uid = self.first + (start + i) % self.count
            try:
                os.symlink(sandbox_id, self._entry(uid))
                return uid
            except FileExistsError:
                if self.holder(uid) == sandbox_id:  # ours already (a create that crashed before meta.json)
                    return uid
        raise RuntimeUnavailable(f"no free sandbox uid: all {self.count} of SANDBOX_UID_COUNT are in use")

    def release(self, sandbox_id: str, uid: int | None) -> None:
        """Free the uid `sandbox_id` holds (found by a scan when `uid` is unknown); another's is left alone."""
        if uid is not None:
            candidates = [uid]
        else:
            candidates = [int(e.name) for e in os.scandir(self.dir) if e.name.isdigit()]
        for u in candidates:
            if self.holder(u) == sandbox_id:
                try:
                    os.unlink(self._entry(u))
                except FileNotFoundError:
                    pass
