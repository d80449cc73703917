"""Every limit from spec.resources, enforced by the cgroup or the disk image, and reported truthfully."""
from __future__ import annotations

import subprocess

from tests.integration.test_local_runtime import MiB, run, sh

ALLOC = "import sys\nblocks = []\nfor _ in range(int(sys.argv[1])):\n    blocks.append(bytearray(1 << 20))\nprint('survived')\n"


def events(result) -> set[str]:  # type: ignore[no-untyped-def]
    return {e["type"] for e in result.security_events}


def test_memory_over_the_limit_ends_oom_killed(runtime) -> None:  # type: ignore[no-untyped-def]
    result, out, _, _ = run(runtime, ["/usr/bin/python3", "-c", ALLOC, "400"], memory=64 * MiB)
    assert result.outcome == "oom_killed" and b"survived" not in out
    assert "oom" in events(result) and result.signal == 9 and result.exit_code is None
    assert result.resources_used["memory_peak_bytes"] <= 64 * MiB


def test_memory_under_the_limit_is_accounted(runtime) -> None:  # type: ignore[no-untyped-def]
    result, out, _, _ = run(runtime, ["/usr/bin/python3", "-c", ALLOC, "80"], memory=256 * MiB)
    assert result.outcome == "succeeded" and out == b"survived\n"
    assert result.resources_used["memory_peak_bytes"] >= 80 * MiB
    assert result.resources_used["cpu_seconds"] > 0 and result.resources_used["pids_peak"] >= 1


def test_fork_bomb_is_contained_and_the_next_job_runs(runtime) -> None:  # type: ignore[no-untyped-def]
    result, _, _, _ = sh(runtime, "bomb() { bomb | bomb & }; bomb; sleep 2", pids=16, timeout_s=4)
    assert "pids_limit" in events(result)
    assert result.resources_used["pids_peak"] <= 16
    assert subprocess.run(["/bin/true"]).returncode == 0  # the worker can still fork
    assert sh(runtime, "echo fine")[0].outcome == "succeeded"


def test_disk_limit_gives_enospc_not_oom(runtime) -> None:  # type: ignore[no-untyped-def]
    result, out, err, _ = sh(runtime, "dd if=/dev/zero of=/workspace/fill bs=1M count=40 2>&1; echo rc=$?; "
                             "dd if=/dev/zero of=/tmp/fill bs=1M count=1 2>&1 | tail -1",
                             disk=16 * MiB, memory=256 * MiB)
    assert result.outcome == "succeeded", err
    assert b"No space left on device" in out and b"rc=1" in out
    assert "disk_full" in events(result) and "oom" not in events(result)
    assert 12 * MiB <= result.resources_used["bytes_written"] <= 16 * MiB


def test_timeout_kills_the_whole_tree_including_a_setsid_daemon(runtime) -> None:  # type: ignore[no-untyped-def]
    marker = "sleep 876.543"
    result, out, _, handle = sh(runtime, f"setsid sh -c '{marker}' </dev/null >/dev/null 2>&1 & echo up; sleep 60",
                                timeout_s=1)
    assert result.outcome == "timed_out" and out == b"up\n" and "timeout" in events(result)
    assert result.duration_s < 30
    assert runtime.cgroups.pids(handle.sandbox_id) == []
    assert marker not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_cpu_quota_of_half_a_core_is_throttled(runtime) -> None:  # type: ignore[no-untyped-def]
    busy = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n    pass\n"
    result, _, _, _ = run(runtime, ["/usr/bin/python3", "-c", busy], cpu=0.5)
    used = result.resources_used
    assert result.outcome == "succeeded"
    # a ratio of the run's own wall clock, not a timing threshold: 0.5 cores can't exceed ~half of it
    assert used["cpu_seconds"] <= 0.7 * result.duration_s, used
    assert used["cpu_throttled_s"] > 0, used
