"""The delivery guard counts only redeliveries (tasks.consumer): every way kombu's Redis transport
hands a message back — a Reject with requeue, a channel closed with the message unacknowledged (a
warm shutdown, a lost connection), the visibility-timeout restore after a worker died — must flag
it `redelivered`, and a first delivery must not be. Real Redis, kombu's own transport."""
from __future__ import annotations

import time
import uuid
from typing import Iterator

import pytest
from kombu import Connection, Queue

from tasks.consumer import _redelivered


@pytest.fixture()
def queue_name() -> str:
    return f"redelivery-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def connect(redis_url: str) -> Iterator:
    opened: list[Connection] = []

    def make(**options: float) -> Connection:
        conn = Connection(redis_url, transport_options=options)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.release()


def _publish(conn: Connection, queue: str) -> None:
    conn.SimpleQueue(queue).put({"n": 1}, headers={"task": "sandbox.prepare", "id": "t-1"})


def _get(conn: Connection, queue: str):  # noqa: ANN202
    return conn.SimpleQueue(queue, no_ack=False).get(timeout=5)


def test_a_first_delivery_is_not_flagged(connect, queue_name: str) -> None:
    conn = connect()
    _publish(conn, queue_name)
    message = _get(conn, queue_name)
    assert not _redelivered(message)
    message.ack()


def test_a_requeued_reject_comes_back_flagged(connect, queue_name: str) -> None:
    conn = connect()
    _publish(conn, queue_name)
    _get(conn, queue_name).reject(requeue=True)
    again = _get(conn, queue_name)
    assert _redelivered(again) and again.headers["redelivered"] is True
    again.ack()


def test_a_closed_channel_gives_its_unacknowledged_message_back_flagged(connect, queue_name: str) -> None:
    first = connect()
    _publish(first, queue_name)
    message = _get(first, queue_name)
    assert not _redelivered(message)
    first.release()  # what a warm shutdown or a lost connection does with what it holds
    again = _get(connect(), queue_name)
    assert _redelivered(again)
    again.ack()


def test_the_visibility_restore_flags_a_dead_workers_message(connect, queue_name: str) -> None:
    dead = connect(visibility_timeout=0.2)
    _publish(dead, queue_name)
    held = _get(dead, queue_name)
    held.channel.qos._delivered.clear()  # a SIGKILLed worker never closes its channel
    time.sleep(0.4)
    survivor = connect(visibility_timeout=0.2)
    channel = survivor.default_channel
    channel.qos.restore_visible(interval=1)
    again = _get(survivor, queue_name)
    assert _redelivered(again)
    again.ack()
