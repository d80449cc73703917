"""The shared /etc every local sandbox binds read-only: a few synthetic files (passwd, group,
hosts, nsswitch.conf, an empty resolv.conf) plus copies of the host files in HOST_ETC, built once
per fingerprint of those host files and re-checked at most every ETC_RECHECK_S.

Separate from fsutil.py: this is the one piece of host-side file work that copies from the host
rather than reading or writing beneath a job's workspace, with state of its own (the per-process
cache of the last check) and its own versioning and expiry of the copies under <work_dir>/.etc/.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time

from sandbox.runtimes.fsutil import CHUNK, NOFOLLOW_DIR

# Host files the base image needs, bound read-only on top of the synthetic /etc.
# Never /etc/shadow, /etc/ssl/private, or anything under /root, /home, /var, /run or /tmp.
HOST_ETC = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/mime.types",
    "/etc/ssl/certs", "/etc/ssl/openssl.cnf", "/etc/ca-certificates.conf", "/etc/alternatives",
    "/etc/protocols", "/etc/services",
)

ETC_DIR = ".etc"  # under the work dir: one shared, read-only /etc per (uid, host files) fingerprint
ETC_VERSION = 2  # bump when the synthetic files below change (2: EMPTY_WGETRC)
ETC_KEEP_S = 2 * 86400.0  # older /etc copies are removed: longer than any sandbox lives
# The host files are fingerprinted (two stats each, 20 syscalls) at most this often per process
# and (work dir, uid): a create within this long of the last check reuses its answer.
ETC_RECHECK_S = 1.0
_etc_seen: dict[tuple[str, int], tuple[float, str]] = {}  # (work dir, uid) -> (checked at, copy)
# An empty wgetrc for WGETRC and SYSTEM_WGETRC (bwrap.FIXED_ENV): wget 1.21 exits 1 unless WGETRC
# names a regular file (/dev/null is refused), and a WGETRC equal to its built-in /etc/wgetrc
# prints a warning on every run, hence its own name. Read-only to jobs like all of this /etc.
EMPTY_WGETRC = "empty.wgetrc"


def _etc_files(uid: int) -> dict[str, str]:
    return {
        "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}:sandbox:/workspace:/bin/sh\n",
        "group": f"root:x:0:\nsandbox:x:{uid}:\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
        "resolv.conf": "",
        EMPTY_WGETRC: "",
    }


def _fingerprint(uid: int) -> str:
    """Changes whenever a HOST_ETC entry is replaced or edited (package updates rename into place)."""
    h = hashlib.sha256(f"{ETC_VERSION}:{uid}".encode())
    for path in HOST_ETC:
        for follow in (False, True):
            try:
                st = os.stat(path, follow_symlinks=follow)
                h.update(f"{path}:{st.st_mode}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns};".encode())
            except OSError:
                h.update(f"{path}:-;".encode())
    return h.hexdigest()[:20]


def _copy_tree(src_fd: int, dst: str, depth: int = 0) -> None:
    """Copy a host /etc directory: regular files, directories and symlinks (as links) only."""
    os.mkdir(dst, 0o755)
    for entry in os.scandir(src_fd):
        target = os.path.join(dst, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.name, dir_fd=src_fd), target)
        elif entry.is_dir(follow_symlinks=False) and depth < 8:
            fd = os.open(entry.name, NOFOLLOW_DIR, dir_fd=src_fd)
            try:
                _copy_tree(fd, target, depth + 1)
            finally:
                os.close(fd)
        elif entry.is_file(follow_symlinks=False):
            _copy_file(os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd), target)


def _copy_file(src: int, dst: str) -> None:
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(out, 0o644)  # whatever the worker's umask: the sandbox uid must read it
            while chunk := os.read(src, CHUNK):
                os.write(out, chunk)
            os.fsync(out)  # built once and kept across reboots: never a torn copy after a crash
        finally:
            os.close(out)
    finally:
        os.close(src)


def _build_etc(etc: str, uid: int) -> None:
    """The synthetic files plus a copy of each HOST_ETC entry (top level followed, like a bind)."""
    os.mkdir(etc, 0o755)
    for name, text in _etc_files(uid).items():
        with open(os.path.join(etc, name), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
    for path in HOST_ETC:
        target = os.path.join(etc, os.path.relpath(path, "/etc"))
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if os.path.isdir(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _copy_tree(fd, target)
            finally:
                os.close(fd)
        elif os.path.isfile(path):
            _copy_file(os.open(path, os.O_RDONLY | os.O_CLOEXEC), target)
    for dirpath, _, _ in os.walk(etc):
        os.chmod(dirpath, 0o755)


def shared_etc(work_dir: str, uid: int) -> str:
    """The read-only /etc every sandbox of `uid` binds: built once per fingerprint, atomically.

    Why shared: writing a fresh /etc per sandbox and bind-mounting ten host files into it cost
    about 4 ms of create and 2 ms of every bwrap start. The copy is taken again once a host file
    it mirrors is replaced (noticed within ETC_RECHECK_S), so it does not go stale.
    """
    key = (work_dir, uid)
    seen = _etc_seen.get(key)
    checked_at = time.monotonic()
    if seen is not None and checked_at - seen[0] < ETC_RECHECK_S and os.path.isdir(seen[1]):
        return seen[1]
    base = os.path.join(work_dir, ETC_DIR)
    etc = os.path.join(base, _fingerprint(uid))
    if os.path.isdir(etc):
        _etc_seen[key] = (checked_at, etc)
        return etc
    os.makedirs(base, 0o711, exist_ok=True)
    tmp = f"{etc}.tmp{os.getpid()}.{threading.get_ident()}"  # threads pool: sandboxes are created in parallel
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build_etc(tmp, uid)
        os.rename(tmp, etc)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (e.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.isdir(etc)):
            raise  # (else another process finished the same copy first)
    now = time.time()
    for entry in os.scandir(base):
        try:
            stale = entry.path != etc and entry.stat(follow_symlinks=False).st_mtime < now - ETC_KEEP_S
        except FileNotFoundError:
            continue  # another thread's build, renamed into place since the listing
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
    _etc_seen[key] = (checked_at, etc)
    return etc
