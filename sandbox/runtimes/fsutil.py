"""Host-side file work for the local runtime: the workspace's disk usage, small host files read
and written in few syscalls, and no-follow reads and writes beneath a workspace the job controlled.
(The sandbox's shared /etc is built in hostetc.py.)

Everything under the workspace may have been planted by hostile code: paths are walked one
component at a time with openat (dir_fd) and O_NOFOLLOW, and only regular files are touched.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from typing import IO, Any, Iterator

from sandbox.errors import JobRejected
from sandbox.runtimes.base import OutputFile

CHUNK = 64 * 1024
NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class DiskUsage:
    """One statvfs of a mounted workspace: bytes used and available, inodes available."""

    used_bytes: int
    free_bytes: int
    free_inodes: int


def disk_usage(mnt: str) -> DiskUsage:
    """Usage of the filesystem mounted at `mnt`, from a single statvfs."""
    st = os.statvfs(mnt)
    return DiskUsage((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize, st.f_favail)


# Small host-side files (meta.json, result.json, cgroup counters) are read and written with
# os.open/os.read/os.write: 3-4 syscalls where open() made 7-9 (fstat, isatty, two lseeks, a
# second fstat). Under the worker's threads pool each syscall releases the GIL, and with other
# threads waiting each release is a futex wake and a context switch (docs/capacity.md, session 6).
READ_CHUNK = 64 * 1024


def read_fd(fd: int) -> bytes:
    """Everything from `fd`'s current offset to its end (a regular file or a kernel seq file)."""
    chunks = []
    while chunk := os.read(fd, READ_CHUNK):
        # (until a read returns nothing: a kernel seq file, cgroup.procs among them, returns at
        # most a page per read, so a short read is not its end)
        chunks.append(chunk)
    return b"".join(chunks)


def read_file(path: str, flags: int = 0) -> bytes:
    """The whole of `path` (a small file: a kernel counter, our own JSON); extra open `flags`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a short write goes on from where it stopped)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_json_atomic(path: str, value: Any, durable: bool = True) -> None:
    """Write JSON via a temp file and rename, so readers never see half a file (fsync if durable)."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)  # as open(tmp, "w")
    try:
        write_all(fd, json.dumps(value).encode("utf-8"))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: str, flags: int = 0) -> Any:
    """The JSON in `path`, or None if it does not exist."""
    try:
        return json.loads(read_file(path, flags))
    except FileNotFoundError:
        return None


