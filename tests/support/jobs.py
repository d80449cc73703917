"""The client's side of the tests, one copy each: a client Celery app, job ids, waiting, and reading
a job back from Redis (its record, its log lines) as the Node.js API or the CLI would."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import pytest
import redis
from celery import Celery

from sandbox.events import logs_key
from sandbox.state import TERMINAL as _TERMINAL, record_key

TERMINAL = frozenset(status.value for status in _TERMINAL)


def client_app(name: str, redis_url: str) -> Celery:
    """A client-side Celery app, as the Node.js API or the CLI would be: it only sends and waits."""
    app = Celery(name, broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"], task_default_queue="sandbox")
    return app


# Every id this test process made: a check of host-wide state (cgroups are named after job ids)
# tells this run's leftovers from another run's on the same host.
MADE_JOB_IDS: set[str] = set()


def new_job_id(prefix: str = "t") -> str:
    job_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
    MADE_JOB_IDS.add(job_id)
    return job_id


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30, interval_s: float = 0.05) -> Any:
    """Poll until `predicate` returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s} s")


def record_of(client: redis.Redis, job_id: str) -> dict:
    """The job's record as stored now ({} before submit has written it)."""
    return json.loads(client.get(record_key(job_id)) or b"{}")


def wait_terminal(client: redis.Redis, job_id: str, timeout_s: float = 90) -> dict:
    return wait_for(lambda: (r := record_of(client, job_id)).get("status") in TERMINAL and r, timeout_s=timeout_s)


def lines_of(client: redis.Redis, job_id: str, text: bytes) -> int:
    """How many log lines of the job contain `text` (a command that ran twice prints twice)."""
    return sum(text in e.get(b"line", b"") for _, e in client.xrange(logs_key(job_id)))


def normal_job_succeeds(client: Celery, job_id: str | None = None, queue: str | None = None,
                        timeout_s: float = 90) -> dict:
    """The worker (the one consuming `queue`) still runs an ordinary job end to end."""
    job = {"id": job_id or new_job_id("f-after"), "command": "ls"}
    record = client.send_task("sandbox.submit", args=[json.dumps(job)], queue=queue).get(timeout=timeout_s)
    assert record["status"] == "succeeded", record
    return record
