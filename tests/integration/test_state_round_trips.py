"""The record scripts that save round trips: a change and its status event in one step, a change
started from a remembered (possibly stale) value, the execution claim beside the transition, the
first event and a waiting cancel found by create, and the batched audit trail."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.events import EventBus, events_key
from sandbox.observability import audit
from sandbox.state import ACTIVE_SET, JobStatus, JobStore, claim_key, new_record, record_key
from tests.conftest import new_job_id, wait_for


@pytest.fixture
def bus(redis_client) -> EventBus:
    return EventBus(redis_client, ttl_s=600)


def _store(redis_client, bus: EventBus) -> JobStore:
    """One per simulated process: each keeps its own remembered records."""
    return JobStore(redis_client, bus, ttl_s=600)


def _events(bus: EventBus, job_id: str) -> list[dict]:
    return [json.loads(fields[b"event"]) for _id, fields in bus.redis.xrange(events_key(job_id))]


def _statuses(bus: EventBus, job_id: str) -> list[str]:
    return [e["status"] for e in _events(bus, job_id) if e["type"] == "status"]


def test_a_stale_remembered_record_loses_no_change_and_appends_its_event_once(redis_client, bus):
    # Given: process A remembers the record, then process B changes it (A's copy is now stale)
    a, b = _store(redis_client, bus), _store(redis_client, bus)
    job_id = new_job_id("stale")
    assert a.create_job(new_record(job_id, JobStatus.QUEUED), {"id": job_id}) == "created"
    b.update(job_id, lambda r: r["security_events"].append({"by": "b"}))
    # When: A moves the job on, starting from its stale copy
    record = a.transition(job_id, JobStatus.CREATING)
    # Then: B's change is kept, and the status event is in the stream once, after queued
    stored = a.get(job_id)
    assert stored == record and stored["security_events"] == [{"by": "b"}] and stored["status"] == "creating"
    assert _statuses(bus, job_id) == ["queued", "creating"]
    assert [e["seq"] for e in _events(bus, job_id)] == [1, 2]


def test_a_write_that_lost_the_race_appends_no_event(redis_client, bus):
    # Given: a job already cancelled by another process, while this one remembers it queued
    a, b = _store(redis_client, bus), _store(redis_client, bus)
    job_id = new_job_id("lost")
    a.create_job(new_record(job_id, JobStatus.QUEUED))
    b.transition(job_id, JobStatus.CANCELLED)
    updated_at = b.get(job_id)["updated_at"]
    # When: this process's stage starts from its stale copy
    record = a.transition(job_id, JobStatus.CREATING)
    # Then: the job stays cancelled, nothing was written, and no "creating" event was appended
    assert record["status"] == "cancelled" and a.get(job_id)["updated_at"] == updated_at
    assert _statuses(bus, job_id) == ["queued", "cancelled"]
    assert redis_client.zscore(ACTIVE_SET, job_id) is None


def test_a_record_gone_from_redis_is_not_found_even_when_remembered(redis_client, bus):
    store = _store(redis_client, bus)
    job_id = new_job_id("gone")
    store.create_job(new_record(job_id, JobStatus.QUEUED))
    redis_client.delete(record_key(job_id))
    from sandbox.errors import JobNotFound
    with pytest.raises(JobNotFound):
        store.transition(job_id, JobStatus.CREATING)
    assert _statuses(bus, job_id) == ["queued"]


class SlowBus(EventBus):
    """An event bus whose separate publish call lags: an event written after its record's change
    (not in the same step) would then land out of order."""

    def publish(self, job_id: str, event: dict) -> int:
        time.sleep(random.random() * 0.005)
        return super().publish(job_id, event)


@pytest.mark.parametrize("attempt", range(5))
def test_event_seq_order_is_the_order_of_the_record_changes_under_concurrent_transitions(redis_client, attempt):
    # Given: many "processes", each with its own remembered copy, racing to move one job forward
    bus = SlowBus(redis_client, ttl_s=600)
    stores = [_store(redis_client, bus) for _ in range(6)]
    job_id = new_job_id("order")
    stores[0].create_job(new_record(job_id, JobStatus.QUEUED))
    for s in stores:
        s.get(job_id)  # every copy becomes stale as soon as another one writes
    steps = [JobStatus.CREATING, JobStatus.PREPARING, JobStatus.RUNNING, JobStatus.COLLECTING,
             JobStatus.CLEANING, JobStatus.SUCCEEDED]

    def race(i: int) -> None:
        s = stores[i % len(stores)]
        s.update(job_id, lambda r: r["security_events"].append({"n": i}))
        s.transition(job_id, steps[i % len(steps)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(race, range(48)))
    # Then: no change is lost, the events' seqs are 1..n in stream order, and the status events
    # are exactly the record's timeline, in the same order (no event of a write that lost the race)
    record = stores[0].get(job_id)
    assert sorted(e["n"] for e in record["security_events"]) == list(range(48))
    events = _events(bus, job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert _statuses(bus, job_id) == [t["status"] for t in record["timeline"]]
    assert record["status"] == "succeeded"


def test_a_no_op_transition_of_an_ended_job_writes_nothing(redis_client, bus):
    store = _store(redis_client, bus)
    job_id = new_job_id("noop")
    store.create_job(new_record(job_id, JobStatus.QUEUED))
    store.transition(job_id, JobStatus.FAILED)
    raw = redis_client.get(record_key(job_id))
    record = store.transition(job_id, JobStatus.CLEANING, also=lambda r: r.update(touched=True))
    assert record["status"] == "failed" and "touched" not in record
    assert redis_client.get(record_key(job_id)) == raw
    assert _statuses(bus, job_id) == ["queued", "failed"]


def test_the_claim_beside_the_transition_is_taken_once_and_never_for_a_job_not_to_run(redis_client, bus):
    job_id = new_job_id("claim")
    stores = [_store(redis_client, bus) for _ in range(4)]
    stores[0].create_job(new_record(job_id, JobStatus.PREPARING))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: stores[i % 4].transition_and_claim(job_id, JobStatus.RUNNING, f"t-{i}"),
                                range(16)))
    assert [claimed for _r, claimed in results].count(True) == 1
    assert not stores[0].claim_execution(job_id, "late")  # the same key as claim_execution's
    assert _statuses(bus, job_id) == ["preparing", "running"]
    # a job with an outcome (its setup failed) or one that ended is never claimed
    for ending in ({"outcome": {"outcome": "failed"}}, {"status": "cancelled"}):
        other = new_job_id("noclaim")
        stores[0].create_job({**new_record(other, JobStatus.PREPARING), **ending})
        _record, claimed = stores[1].transition_and_claim(other, JobStatus.RUNNING, "t")
        assert not claimed and redis_client.get(claim_key(other)) is None


def test_create_appends_the_first_event_and_finds_a_cancel_that_came_first(redis_client, bus):
    store = _store(redis_client, bus)
    job_id = new_job_id("pre")
    store.precancel(job_id)
    assert store.create_job(new_record(job_id, JobStatus.QUEUED), {"id": job_id}) == "precancelled"
    assert store.create_job(new_record(job_id, JobStatus.QUEUED), {"id": job_id}) == "exists"
    assert _statuses(bus, job_id) == ["queued"]
    assert 0 < redis_client.ttl(events_key(job_id)) <= 600 and 0 < redis_client.ttl(f"{events_key(job_id)}:seq") <= 600
    plain = new_job_id("plain")
    assert store.create_job(new_record(plain, JobStatus.QUEUED), {"id": plain}) == "created"
    # the spec is kept from create: no read for it (the stored one is the same)
    redis_client.delete(f"sandbox:job:{plain}:spec")
    assert store.spec(plain) == {"id": plain}


def test_a_terminal_event_refreshes_the_event_stream_ttl(redis_client, bus):
    store = _store(redis_client, bus)
    job_id = new_job_id("ttl")
    store.create_job(new_record(job_id, JobStatus.QUEUED))
    redis_client.expire(events_key(job_id), 30)
    store.transition(job_id, JobStatus.RUNNING)
    assert redis_client.ttl(events_key(job_id)) <= 30  # a mid-job event leaves the TTL as set
    store.transition(job_id, JobStatus.SUCCEEDED)
    assert 30 < redis_client.ttl(events_key(job_id)) <= 600


@contextmanager
def audit_logger(client: redis.Redis, name: str, flush_delay_s: float) -> Iterator[tuple[logging.Logger, audit.AuditTrail]]:
    """A logger of its own whose lines go only to an AuditTrail on `client`; both closed after."""
    trail = audit.AuditTrail(client, ttl_s=600, flush_delay_s=flush_delay_s)
    logger = logging.getLogger(f"sandbox.audit.{name}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(trail)
    try:
        yield logger, trail
    finally:
        logger.removeHandler(trail)
        trail.close()


def test_audit_lines_are_batched_in_order_and_flushed_for_a_job_on_demand(redis_client):
    with audit_logger(redis_client, "test-batch", flush_delay_s=3600) as (logger, trail):  # no background flush
        job_a, job_b = new_job_id("aud-a"), new_job_id("aud-b")
        for i in range(5):
            logger.info(json.dumps({"op": "put", "job_id": job_a, "n": i}))
        logger.info(json.dumps({"op": "put", "job_id": job_b, "n": 0}))
        assert redis_client.llen(audit.audit_list_key(job_a)) == 0  # waiting in memory
        trail.flush(job_a)
        lines = [json.loads(x) for x in redis_client.lrange(audit.audit_list_key(job_a), 0, -1)]
        assert [x["n"] for x in lines] == list(range(5))
        assert redis_client.llen(audit.audit_list_key(job_b)) == 0  # another job's lines wait
        assert 0 < redis_client.ttl(audit.audit_list_key(job_a)) <= 600
        trail.flush()
        assert redis_client.llen(audit.audit_list_key(job_b)) == 1


def test_audit_lines_reach_redis_without_any_flush_call(redis_client):
    with audit_logger(redis_client, "test-background", flush_delay_s=0.01) as (logger, _trail):
        job_id = new_job_id("aud-bg")
        threads = [threading.Thread(target=lambda i=i: logger.info(json.dumps({"op": "put", "job_id": job_id, "n": i})))
                   for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: redis_client.llen(audit.audit_list_key(job_id)) >= 20, timeout_s=30)
        lines = [json.loads(x)["n"] for x in redis_client.lrange(audit.audit_list_key(job_id), 0, -1)]
        assert sorted(lines) == list(range(20))


class _TriedRedis(redis.Redis):
    """A client that notes when each write was tried: every batch the trail writes opens one pipeline."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.tries_s: list[float] = []

    def pipeline(self, *args: object, **kwargs: object) -> redis.client.Pipeline:
        self.tries_s.append(time.monotonic())
        return super().pipeline(*args, **kwargs)


