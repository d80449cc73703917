"""Writes a stage retries across a Redis restart (the call ran, its reply was lost) apply once."""
from __future__ import annotations

from unittest import mock

from sandbox.events import EventBus, logs_key
from tests.conftest import new_job_id


def test_a_retried_log_chunk_is_written_once(redis_client):
    bus = EventBus(redis_client)
    job_id = new_job_id("retry")
    real = bus._append_script
    calls = []

    def twice(keys, args):  # noqa: ANN001, ANN202 - what redis-py's retry does after a lost reply
        calls.append(1)
        real(keys=keys, args=args)
        return real(keys=keys, args=args)

    with mock.patch.object(bus, "_append_script", side_effect=twice):
        bus._append(job_id, [("stdout", 1.0, b"started", False)])
    bus._append(job_id, [("stdout", 2.0, b"finished", False)])

    lines = [e[b"line"] for _, e in redis_client.xrange(logs_key(job_id))]
    assert calls and lines == [b"started", b"finished"]
