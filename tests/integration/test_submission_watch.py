"""SubmissionWatch against a real Redis: one record read per check, and a queue scan only after a restart.

A restart is played by answering INFO with another run_id (the real restart, with the data gone,
is tests/faults/test_producers.py, and the one here between a submit and its wait); the queue is a
private one nobody consumes.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from sandbox.nodes import SubmissionWatch, redis_run_id
from tests.conftest import new_job_id, running_redis
from tests.support.services import RedisServer


class Spy:
    """The client, counting each command; INFO answers `run_id` once it is set (a restarted Redis)."""

    def __init__(self, client: Any) -> None:
        self.client, self.calls, self.run_id = client, Counter(), None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == "info" and self.run_id:
                return {"run_id": self.run_id}
            return method(*args, **kwargs)
        return call


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queued(redis_client) -> Iterator[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    """(job id, task id, queue) of a submit message waiting in a queue of its own, behind 50 others."""
    job_id, task_id, queue = new_job_id("watch"), new_job_id("task"), new_job_id("q")
    redis_client.rpush(queue, *[json.dumps({"headers": {"id": f"other-{n}"}}) for n in range(50)])
    redis_client.lpush(queue, json.dumps({"headers": {"id": task_id}}))
    yield job_id, task_id, queue
    redis_client.delete(queue, f"sandbox:job:{job_id}")


def watch_of(redis_client, queued) -> tuple[SubmissionWatch, Spy, Clock]:  # type: ignore[no-untyped-def]
    spy, clock = Spy(redis_client), Clock()
    job_id, task_id, queue = queued
    return SubmissionWatch(spy, job_id, task_id, queue, clock=clock), spy, clock  # type: ignore[arg-type]


def test_no_restart_no_scan_and_one_record_read_per_check(redis_client, queued) -> None:  # type: ignore[no-untyped-def]
    watch, spy, _ = watch_of(redis_client, queued)
    for _ in range(10):
        assert watch.check() is None
    assert spy.calls["get"] == 10 and spy.calls["lrange"] == spy.calls["hvals"] == 0


def test_after_a_restart_the_queue_is_scanned_once_then_with_backoff(redis_client, queued) -> None:  # type: ignore[no-untyped-def]
    # Given a job whose message survived a restart, when the submitter checks on every tick, then
    # the queue is read once at the restart and then only as the backoff allows, never per tick.
    watch, spy, clock = watch_of(redis_client, queued)
    spy.run_id = "restarted"
    scans = []
    for _ in range(4):  # four seconds of 4 checks a second
        for _ in range(4):
            assert watch.check() is None
            clock.now += 0.25
        scans.append(spy.calls["lrange"])
    assert scans == [1, 2, 2, 3], scans  # at once, after 1 s, then 2 s later
    assert spy.calls["get"] == 16  # the record, once per check
    clock.now += 3600
    for _ in range(20):
        watch.check()
    assert spy.calls["lrange"] == 4  # however long it waits, at most one scan per RESCAN_MAX_S
    spy.run_id = "restarted-again"
    watch.check()
    assert spy.calls["lrange"] == 5  # a second restart is a reason of its own


def test_the_backoff_doubles_up_to_its_cap_and_stays_there(redis_client, queued) -> None:  # type: ignore[no-untyped-def]
    # Ten minutes of a check a second after a restart: the gaps between scans double, then hold at
    # RESCAN_MAX_S (a cap that is never reached, or never held, fails here).
    watch, spy, clock = watch_of(redis_client, queued)
    spy.run_id = "restarted"
    at, seen = [], 0
    for _ in range(600):
        watch.check()
        if spy.calls["lrange"] > seen:
            seen = spy.calls["lrange"]
            at.append(clock.now)
        clock.now += 1.0
    gaps = [round(b - a) for a, b in zip(at, at[1:])]
    cap = round(SubmissionWatch.RESCAN_MAX_S)
    assert gaps[:3] == [1, 2, 4], gaps
    assert max(gaps) == cap and gaps[-3:] == [cap] * 3, gaps


def test_a_message_lost_in_a_restart_is_reported_once_a_second_scan_confirms(redis_client, queued) -> None:  # type: ignore[no-untyped-def]
    watch, spy, clock = watch_of(redis_client, queued)
    job_id, _, queue = queued
    redis_client.delete(queue)  # the restart lost it
    spy.run_id = "restarted"
    assert watch.check() is None  # one miss: kombu may be moving it between the queue and unacked
    assert watch.check() is None and spy.calls["lrange"] == 1
    clock.now += SubmissionWatch.RESCAN_FIRST_S
    state = watch.check()
    assert state is not None and state[0] == "vanished" and "submit it again" in state[1]


def test_a_miss_that_the_next_scan_contradicts_is_no_loss(redis_client, queued) -> None:  # type: ignore[no-untyped-def]
    watch, spy, clock = watch_of(redis_client, queued)
    job_id, task_id, queue = queued
    raw = redis_client.lpop(queue)  # popped by a worker, not yet in unacked
    spy.run_id = "restarted"
    assert watch.check() is None
    redis_client.hset("unacked", f"tag-{task_id}", raw)  # ... and there now
    try:
        clock.now += SubmissionWatch.RESCAN_FIRST_S
        assert watch.check() is None
        redis_client.set(f"sandbox:job:{job_id}", json.dumps({"status": "succeeded"}))
        assert watch.check() == ("ended", {"status": "succeeded"})
    finally:
        redis_client.hdel("unacked", f"tag-{task_id}")


def test_a_record_that_disappears_is_reported_at_once(redis_client, queued) -> None:  # type: ignore[no-untyped-def]
    watch, spy, _ = watch_of(redis_client, queued)
    job_id = queued[0]
    redis_client.set(f"sandbox:job:{job_id}", json.dumps({"status": "running"}))
    assert watch.check() is None
    redis_client.delete(f"sandbox:job:{job_id}")
    state = watch.check()
    assert state is not None and state[0] == "vanished" and "disappeared" in state[1]
    assert spy.calls["lrange"] == 0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: it is restarted with its data gone."""
    yield from running_redis(tmp_path)


def test_a_restart_between_the_submit_and_a_later_wait_that_lost_the_job_is_reported(own_redis) -> None:  # type: ignore[no-untyped-def]
    # Given a job submitted as the CLI submits it: the run of Redis read first, then the message sent
    client = redis.Redis.from_url(own_redis.url)
    job_id, task_id, queue = new_job_id("watch"), new_job_id("task"), new_job_id("q")
    submitted_on = redis_run_id(client)
    client.lpush(queue, json.dumps({"headers": {"id": task_id}}))
    # When Redis restarts without its data before anyone waits
    own_redis.stop()
    shutil.rmtree(own_redis.base_dir / "appendonlydir", ignore_errors=True)
    own_redis.start()
    assert client.llen(queue) == 0 and redis_run_id(client) not in (None, submitted_on)
    # Then a wait that begins now, from the submit's run, says the job is lost (a second scan confirms)
    clock = Clock()
    watch = SubmissionWatch(client, job_id, task_id, queue, clock=clock, run_id=submitted_on)
    assert watch.check() is None
    clock.now += SubmissionWatch.RESCAN_FIRST_S
    state = watch.check()
    assert state is not None and state[0] == "vanished" and "submit it again" in state[1], state
    # (without the submit's run the wait starts from the new run and sees no restart: it waits on)
    blind = SubmissionWatch(client, job_id, task_id, queue, clock=clock)
    for _ in range(5):
        clock.now += SubmissionWatch.RESCAN_MAX_S
        assert blind.check() is None
