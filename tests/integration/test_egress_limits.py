"""The egress proxy's limits with real sandboxes: rate, byte cap, connection caps, a job that never reads."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from tests.support.egress import Box, entries, upstream  # noqa: F401 (fixture)
from tests.support.netns import Upstream

MB = 1_000_000


@pytest.fixture(scope="module")
def box(upstream: Upstream) -> Iterator[Box]:
    b = Box(upstream, SANDBOX_EGRESS_MAX_BYTES="3Mi", SANDBOX_EGRESS_MAX_CONNECTIONS="60",
            SANDBOX_EGRESS_MAX_CONCURRENT="10", SANDBOX_EGRESS_LOG_ENTRIES="50", SANDBOX_MAX_BANDWIDTH="10Gbps")
    yield b
    b.close()


@pytest.fixture(scope="module")
def wide(upstream: Upstream) -> Iterator[Box]:
    b = Box(upstream, SANDBOX_EGRESS_MAX_BYTES="1Gi", SANDBOX_MAX_BANDWIDTH="10Gbps")
    yield b
    b.close()


def test_a_20_mb_download_runs_at_the_jobs_bandwidth_within_15_percent(wide: Box) -> None:
    rate_bps = 40_000_000
    got, result, _ = wide.probe("download", "http://files.test/bytes/20000000",
                                hosts=["files.test"], ports=[80], resources={"bandwidth": "40Mbps"})
    assert got == {"results": [20_000_000]}
    (entry,) = entries(result)
    assert entry["bytes_down"] >= 20 * MB
    measured = (entry["bytes_up"] + entry["bytes_down"]) * 8 / entry["duration_s"]
    print(f"egress rate: {measured / 1e6:.2f} Mbps measured for {rate_bps / 1e6:.0f} Mbps configured")
    assert 0.85 * rate_bps <= measured <= 1.15 * rate_bps, measured


def test_the_byte_cap_ends_connections_with_a_reason_not_the_job(box: Box) -> None:
    got, result, _ = box.probe("download", "http://files.test/bytes/5000000", "2",
                               hosts=["files.test"], ports=[80], resources={"bandwidth": "1Gbps"})
    first, second = got["results"]
    assert isinstance(first, int) and first < 5_000_000  # cut short at the cap
    assert isinstance(second, str) and "403" in second
    assert result.outcome == "succeeded"  # the job itself ran on and ended as it chose
    reasons = [e["reason"] for e in sorted(entries(result), key=lambda e: e["at"])]
    assert reasons == ["bandwidth_exceeded", "bandwidth_exceeded"]
    assert result.network["totals"]["bytes_down"] + result.network["totals"]["bytes_up"] <= 3 * 2**20


def test_a_hundred_connections_from_one_job_hit_the_caps_and_the_worker_carries_on(box: Box) -> None:
    got, result, _ = box.probe("many", "100", "20", hosts=["api.test"])
    # Past the cap one connection hears why; then the listener is closed and the kernel refuses
    # the rest inside the job's namespace, at no cost to the worker and with nothing logged.
    assert got == {"200 None": 10, "403 too_many_connections": 10, "403 host_not_allowed": 40,
                   "403 connection_limit": 1, "refused None": 39}, got
    net = result.network
    assert net["totals"]["connections"] == 61
    assert len(net["connections"]) == 50 and net["connections_dropped"] == 11  # the log is capped
    # the same worker (this process) serves the next job normally
    result, sink = box.run(box.job("curl -sS https://api.test/hello", hosts=["api.test"]))
    assert bytes(sink.out["stdout"]) == b"hello api.test\n"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_job_that_never_reads_its_socket_does_not_grow_the_worker(wide: Box) -> None:
    spec = wide.job("python3 probe.py never_read files.test 200000000 3", hosts=["files.test"], ports=[80],
                    resources={"bandwidth": "10Gbps"})
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result, sink = wide.run(spec)
    finally:
        done.set()
        watcher.join()
    print(f"never-reading job: worker RSS +{(peak[0] - before) / MB:.1f} MB, proxy read {entries(result)[0]['bytes_down'] / MB:.1f} MB")
    assert sink.result() == {"held": True}
    (entry,) = entries(result)
    assert entry["bytes_down"] < 16 * MB  # back-pressure: only socket buffers' worth was read
    assert peak[0] - before < 16 * MB, (before, peak[0])
