"""Spare workspace images (runtimes/spares.py): a create renames a ready clone of the template into
place; a spare is only ever a fresh clone nothing mounted, taken once, and never an image a job used."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
from typing import Callable, Iterator

import pytest

from config.settings import load_settings
from sandbox.runtimes import diskimage, spares
from sandbox.runtimes.local import LocalRuntime
from tests.support.services import unavailable
from tests.integration.test_local_runtime import MiB, sh
from tests.support.services import remove_work_dir

DISK = 16 * MiB


@pytest.fixture
def spare_runtime(settings) -> Iterator[LocalRuntime]:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/bwrap"):
        unavailable("the local runtime needs root and bubblewrap")
    rt = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": settings.work_dir, "SANDBOX_SPARE_IMAGES": "2"}))
    yield rt
    rt.spares.settle()  # wait for the refill before the work dir goes; no assert here, it would hide a test's own failure
    for info in rt.list_sandboxes():
        rt.destroy(rt_handle(info))


def rt_handle(info):  # type: ignore[no-untyped-def]
    from sandbox.runtimes.base import SandboxHandle
    return SandboxHandle(info.sandbox_id, info.job_id, "local", info.host, 0, 0)


def _settle(rt: LocalRuntime, size: int = DISK, want: int = 2, timeout_s: float = 10.0) -> list[str]:
    """Wait for the background refill to leave `want` spares of `size`."""
    deadline = time.monotonic() + timeout_s
    while len(rt.spares.names(size)) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rt.spares.names(size)) == want, os.listdir(rt.spares.dir)
    return rt.spares.names(size)


def _inode(path: str) -> int:
    return os.stat(path, follow_symlinks=False).st_ino


def _template(work: str) -> str:
    """Make the template of DISK (a create would have); its path."""
    os.close(diskimage._open_template(work, DISK))
    return diskimage._template_path(work, DISK)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_create_takes_a_spare_then_refills(spare_runtime) -> None:  # type: ignore[no-untyped-def]
    rt = spare_runtime
    # Given no spare yet: the first create clones for itself, then the refill makes two
    r1, _, _, h1 = sh(rt, "echo one", disk=DISK)
    assert r1.outcome == "succeeded"
    ready = {_inode(os.path.join(rt.spares.dir, n)) for n in _settle(rt)}
    # When the next job of that size is created
    r2, out2, _, h2 = sh(rt, "ls -A /workspace; echo two", disk=DISK)
    # Then its image is one of the spares (moved, not copied), its disk works, and the refill tops up
    assert r2.outcome == "succeeded" and out2 == b"two\n", out2
    assert _inode(rt._image(h2.sandbox_id)) in ready
    assert len(set(_settle(rt))) == 2
    images = sorted(os.listdir(rt.image_dir))  # images/ holds exactly the live sandboxes' images
    assert images == sorted([f"{h1.sandbox_id}.img", f"{h2.sandbox_id}.img"])
    st = os.stat(rt.spares.dir)
    assert st.st_uid == 0 and st.st_mode & 0o077 == 0
    rt.destroy(h1)
    rt.destroy(h2)
    assert os.listdir(rt.image_dir) == []


def test_a_used_image_never_becomes_a_spare(spare_runtime) -> None:  # type: ignore[no-untyped-def]
    rt = spare_runtime
    sh(rt, "true", disk=DISK)  # the template of that size exists, and the first refill
    _settle(rt)
    for _ in range(3):
        r, _, _, h = sh(rt, "head -c 200000 /dev/urandom > big; echo x > /tmp/left; sync", disk=DISK)
        assert r.outcome == "succeeded"
        rt.destroy(h)
        names = _settle(rt)
    template = diskimage._template_path(rt.work_dir, DISK)
    for name in names:  # every spare is byte for byte the template: nothing a job wrote
        assert _digest(os.path.join(rt.spares.dir, name)) == _digest(template)


def test_torn_stale_and_foreign_spares_are_never_taken(settings) -> None:  # type: ignore[no-untyped-def]
    work = settings.work_dir
    _template(work)
    pool = spares.SpareImages(work, 2)
    os.makedirs(pool.dir, 0o700)
    prefix = pool._prefix(DISK)
    torn = os.path.join(pool.dir, ".dead.tmp")  # a process died while cloning
    old_version = os.path.join(pool.dir, f"ext4-v{diskimage.TEMPLATE_VERSION - 1}-{DISK}.a.img")
    before_boot = os.path.join(pool.dir, f"{prefix}b.img")  # maybe torn by a host crash
    for path in (torn, old_version, before_boot):
        with open(path, "wb") as f:
            f.write(b"not an ext4 image")
    os.utime(before_boot, (1, 1))
    long_ago = time.time() - spares.TORN_AFTER_S - 1
    os.utime(torn, (long_ago, long_ago))
    # When a runtime starts: the other version's and the pre-boot spares go at once
    pool = spares.SpareImages(work, 2)
    assert sorted(os.listdir(pool.dir)) == [".dead.tmp"]
    # A temporary clone carrying a spare's prefix (half written, or renamed to .tmp) beside no
    # whole spare: a take must not mistake it for one
    half = os.path.join(pool.dir, f"{prefix}c.img.tmp")
    with open(half, "wb") as f:
        f.write(b"half a clone")
    image = os.path.join(work, "x.img")
    assert pool.take(image, DISK) is False and not os.path.exists(image)
    os.unlink(half)
    # and a refill drops the torn clone and makes whole ones
    pool.refill(DISK)
    assert len(pool.names(DISK)) == 2 and ".dead.tmp" not in os.listdir(pool.dir)
    assert all(_digest(os.path.join(pool.dir, n)) == _digest(diskimage._template_path(work, DISK))
               for n in pool.names(DISK))


def test_take_never_replaces_an_existing_image(settings) -> None:  # type: ignore[no-untyped-def]
    _template(settings.work_dir)
    pool = spares.SpareImages(settings.work_dir, 1)
    pool.refill(DISK)
    [name] = pool.names(DISK)
    image = os.path.join(settings.work_dir, "taken.img")
    with open(image, "wb") as f:
        f.write(b"a live sandbox's image")
    with pytest.raises(FileExistsError):
        pool.take(image, DISK)
    with open(image, "rb") as f:
        assert f.read() == b"a live sandbox's image"
    assert pool.names(DISK) == [name]  # the spare stays for the next create


def _no_noreplace(err: int) -> Callable[[str, str], None]:
    def rename(src: str, dst: str) -> None:  # a filesystem refusing RENAME_NOREPLACE
        raise OSError(err, os.strerror(err), src)
    return rename


@pytest.mark.parametrize("err", ["no renameat2", errno.EINVAL])
def test_without_renameat2_create_clones_as_before(settings, monkeypatch, caplog, err) -> None:  # type: ignore[no-untyped-def]
    _template(settings.work_dir)
    pool = spares.SpareImages(settings.work_dir, 1)
    pool.refill(DISK)
    if err == "no renameat2":
        monkeypatch.setattr(spares, "_renameat2", None)  # an old C library: ENOSYS
    else:
        monkeypatch.setattr(spares, "rename_noreplace", _no_noreplace(err))
    with caplog.at_level(logging.WARNING, logger="sandbox.runtime"):
        for n in range(3):
            image = os.path.join(settings.work_dir, f"{n}.img")
            assert pool.take(image, DISK) is False and not os.path.exists(image)
    # Then one warning for the process, no traceback, and no more spares made that nobody can take
    assert len(caplog.records) == 1 and "cloning instead" in caplog.text and caplog.records[0].exc_info is None
    assert pool.unsupported and len(pool.names(DISK)) == 1
    os.close(diskimage._open_template(settings.work_dir, DISK + MiB))  # a size with a template, no spare
    pool.refill_later(DISK + MiB)
    pool.settle()
    assert pool.names(DISK + MiB) == [] and not pool._pending


def test_spares_of_a_pruned_template_go_at_the_next_refill(settings) -> None:  # type: ignore[no-untyped-def]
    # Given spares of two sizes (a job may ask any byte count), and the template of one pruned
    # (diskimage keeps MAX_TEMPLATES sizes): without this, every size ever asked kept its spares
    work = settings.work_dir
    _template(work)
    other = DISK + MiB
    os.close(diskimage._open_template(work, other))
    pool = spares.SpareImages(work, 2)
    pool.refill(DISK)
    pool.refill(other)
    assert len(pool.names(other)) == 2
    os.unlink(diskimage._template_path(work, other))
    # When a refill of any size runs
    pool.refill(DISK)
    # Then the orphaned spares are gone, the others stay
    assert pool.names(other) == [] and len(pool.names(DISK)) == 2
    assert sorted(os.listdir(pool.dir)) == pool.names(DISK)


def test_racing_takes_get_distinct_spares(settings) -> None:  # type: ignore[no-untyped-def]
    pool = spares.SpareImages(settings.work_dir, 2)
    other = spares.SpareImages(settings.work_dir, 2)  # another worker process on the same work dir
    _template(settings.work_dir)
    pool.refill(DISK)
    a, b, c = (os.path.join(settings.work_dir, f"{n}.img") for n in "abc")
    assert pool.take(a, DISK) and other.take(b, DISK)
    assert not pool.take(c, DISK)  # none left: the caller clones
    assert _inode(a) != _inode(b)


def test_a_refill_never_makes_a_template_or_a_removed_work_dir(settings) -> None:  # type: ignore[no-untyped-def]
    work = settings.work_dir
    pool = spares.SpareImages(work, 2)
    pool.refill(DISK)  # no template of that size yet: nothing to clone, nothing made
    assert not os.path.exists(os.path.join(work, diskimage.TEMPLATE_DIR))
    _template(work)
    shutil.rmtree(work)  # the work dir goes (a test's teardown, an operator) under a queued refill
    pool.refill(DISK)
    assert not os.path.exists(work)
    os.mkdir(work)  # for the settings fixture's own removal


def test_a_failing_refill_leaves_creates_working(settings, caplog) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/bwrap"):
        unavailable("the local runtime needs root and bubblewrap")
    rt = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": settings.work_dir, "SANDBOX_SPARE_IMAGES": "2"}))
    os.makedirs(os.path.dirname(rt.spares.dir), 0o700, exist_ok=True)
    with open(rt.spares.dir, "wb"):  # a file where the spares directory should be: every refill fails
        pass
    with caplog.at_level(logging.WARNING, logger="sandbox.runtime"):
        for _ in range(2):
            r, out, _, h = sh(rt, "echo ok", disk=DISK)
            assert r.outcome == "succeeded" and out == b"ok\n"
            rt.destroy(h)
        deadline = time.monotonic() + 10
        while "could not make spare" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "could not make spare workspace images" in caplog.text
    assert os.listdir(rt.image_dir) == []


def test_zero_spares_is_off(runtime) -> None:  # type: ignore[no-untyped-def]
    off = LocalRuntime(load_settings({"SANDBOX_WORK_DIR": runtime.work_dir, "SANDBOX_SPARE_IMAGES": "0"}))
    assert off.spares is None
    r, _, _, h = sh(off, "true", disk=DISK)
    assert r.outcome == "succeeded"
    off.destroy(h)
    assert not os.path.exists(os.path.join(runtime.work_dir, diskimage.TEMPLATE_DIR, spares.SPARE_DIR))


def test_spares_are_capped_at_max_templates_times_count(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Given two templates but room for one size's spares (templates are pruned only when one is made)
    work = settings.work_dir
    _template(work)
    os.close(diskimage._open_template(work, DISK + MiB))
    monkeypatch.setattr(diskimage, "MAX_TEMPLATES", 1)
    pool = spares.SpareImages(work, 2)
    pool.refill(DISK)
    # When the other size refills: the directory is full, so no more spares
    pool.refill(DISK + MiB)
    assert len(pool.names(DISK)) == 2 and pool.names(DISK + MiB) == []
