"""Test-side helpers over devstack's processes: a missing program fails under CI=true, skips elsewhere."""
from __future__ import annotations

import os

import pytest

from devstack.processes import (  # noqa: F401  (the tests' names for them)
    ROOT, RedisServer, ServiceUnavailable, Worker, find_binary, free_port, stop_process,
)


def unavailable(message: str) -> None:
    """Fail the test under CI=true (the service must be there), skip it elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require(binary: str) -> str:
    """Path of `binary`, or fail/skip the test as `unavailable` does."""
    try:
        return find_binary(binary)
    except ServiceUnavailable as e:
        unavailable(str(e))
        raise