def test_an_unreachable_redis_is_warned_about_once_and_lines_land_when_it_answers_again(redis_client, caplog):
    from devstack.processes import free_port

    flush_delay_s, tries = 0.01, 6
    # nothing listens there; each try fails at once (redis-py's own retries would take seconds a try)
    down = _TriedRedis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    with audit_logger(down, "test-outage", flush_delay_s=flush_delay_s) as (logger, trail):
        job_id = new_job_id("aud-out")
        with caplog.at_level(logging.WARNING, logger=audit.log.name):
            logger.info(json.dumps({"op": "put", "job_id": job_id, "n": 0}))
            # Given an outage the trail has retried a write of the same line several times
            wait_for(lambda: len(down.tries_s) >= tries, timeout_s=30)
            # Then it warned once for all of them (without the once-per-outage rule: once a try)
            assert sum("could not write" in r.getMessage() for r in caplog.records) == 1
            # and backed off: the wait before try k+1 is at least the doubled retry delay (a sleep
            # never ends early, so this lower bound holds on any machine, however loaded)
            gaps_s = [b - a for a, b in zip(down.tries_s, down.tries_s[1:])]
            assert all(gap_s >= flush_delay_s * 2 ** k for k, gap_s in enumerate(gaps_s[:tries - 1])), gaps_s
            trail.redis = redis_client  # Redis is back
            wait_for(lambda: redis_client.llen(audit.audit_list_key(job_id)) >= 1, timeout_s=30)
        assert [json.loads(x)["n"] for x in redis_client.lrange(audit.audit_list_key(job_id), 0, -1)] == [0]
        assert any("reach Redis again" in r.getMessage() for r in caplog.records)


