"""Fixtures for tests of the local sandbox runtime: fresh settings and a real LocalRuntime."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from config.settings import Settings, load_settings
from sandbox.errors import SandboxFailure
from sandbox.runtimes.base import SandboxHandle
from sandbox.runtimes.local import LocalRuntime
from tests.support.services import sandbox_work_dir, unavailable


@pytest.fixture
def settings() -> Iterator[Settings]:
    """Settings with a fresh work dir the sandbox uid can traverse (pytest's tmp_path is 0700)."""
    with sandbox_work_dir("sbx-test-", "/tmp") as work:
        yield load_settings({"SANDBOX_WORK_DIR": str(work), "SANDBOX_MAX_LOG_BYTES": "64Ki",
                             "SANDBOX_MAX_OUTPUT_FILES": "5", "SANDBOX_MAX_OUTPUT_FILE_BYTES": "1Mi",
                             "SANDBOX_MAX_OUTPUT_BYTES": "2Mi"})


@pytest.fixture
def runtime(settings: Settings) -> Iterator[LocalRuntime]:
    """A LocalRuntime; fails under CI (skips elsewhere) if bwrap, root or cgroups are missing."""
    if not os.path.exists("/usr/bin/bwrap"):
        unavailable("bubblewrap is not installed")
    if os.geteuid() != 0:
        unavailable("the local runtime needs root to manage cgroups and loop mounts")
    try:
        rt = LocalRuntime(settings)
    except SandboxFailure as e:
        unavailable(str(e))
    yield rt
    for info in rt.list_sandboxes():
        rt.destroy(SandboxHandle(info.sandbox_id, info.job_id, "local", info.host, 0, 0))
    if rt.spares is not None:
        rt.spares.settle()  # before the settings fixture removes the work dir under a refill
