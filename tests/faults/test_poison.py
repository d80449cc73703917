"""Poison messages pushed raw onto a queue list in kombu's envelope: each is dead-lettered and
acknowledged, and the worker goes on serving (before: one such message crash-looped the fleet)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import new_job_id, wait_for
from tests.faults.conftest import assert_host_clean
from tests.support.jobs import normal_job_succeeds
from tests.support.services import ROOT

MAX_MESSAGE_BYTES = 256 * 1024


def envelope(body: bytes, headers: dict | None, content_type: str = "application/json",
             queue: str = "sandbox", **extra: object) -> bytes:
    """A message as kombu's Redis transport stores it on the queue list."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": content_type,
        "headers": headers, **extra,
        "properties": {"correlation_id": str(uuid.uuid4()), "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }).encode()


def task_headers(task: str = "sandbox.submit", **changes: object) -> dict:
    headers = {"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0, "root_id": None,
               "parent_id": None, "group": None, "eta": None, "expires": None, "timelimit": [None, None]}
    headers.update(changes)
    return {k: v for k, v in headers.items() if v != "DROP"}


GOOD_BODY = json.dumps([["{}"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()

POISON = {
    "body is JSON but not a list": envelope(b'{"job": "x"}', task_headers()),
    "headers without id": envelope(GOOD_BODY, task_headers(id="DROP")),
    "unknown task": envelope(GOOD_BODY, task_headers("sandbox.no_such_task")),
    "truncated JSON body": envelope(GOOD_BODY[:25], task_headers()),
    "pickle content type": envelope(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", task_headers(),
                                    content_type="application/x-python-serialize"),
    "oversized body": envelope(b"[[\"" + b"a" * (MAX_MESSAGE_BYTES + 10) + b"\"], {}, {}]", task_headers()),
    "protocol 1 message": envelope(json.dumps({"task": "sandbox.submit", "id": "p1", "args": [], "kwargs": {}}).encode(),
                                   {}),
    "queue item not JSON": b"\xff\xfe not json at all",
    "envelope without properties": json.dumps({"body": "", "headers": task_headers()}).encode(),
    "body not base64": envelope(b"", task_headers()).replace(b'"body": ""', b'"body": "%%%not base64%%%"'),
    "eta not a time": envelope(GOOD_BODY, task_headers(eta="tomorrow-ish")),
    "args not a list": envelope(json.dumps([{"a": 1}, {}, {}]).encode(), task_headers()),
    # taken into `unacked` it raised KeyError after BRPOP: in no list, dead-lettered by nobody
    "delivery_info without routing": envelope(GOOD_BODY, task_headers()).replace(
        b'"delivery_info": {"exchange": "", "routing_key": "sandbox"}', b'"delivery_info": {}'),
}


def test_poison_messages_are_dead_lettered_and_the_worker_keeps_serving(start_worker, fault_client,
                                                                        fault_redis_client, fault_work_dir):
    client = fault_redis_client
    client.delete("sandbox.dead")
    worker = start_worker("fw-poison@host-p", SANDBOX_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES))
    for raw in POISON.values():
        client.lpush("sandbox", raw)

    wait_for(lambda: client.llen("sandbox.dead") >= len(POISON), timeout_s=60)

    assert worker.proc.poll() is None, worker.tail(60)  # the worker's process never went down
    assert fault_client.control.ping(destination=[worker.node], timeout=2)
    assert client.llen("sandbox") == 0 and client.hlen("unacked") == 0  # each taken and acknowledged
    entries = [json.loads(e) for e in client.lrange("sandbox.dead", 0, -1)]
    assert len(entries) == len(POISON), entries
    print("\n".join(e["reason"] for e in entries))
    assert all(e["queue"] == "sandbox" and e["reason"] and "at" in e for e in entries)
    log = worker.tail(2000)
    assert "Unrecoverable error" not in log and "Connection to broker lost" not in log
    # a producer waiting on a dead-lettered task (one with an id) gets the reason, not silence
    unknown_id = json.loads(POISON["unknown task"])["headers"]["id"]
    with pytest.raises(ValueError, match="dead-lettered: unknown task"):
        fault_client.AsyncResult(unknown_id).get(timeout=10)
    normal_job_succeeds(fault_client, new_job_id("f-after-poison"))
    assert_host_clean(fault_work_dir)

    # the operator's view: list, show one, drop one, drop all
    env = {**os.environ, "SANDBOX_REDIS_URL": worker.env["SANDBOX_REDIS_URL"]}
    cli = [sys.executable, "-m", "sandbox", "dead-letters"]
    listed = json.loads(subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, check=True).stdout)
    assert listed["kept"] == len(POISON) and listed["total_recorded"] >= len(POISON)
    shown = json.loads(subprocess.run([*cli, "--show", "0"], env=env, cwd=ROOT, capture_output=True,
                                      check=True).stdout)
    assert shown["reason"] == entries[0]["reason"] and "body_preview" in shown
    dropped = shown["dead_id"]
    subprocess.run([*cli, "--drop", dropped], env=env, cwd=ROOT, check=True, capture_output=True)
    assert client.llen("sandbox.dead") == len(POISON) - 1
    assert dropped not in {json.loads(e)["dead_id"] for e in client.lrange("sandbox.dead", 0, -1)}
    subprocess.run([*cli, "--drop-all"], env=env, cwd=ROOT, check=True, capture_output=True)
    assert client.llen("sandbox.dead") == 0
