"""The Redis job store: created once per id, forward-only statuses, terminal exactly once, atomic updates."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox.errors import JobNotFound
from sandbox.state import ACTIVE_SET, JobStatus, JobStore, new_record
from tests.conftest import new_job_id


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def publish(self, job_id: str, event: dict) -> None:
        self.events.append((job_id, event))


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client, Recorder())


def test_a_job_id_is_recorded_once(store):
    job_id = new_job_id("once")
    assert store.create(new_record(job_id, JobStatus.QUEUED), {"id": job_id})
    assert not store.create(new_record(job_id, JobStatus.QUEUED), {"id": "other"})
    assert store.spec(job_id) == {"id": job_id}
    assert store.redis.zscore(ACTIVE_SET, job_id) is not None


def test_statuses_move_forward_only_and_terminal_is_final(store):
    job_id = new_job_id("fwd")
    store.create(new_record(job_id, JobStatus.QUEUED))
    store.transition(job_id, JobStatus.RUNNING)
    store.transition(job_id, JobStatus.CREATING)  # a late, redelivered stage cannot move it back
    assert store.get(job_id)["status"] == "running"
    store.transition(job_id, JobStatus.FAILED)
    store.transition(job_id, JobStatus.SUCCEEDED)  # a second terminal status is ignored
    record = store.get(job_id)
    assert record["status"] == "failed" and record["finished_at"] is not None
    assert [t["status"] for t in record["timeline"]] == ["queued", "running", "failed"]
    assert store.redis.zscore(ACTIVE_SET, job_id) is None
    assert [e["status"] for j, e in store.events.events if j == job_id] == ["queued", "running", "failed"]


def test_concurrent_updates_lose_nothing(store):
    job_id = new_job_id("race")
    store.create(new_record(job_id, JobStatus.RUNNING))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.update(job_id, lambda r: r["security_events"].append({"n": i})), range(64)))
    assert sorted(e["n"] for e in store.get(job_id)["security_events"]) == list(range(64))


def test_execution_is_claimed_exactly_once(store):
    job_id = new_job_id("claim")
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: store.claim_execution(job_id, f"task-{i}"), range(8)))
    assert wins.count(True) == 1


def test_unknown_job_is_a_clear_error(store):
    with pytest.raises(JobNotFound):
        store.get("never-submitted")
    assert store.find("never-submitted") is None