def _in_child(work) -> int:  # noqa: ANN001 - a callable returning the child's exit code
    """Fork; run `work` in the child and exit with what it returns (never back into pytest)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = work()
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int, timeout_s: float) -> int | None:
    """The child's exit code, or None (and the child killed) if it did not end in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_lines_logged_in_a_forked_child_reach_redis_without_any_flush_call(redis_client):
    # A prefork pool's child inherits the trail but not its flush thread: without a new one there,
    # its lines waited in memory until the child exited (and were lost with os._exit).
    with audit_logger(redis_client, "test-fork", flush_delay_s=0.01) as (logger, _trail):
        job_id = new_job_id("aud-fork")

        def child() -> int:
            logger.info(json.dumps({"op": "put", "job_id": job_id, "n": "child"}))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if redis_client.llen(audit.audit_list_key(job_id)) >= 1:
                    return 0
                time.sleep(0.02)
            return 3

        assert _exit_code(_in_child(child), timeout_s=30) == 0
        assert [json.loads(x)["n"] for x in redis_client.lrange(audit.audit_list_key(job_id), 0, -1)] == ["child"]


class _BlockedInParent:
    """A Redis client whose pipelines' writes wait for `go` in the process that made it (the flush
    thread then holds the trail's write lock), and go straight through in a forked child."""

    def __init__(self, client: redis.Redis) -> None:
        self.client, self.parent, self.go, self.blocked = client, os.getpid(), threading.Event(), threading.Event()

    def pipeline(self, transaction: bool = True):  # noqa: ANN201
        pipe = self.client.pipeline(transaction=transaction)
        if os.getpid() == self.parent:
            execute = pipe.execute

            def execute_when_let_go() -> list:
                self.blocked.set()
                self.go.wait(30)
                return execute()
            pipe.execute = execute_when_let_go
        return pipe


