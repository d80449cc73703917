"""Test-side helpers over devstack's processes: a missing program fails under CI=true, skips elsewhere."""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from devstack.processes import (  # noqa: F401  (the tests' names for them)
    ROOT, RedisServer, ServiceUnavailable, Worker, find_binary, free_port, stop_process,
)


def unavailable(message: str) -> None:
    """Fail the test under CI=true (the service must be there), skip it elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str, why: str) -> Any:
    """The module `name`, imported; a missing one fails under CI=true (it is in requirements-dev.txt)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{why} need {name} (requirements-dev.txt)")
        raise


def require(binary: str) -> str:
    """Path of `binary`, or fail/skip the test as `unavailable` does."""
    try:
        return find_binary(binary)
    except ServiceUnavailable as e:
        unavailable(str(e))
        raise


@contextmanager
def sandbox_work_dir(prefix: str, parent: str = "/var/tmp") -> Iterator[Path]:
    """A fresh work dir the unprivileged sandbox uid can traverse (pytest's tmp dirs are 0700),
    removed afterwards as `remove_work_dir` does."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o711)
    try:
        yield path
    finally:
        remove_work_dir(str(path))


def remove_work_dir(work: str) -> None:
    """Unmount whatever a failed test left mounted beneath `work` (deepest first), then delete it.

    shutil.rmtree alone would empty a still-mounted disk image and leave its loop device attached;
    a few such leaks exhaust a host's loop devices and fail every later run.
    """
    from sandbox.runtimes import diskimage

    _remove_job_cgroups(work)
    prefix = os.path.realpath(work) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        targets = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        diskimage.unmount(target)
    shutil.rmtree(work, ignore_errors=True)


def _remove_job_cgroups(work: str) -> None:
    """Kill and remove the cgroup of every sandbox still in `work` (a failed test, a worker stopped
    mid-job). Deleting the directory alone left the group behind, where only the orphan sweep's
    hour-long grace finds it (the `sbx-hold-*` groups of test_admission's holders came from here).
    bench/floor.py's `floor-*` groups too: no sweep of the product ever looks for them."""
    from sandbox.errors import SandboxFailure
    from sandbox.runtimes import cgrouphost

    names = []
    for top, dirs, _ in os.walk(work):  # the work dir itself, or one level down (bench/capacity.py's base/work)
        names += [d for d in dirs if d.startswith(("sbx-", "floor-"))]
        dirs[:] = [d for d in dirs if not d.startswith(("sbx-", "floor-", ".")) and top == work]
    try:
        groups = cgrouphost.detect() if names else None
    except (OSError, SandboxFailure):
        return  # no cgroups here (not root): nothing of ours to remove
    for name in names:
        try:
            groups.kill(name)
            groups.remove(name)
        except (OSError, SandboxFailure):
            pass  # busy or gone: the orphan sweep takes it later
