"""lifecycle.submit against real Redis: what is recorded for accepted, duplicate and rejected jobs."""
from __future__ import annotations

import json

import pytest

from config import load_settings
from sandbox import lifecycle
from sandbox.state import JobStore
from tests.conftest import new_job_id


class Bus:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def publish(self, job_id: str, event: dict) -> None:
        self.events.append(event)


@pytest.fixture
def services(redis_client) -> lifecycle.Services:
    settings = load_settings({"SANDBOX_ALLOWED_HOSTS": "example.com", "SANDBOX_ALLOWED_COMMANDS": "ls"})
    bus = Bus()
    return lifecycle.Services(settings=settings, store=JobStore(redis_client, bus), runtime=None, artifacts=None,
                              events=bus, host="test@host")


def test_an_outbound_job_is_accepted_with_an_empty_network_section_until_it_runs(services):
    job = {"id": new_job_id("net"), "command": "ls", "network": {"outbound": True, "allowed_hosts": ["example.com"]}}
    record, run = lifecycle.submit(services, json.dumps(job), "task-1")
    assert run is True
    assert record["security_events"] == [] and record["network"] is None  # the proxy fills it in execute


def test_a_duplicate_id_returns_the_first_record_and_does_not_run(services):
    job = json.dumps({"id": new_job_id("dup"), "command": "ls"})
    first, run_first = lifecycle.submit(services, job, "task-1")
    again, run_again = lifecycle.submit(services, job, "task-2")
    redelivered, run_redelivered = lifecycle.submit(services, job, "task-1")
    assert (run_first, run_again, run_redelivered) == (True, False, True)
    assert again["submit_task_id"] == "task-1"


def test_a_rejection_is_recorded_audited_and_published_as_a_security_event(services, caplog):
    job_id = new_job_id("rej")
    with caplog.at_level("WARNING", logger="sandbox.audit"):
        record, run = lifecycle.submit(services, json.dumps({"id": job_id, "command": "rm -rf /"}), "task-1")
    assert run is False and record["status"] == "rejected"
    assert record["error"]["field"] == "/command" and record["error"]["rule"] == "not_allowed"
    assert services.store.get(job_id)["status"] == "rejected"
    assert services.events.events[-1]["type"] == "security" and services.events.events[-1]["kind"] == "rejected"
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sandbox.audit"]
    assert line["op"] == "reject" and line["job_id"] == job_id and line["field"] == "/command"


def test_a_rejection_never_overwrites_an_earlier_job_with_that_id(services):
    job_id = new_job_id("keep")
    lifecycle.submit(services, json.dumps({"id": job_id, "command": "ls"}), "task-1")
    record, _ = lifecycle.submit(services, json.dumps({"id": job_id, "command": "rm x"}), "task-2")
    assert record["status"] == "rejected"
    assert services.store.get(job_id)["status"] == "queued"


def test_a_finished_job_id_is_never_reused_for_another_job(services, redis_client):
    job_id = new_job_id("tomb")
    job = json.dumps({"id": job_id, "command": "ls"})
    record, run = lifecycle.submit(services, job, "task-1")
    assert run and record["status"] == "queued"
    assert redis_client.ttl(f"sandbox:job:{job_id}:id") > services.settings.tombstone_ttl_s
    redis_client.delete(f"sandbox:job:{job_id}", f"sandbox:job:{job_id}:spec")  # the record expired

    again, run = lifecycle.submit(services, job, "task-2")

    assert not run and again["status"] == "rejected"
    assert again["error"]["field"] == "/id" and again["error"]["rule"] == "reused"


def test_a_redelivered_submit_runs_the_job_once(services, redis_client):
    job = json.dumps({"id": new_job_id("again"), "command": "ls"})
    record, run = lifecycle.submit(services, job, "task-1")
    assert run
    _, run_again = lifecycle.submit(services, job, "task-1")  # died before sending the stages
    assert run_again
    lifecycle.dispatched(services, record["id"])
    _, run_third = lifecycle.submit(services, job, "task-1")  # died after sending them
    assert not run_third


def test_submit_writes_nothing_beside_an_existing_record(services, redis_client):
    job_id = new_job_id("atomic")
    redis_client.set(f"sandbox:job:{job_id}", json.dumps({"status": "queued", "submit_task_id": "x"}))
    _, run = lifecycle.submit(services, json.dumps({"id": job_id, "command": "ls"}), "task-1")
    assert not run
    assert redis_client.get(f"sandbox:job:{job_id}:spec") is None
    assert redis_client.zscore("sandbox:jobs:active", job_id) is None


def test_a_job_cancelled_while_its_submit_waited_ends_cancelled_when_it_arrives(services):
    job_id = new_job_id("early")
    answer = lifecycle.cancel(services, job_id)  # its submit still waits behind busy slots
    assert answer["cancelled"] is False and "if it is submitted later, it ends cancelled" in answer["message"]

    record, run = lifecycle.submit(services, json.dumps({"id": job_id, "command": "ls"}), "task-1")

    assert not run and record["status"] == "cancelled"
    assert record["error"]["message"] == "cancelled before it was accepted"