def test_a_child_forked_while_a_batch_is_being_written_neither_hangs_nor_writes_the_parents_lines(redis_client):
    blocked = _BlockedInParent(redis_client)
    with audit_logger(blocked, "test-fork-lock", flush_delay_s=0.01) as (logger, trail):
        parent_job, child_job = new_job_id("aud-fork-p"), new_job_id("aud-fork-c")
        logger.info(json.dumps({"op": "put", "job_id": parent_job, "n": "parent"}))
        assert blocked.blocked.wait(10)  # the flush thread holds the write lock now
        logger.info(json.dumps({"op": "put", "job_id": parent_job, "n": "parent-2"}))  # waits in memory

        def child() -> int:
            logger.info(json.dumps({"op": "put", "job_id": child_job, "n": "child"}))
            trail.flush(child_job)  # the parent's thread holds the lock it inherited: it must not wait for it
            trail.flush()
            return 0

        code = _exit_code(_in_child(child), timeout_s=20)
        blocked.go.set()
        assert code == 0, "the child hung on a lock held by a thread it does not have"
        trail.flush()
        assert [json.loads(x)["n"] for x in redis_client.lrange(audit.audit_list_key(child_job), 0, -1)] == ["child"]
        # the parent's lines once each: the child did not write its copy of them too
        assert [json.loads(x)["n"] for x in redis_client.lrange(audit.audit_list_key(parent_job), 0, -1)] == \
            ["parent", "parent-2"]
