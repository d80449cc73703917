"""Test-side view of devstack's SeaweedFS server: a missing weed binary fails under CI=true."""
from __future__ import annotations

import contextlib
from pathlib import Path

from devstack.seaweed import SeaweedServer, SeaweedUnavailable, find_weed, seaweed_server  # noqa: F401
from tests.support.services import unavailable


def seaweed_or_skip(base_dir: Path, bucket: str = "chronos-synapse") -> contextlib.AbstractContextManager[SeaweedServer]:
    """seaweed_server(), but a missing weed binary skips the test, except under CI=true where it fails."""
    try:
        find_weed()
    except SeaweedUnavailable as e:
        unavailable(str(e))
    return seaweed_server(base_dir, bucket=bucket)