def touch(path: str) -> None:
    """Create `path` if missing."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def create_new(path: str) -> None:
    """Create `path`; FileExistsError if it is there already (one syscall for "exists? then touch")."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def is_mount_point(path: str) -> bool:
    """os.path.ismount in two stats: it resolves the parent with realpath, a stat of every
    component of the path. `path`'s parent must be a directory of ours (no symlink planted)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISLNK(st.st_mode):
        return False
    parent = os.stat(os.path.dirname(path))
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def remove_flat_dir(path: str) -> None:
    """Remove `path`, a directory of plain files and empty directories (a sandbox's run-dir state),
    in a syscall per entry; anything deeper goes to shutil.rmtree (fd-based on Linux: it never
    follows a symlink out of the directory). Unlink and rmdir never follow a symlink either."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    try:
        for name in names:
            entry = os.path.join(path, name)
            try:
                os.unlink(entry)
            except IsADirectoryError:
                os.rmdir(entry)  # ENOTEMPTY for a non-empty one: the fall-back below
            except FileNotFoundError:
                pass
        os.rmdir(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        shutil.rmtree(path)


def split_relpath(relpath: str, field: str = "/files") -> list[str]:
    """Components of a workspace-relative path; JobRejected for absolute, '..' or empty parts."""
    parts = relpath.split("/")
    if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in relpath:
        raise JobRejected(field, "path", f"{relpath!r} is not a plain relative path")
    return parts


def _open_dirs(root: str, parts: list[str], create_uid: int | None) -> int:
    """An fd on root/parts..., each step O_NOFOLLOW; missing dirs created (owned by create_uid)."""
    fd = os.open(root, NOFOLLOW_DIR)
    try:
        for part in parts:
            if create_uid is not None:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, create_uid, create_uid, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            nxt = os.open(part, NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_beneath(root: str, relpath: str, src: IO[bytes], mode: int, uid: int) -> int:
    """Stream `src` into root/relpath (no links followed, no special bits), chowned to `uid`."""
    parts = split_relpath(relpath)
    dir_fd = _open_dirs(root, parts[:-1], uid)
    try:
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o600, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobRejected("/files", "path", f"{relpath!r} exists and is not a regular file")
        written = 0
        while chunk := src.read(CHUNK):
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                written += n
        os.fchown(fd, uid, uid)
        os.fchmod(fd, mode & 0o777)  # never setuid, setgid or sticky
        return written
    finally:
        os.close(fd)


def open_beneath(root: str, relpath: str) -> IO[bytes]:
    """Open root/relpath for reading: every step O_NOFOLLOW, and only if it is a regular file."""
    parts = split_relpath(relpath, "/collect")
    dir_fd = _open_dirs(root, parts[:-1], None)
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{relpath} is not a regular file")
    return os.fdopen(fd, "rb")


# What collect remembers of the entries it leaves out: a job chooses how many and how long, so both
# are bounded here (worker memory, the agent's answer) before collecting bounds what the record shows.
MAX_SKIPPED = 1000
SKIPPED_PATH_CHARS = 2048  # 4 x what the record shows (collecting.SHOWN_PATH_CHARS): enough to tell a cut


class CollectedFiles:
    """Iterates the regular files under the collected dirs, within caps; `.skipped` says what was not,
    `.not_listed` how many more were left out than `.skipped` lists.

    The walk looks at no more than `2 * max_files + MAX_SKIPPED` entries (files, directories, links)
    in all: past them there is nothing it could collect or list, and a job that made 655k of them
    cost the worker 330 MiB and 10 s a walk. Where it stops, the first entry of `.skipped` says so.
    """

    MAX_DEPTH = 32

    def __init__(self, root: str, dirs: tuple[str, ...], max_files: int, max_file_bytes: int,
                 max_total_bytes: int) -> None:
        self.root = root
        self.dirs = dirs
        self.max_files, self.max_file_bytes, self.max_total_bytes = max_files, max_file_bytes, max_total_bytes
        self.skipped: list[dict[str, Any]] = []  # {"path", "reason"} for each entry left out
        self.not_listed = 0
        self.total_bytes = 0
        # (directories count too: 655k empty ones would cost as much; 2 x files leaves one per file)
        self.max_entries = 2 * max_files + MAX_SKIPPED
        self.entries = 0  # looked at so far
        self.stopped = False
        self._it = self._walk_all()

    def __iter__(self) -> "CollectedFiles":
        return self

    def __next__(self) -> OutputFile:
        return next(self._it)

    def close(self) -> None:
        """Close every directory handle the walk holds (they keep the workspace mount busy)."""
        self._it.close()

    def _skip(self, relpath: str, reason: str) -> None:
        if len(self.skipped) < MAX_SKIPPED:  # a job must not grow the worker's memory through this list
            self.skipped.append({"path": relpath[:SKIPPED_PATH_CHARS], "reason": reason})
        else:
            self.not_listed += 1

    def _stop(self, relpath: str) -> None:
        """Record, once and first (past any cap: it says the listing is partial), where the walk stopped."""
        if not self.stopped:
            self.stopped = True
            self.skipped.insert(0, {"path": relpath[:SKIPPED_PATH_CHARS],
                                    "reason": f"walk stopped: more than {self.max_entries} entries"})

    def _walk_all(self) -> Iterator[OutputFile]:
        count = 0
        for top in self.dirs:
            if self.stopped:
                break
            try:
                fd = _open_dirs(self.root, split_relpath(top, "/collect"), None)
            except FileNotFoundError:
                continue
            except OSError as e:
                # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR (last part) or ELOOP
                bad = e.errno in (errno.ELOOP, errno.ENOTDIR)
                self._skip(top, "symlink or not a directory" if bad else f"unreadable: {e.strerror}")
                continue
            for item in self._walk(fd, top, 0):
                if count >= self.max_files:
                    self._skip(item.relpath, "max_output_files")
                    continue
                if item.size > self.max_file_bytes:
                    self._skip(item.relpath, "max_output_file_bytes")
                    continue
                if self.total_bytes + item.size > self.max_total_bytes:
                    self._skip(item.relpath, "max_output_bytes")
                    continue
                count += 1
                self.total_bytes += item.size
                yield item

    def _names(self, dir_fd: int) -> tuple[list[str], bool]:
        """Up to the walk's remaining entries of the directory, sorted, and whether it holds more.
        Streamed: a directory of 655k names is never read (or sorted) whole."""
        room = self.max_entries - self.entries
        with os.scandir(dir_fd) as it:  # (on a duplicate of dir_fd, closed here: no handle kept across yields)
            names = [entry.name for entry in itertools.islice(it, room + 1)]
        return sorted(names[:room]), len(names) > room

    def _walk(self, dir_fd: int, prefix: str, depth: int) -> Iterator[OutputFile]:
        try:
            names, more = self._names(dir_fd)
            for name in names:
                if self.entries >= self.max_entries:  # (a subdirectory took the rest)
                    more = True
                    break
                self.entries += 1
                rel = f"{prefix}/{name}"
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
                except OSError as e:
                    self._skip(rel, "symlink" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}")
                    continue
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode) and depth < self.MAX_DEPTH:
                    yield from self._walk(fd, rel, depth + 1)  # _walk closes fd
                    continue
                os.close(fd)
                if stat.S_ISREG(st.st_mode):
                    yield OutputFile(rel, st.st_size, lambda r=rel: open_beneath(self.root, r))
                else:
                    self._skip(rel, "not a regular file" if not stat.S_ISDIR(st.st_mode) else "too deep")
            if more:
                self._stop(prefix)
        finally:
            os.close(dir_fd)
