"""sandbox.parallel.run_all: collect's concurrent uploads on a shared helper pool."""
from __future__ import annotations

import threading
import time

import pytest

from sandbox import parallel


def test_results_in_order_whatever_finishes_first() -> None:
    calls = [lambda i=i: (time.sleep(0.02 * (5 - i)), i)[1] for i in range(6)]
    assert parallel.run_all(calls, 4) == list(range(6))


def test_at_most_max_parallel_at_once_and_some_overlap() -> None:
    running, peak, lock = [0], [0], threading.Lock()

    def call() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    parallel.run_all([call] * 12, 3)
    assert peak[0] == 3


def test_first_failure_in_order_raises_after_every_call_ended() -> None:
    ended = []

    def ok(i: int) -> int:
        time.sleep(0.03)
        ended.append(i)
        return i

    def bad(message: str) -> None:
        raise ValueError(message)

    calls = [lambda: ok(0), lambda: bad("first"), lambda: ok(2), lambda: bad("second"), lambda: ok(4)]
    with pytest.raises(ValueError, match="first"):
        parallel.run_all(calls, 2)
    assert sorted(ended) == [0, 2, 4]  # nothing still running behind the caller's back


def test_a_saturated_pool_never_blocks_the_caller() -> None:
    # Every helper thread busy (other jobs' uploads): the caller runs all its calls itself.
    release = threading.Event()
    pool = parallel._pool()
    busy = [pool.submit(release.wait, 10) for _ in range(parallel.HELPER_THREADS)]
    try:
        assert parallel.run_all([lambda i=i: i for i in range(5)], 4) == [0, 1, 2, 3, 4]
        assert not any(f.done() for f in busy)  # it never waited for a blocked helper (no clock)
    finally:
        release.set()
        for f in busy:
            f.result()


def test_no_thread_started_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # a thread per call cost a third of a trivial job's collect: the pool's threads are reused
    parallel.run_all([lambda: time.sleep(0.02)] * 20, parallel.HELPER_THREADS + 1)  # pool at full size
    started = []
    original = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), original(self))[1])
    for _ in range(20):
        parallel.run_all([lambda: time.sleep(0.001)] * 4, 4)
    assert started == []


def test_empty_and_single() -> None:
    assert parallel.run_all([], 4) == []
    assert parallel.run_all([lambda: "x"], 4) == ["x"]


def test_a_pool_that_refuses_work_leaves_it_to_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    class ShutDown:
        def submit(self, *_: object) -> None:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(parallel, "_pool", ShutDown)
    assert parallel.run_all([lambda i=i: i * 2 for i in range(4)], 4) == [0, 2, 4, 6]
