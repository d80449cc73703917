"""Every task event a job's stages make reaches the event stream (what Flower and `celery events`
read), though the worker batches them (tasks.consumer: its task-sent events included) into fewer
messages than events."""
from __future__ import annotations

import base64
import json
import threading
from typing import Any, Callable

import redis

from tests.conftest import new_job_id, wait_for

# create runs inside sandbox.submit when the node admits the job at once (as here): no task of its own
STAGES = ("sandbox.prepare", "sandbox.execute", "sandbox.collect", "sandbox.cleanup")


def _events_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    envelope = json.loads(message["data"])
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    events = json.loads(body)
    return events if isinstance(events, list) else [events]


def test_each_stage_sends_all_four_task_events_in_batches(redis_url: str, submit: Callable[..., dict],
                                                          worker: Any) -> None:
    listener = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    listener.psubscribe("*celeryev/task.*")
    wait_for(lambda: listener.get_message(timeout=0.1) is None)  # subscribed, nothing pending
    messages: list[list[dict[str, Any]]] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = listener.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                messages.append(_events_of(message))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        job_id = new_job_id("events")
        assert submit({"id": job_id, "command": "ls"})["status"] == "succeeded"
        # cleanup carries the submit task's id; once its success is in, the job's events are all in
        wait_for(lambda: any(e.get("type") == "task-succeeded" and e.get("result", "").startswith(f"job={job_id} status=")
                             for batch in messages for e in batch), timeout_s=10)
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()

    ids: dict[str, str] = {}  # task id -> stage, from the task-sent events (the worker sends them)
    for batch in messages:
        for event in batch:
            if event.get("type") == "task-sent" and event.get("name") in STAGES and event.get("args") == f"job={job_id}":
                ids[event["uuid"]] = event["name"]
                assert event["hostname"] == worker.node  # sent by the worker, in its own batches
    assert sorted(ids.values()) == sorted(STAGES)
    mine = [(event["type"], ids[event["uuid"]]) for batch in messages for event in batch if event.get("uuid") in ids]
    for stage in STAGES:  # (cleanup's id is the submit task's: its received and started are there too)
        assert {t for t, s in mine if s == stage} == {"task-sent", "task-received", "task-started",
                                                      "task-succeeded"}, stage
    # submit hands its id on to cleanup: the id's one success is cleanup's, with the job's summary
    ends = [e for batch in messages for e in batch
            if e.get("type") == "task-succeeded" and ids.get(e.get("uuid")) == "sandbox.cleanup"]
    assert [e["result"] for e in ends] == [f"job={job_id} status=succeeded exit=0"]
    carrying = [batch for batch in messages if any(event.get("uuid") in ids for event in batch)]
    assert len(carrying) < len(mine)  # batched: fewer PUBLISH than events
