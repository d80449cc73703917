"""Past its log cap a job's output is counted and dropped in the kernel, never copied into the worker.

Reading and discarding cost the worker a full core against a job writing with vmsplice (session-7
review); the pump now splices what is over the cap into /dev/null."""
from __future__ import annotations

import os

import pytest

from tests.integration.test_local_runtime import make_spec

FLOOD = 64 * 1024 * 1024


@pytest.fixture
def read_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes os.read returns in this process (the pump's only way to copy a pipe into Python)."""
    total = [0]
    real = os.read

    def counting(fd: int, n: int) -> bytes:
        data = real(fd, n)
        total[0] += len(data)
        return data

    monkeypatch.setattr(os, "read", counting)
    return total


def test_output_past_the_cap_is_counted_but_never_read(runtime, settings, read_bytes) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/bin/sh", "-c", f"head -c {FLOOD} /dev/zero; echo done >&2"], timeout_s=60)
    handle = runtime.create(spec, "h")
    seen = {"stdout": 0, "stderr": 0}
    result = runtime.execute(handle, spec, lambda s, c: seen.__setitem__(s, seen[s] + len(c)))
    assert result.outcome == "succeeded"
    assert result.stdout_truncated and result.stdout_bytes == FLOOD  # every byte counted
    assert seen["stdout"] < settings.max_log_bytes + 200 and runtime.logs(handle)["stderr"].read() == b"done\n"
    assert read_bytes[0] < settings.max_log_bytes + 4 * 1024 * 1024, read_bytes  # not 64 MiB through Python
    runtime.destroy(handle)


def test_a_job_that_never_stops_writing_still_times_out(runtime, settings) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(["/usr/bin/yes"], timeout_s=2)
    handle = runtime.create(spec, "h")
    result = runtime.execute(handle, spec, lambda s, c: None)
    assert result.outcome == "timed_out" and result.stdout_truncated
    assert result.stdout_bytes > settings.max_log_bytes
    runtime.destroy(handle)
