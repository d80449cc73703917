"""Spare workspace images: fresh clones of a disk template, made in the background, so a create
renames one into place instead of copying the template's data blocks on the job's critical path
(~0.9 ms of a ~2.9 ms create, measured; see docs/capacity.md).

A spare is only ever a clone of our own template that nothing has mounted: it is written under a
temporary name and renamed into the spares directory complete, then taken by one rename, which is
atomic (of two processes racing for one spare, one gets it and the other ENOENT) and never
replaces an existing image. An image a job used is never a spare again: destroy unlinks it as
before. Spares live in `<work_dir>/.templates/spares/` (root-only, like the templates): never in
`images/`, which holds exactly the live sandboxes' images.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
import uuid
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from sandbox.runtimes import diskimage

log = logging.getLogger("sandbox.runtime")

SPARE_DIR = "spares"  # under diskimage.TEMPLATE_DIR
MAX_AGE_S = 600.0  # a spare this old (of any size) is removed at the next refill of any size
TORN_AFTER_S = 60.0  # a temporary clone this old belongs to a process that died mid-copy
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28+


def _boot_time() -> float:
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst` (renameat2)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "this C library has no renameat2", src)
    if _renameat2(_AT_FDCWD, src.encode(), _AT_FDCWD, dst.encode(), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst) if err != errno.ENOENT else \
            FileNotFoundError(err, os.strerror(err), src)


class SpareImages:
    """Up to `count` ready clones per disk size, refilled by one background thread; thread-safe."""

    def __init__(self, work_dir: str, count: int) -> None:
        self.work_dir = work_dir
        self.count = count
        self.dir = os.path.join(work_dir, diskimage.TEMPLATE_DIR, SPARE_DIR)
        self._lock = threading.Lock()
        self._queued: set[int] = set()  # sizes with a refill queued or running
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        # set once a take finds renameat2(RENAME_NOREPLACE) missing or refused: no spare can ever be
        # taken in this process, so none is made either
        self.unsupported = False
        # from before this boot (a host crash may have torn them) or of another template version
        boot = _boot_time()
        self._drop(lambda name, mtime: mtime < boot or (name.endswith(".img")
                                                        and not name.startswith(self._version_prefix())))

    @staticmethod
    def _version_prefix() -> str:
        return f"ext4-v{diskimage.TEMPLATE_VERSION}-"

    def _prefix(self, size_bytes: int) -> str:
        # a spare is named after its template (`<template name>.<tag>.img`): pruning matches them so
        return os.path.basename(diskimage._template_path(self.work_dir, size_bytes))[:-len(".img")] + "."

    def names(self, size_bytes: int) -> list[str]:
        """The spares of `size_bytes` there are now."""
        prefix = self._prefix(size_bytes)
        try:
            return sorted(n for n in os.listdir(self.dir) if n.startswith(prefix) and n.endswith(".img"))
        except OSError:  # none yet, or no usable directory (the refill logs why)
            return []

    def take(self, image: str, size_bytes: int) -> bool:
        """Move a spare of `size_bytes` to `image` (which must not exist); False when there is none
        (the caller clones as before, then calls refill_later once its own disk work is done)."""
        for name in [] if self.unsupported else self.names(size_bytes):
            try:
                rename_noreplace(os.path.join(self.dir, name), image)
            except FileNotFoundError:
                continue  # another process took it first
            except FileExistsError:
                raise  # as clone_template's O_EXCL: a live image is never replaced
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EINVAL):  # no renameat2, or a filesystem refusing the flag
                    with self._lock:
                        first, self.unsupported = not self.unsupported, True
                    if first:
                        log.warning("no spare workspace images in this process: rename without replace "
                                    "is unsupported here (%s); cloning instead", e.strerror)
                    return False
                log.warning("could not take spare image %s; cloning instead", name, exc_info=True)
                return False
            return True
        return False

    def refill_later(self, size_bytes: int) -> None:
        """Queue a refill of `size_bytes` on the background thread (once, however many ask); never raises."""
        with self._lock:
            if size_bytes in self._queued or self.unsupported:
                return
            self._queued.add(size_bytes)
            try:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="sandbox-spares")
                self._pending.append(self._pool.submit(self._refill, size_bytes))
            except RuntimeError:  # the interpreter is shutting down: no more threads
                self._queued.discard(size_bytes)
                return
            self._pending = [f for f in self._pending if not f.done()]

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait for the queued refills (a test that removes the work dir next, a clean shutdown)."""
        with self._lock:
            pending = list(self._pending)
        futures.wait(pending, timeout=timeout_s)

    def _refill(self, size_bytes: int) -> None:
        try:
            self.refill(size_bytes)
        except Exception:  # noqa: BLE001 - an optimisation only: creates clone for themselves meanwhile
            log.warning("could not make spare workspace images of %d bytes", size_bytes, exc_info=True)
        finally:
            with self._lock:
                self._queued.discard(size_bytes)

    def refill(self, size_bytes: int) -> None:
        """Clone until `count` spares of `size_bytes` exist; drop torn, old and orphaned ones.

        Never makes a template or the work dir's directories (only the spares directory in an
        existing template directory): a work dir removed under a refill stays removed."""
        try:
            src = diskimage.open_existing_template(self.work_dir, size_bytes)
        except FileNotFoundError:
            return  # the create that makes the template asks again
        try:
            self._refill_from(src, size_bytes)
        finally:
            os.close(src)

    def _refill_from(self, src: int, size_bytes: int) -> None:
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        now = time.time()
        # A job picks any byte count as disk size: spares of sizes whose template diskimage._prune
        # dropped go too, so spares stay within MAX_TEMPLATES x count however many sizes were asked.
        # Templates are listed after the spares (in _drop): a spare is renamed in only once its
        # template exists, so a spare listed beside no template is one whose template was pruned.
        templates: set[str] = set()

        def doomed(name: str, mtime: float) -> bool:
            if name.endswith(".tmp"):
                return mtime < now - TORN_AFTER_S
            if not templates:
                templates.update(n[:-len(".img")] for n in os.listdir(os.path.dirname(self.dir))
                                 if n.endswith(".img"))
            return name.endswith(".img") and (mtime < now - MAX_AGE_S or name.split(".", 1)[0] not in templates)

        # One listing for the sweep, the cap and the count (three listings cost the background
        # thread ~8 syscalls per create, each a GIL hand-off with the stage threads): refills of
        # other processes race it anyway, and may briefly leave a few more (see the module doc).
        kept = self._drop(doomed)
        # and a hard cap on the directory, whatever the templates (refills of other processes race)
        room = self.count * diskimage.MAX_TEMPLATES - sum(n.endswith(".img") for n in kept)
        prefix = self._prefix(size_bytes)
        have = sum(n.startswith(prefix) and n.endswith(".img") for n in kept)
        for _ in range(min(room, self.count - have)):
            tag = uuid.uuid4().hex
            tmp = os.path.join(self.dir, f".{tag}.tmp")
            try:
                diskimage.clone_from(src, tmp, size_bytes)
                os.rename(tmp, os.path.join(self.dir, f"{self._prefix(size_bytes)}{tag}.img"))
            except BaseException:
                _unlink_quietly(tmp)
                raise

    def _drop(self, doomed: Callable[[str, float], bool]) -> list[str]:
        """Remove the spares `doomed(name, mtime)` picks; the names left (as listed)."""
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        kept = []
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False) and doomed(e.name, e.stat(follow_symlinks=False).st_mtime):
                    _unlink_quietly(e.path)
                    continue
            except FileNotFoundError:
                continue  # taken meanwhile
            kept.append(e.name)
        return kept


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
