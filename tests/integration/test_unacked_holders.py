"""Which process holds each unacknowledged message, kept beside kombu's `unacked` by the transport
(tasks.transport.QoS) on a real Redis: written when a message is taken, gone by every way out (ack,
reject, restore), and a dead holder's messages given back to their queue at once."""
from __future__ import annotations

import json
import uuid
from typing import Iterator

import pytest
import redis
from celery import Celery

from tasks import transport


@pytest.fixture()
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("holders-test", broker=redis_url)
    app.conf.broker_transport = "tasks.transport:Transport"
    yield app
    transport._holder.clear()


@pytest.fixture()
def queue(app: Celery) -> Iterator[object]:
    with app.connection_for_write() as conn:
        q = conn.SimpleQueue(f"holders-{uuid.uuid4().hex[:8]}")
        yield q
        q.clear()
        q.close()


def holders(client: redis.Redis) -> dict[str, dict]:
    return {tag.decode(): json.loads(raw) for tag, raw in client.hgetall(transport.HOLDERS_KEY).items()}


def take(queue, body: str):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
    queue.put(body)
    message = queue.get(timeout=5)
    assert message.payload == body
    return message


def test_a_taken_message_names_its_holder_until_it_is_acked(app, queue, redis_client) -> None:  # noqa: ANN001
    transport.set_holder("node-a@h", 4242, 1000.0, "host-a")
    message = take(queue, "one")
    record = holders(redis_client)[message.delivery_tag]
    assert record == {"node": "node-a@h", "pid": 4242, "since": 1000.0, "host": "host-a",
                      "at": redis_client.zscore("unacked_index", message.delivery_tag), "queue": queue.queue.name}
    assert redis_client.hexists("unacked", message.delivery_tag)
    message.ack()
    assert message.delivery_tag not in holders(redis_client)
    assert not redis_client.hexists("unacked", message.delivery_tag)


@pytest.mark.parametrize("way", ["reject", "requeue"])
def test_a_rejected_message_leaves_no_holder(app, queue, redis_client, way) -> None:  # noqa: ANN001
    transport.set_holder("node-a@h", 4242, 1000.0, "host-a")
    message = take(queue, way)
    getattr(message, way)()
    assert message.delivery_tag not in holders(redis_client)
    if way == "requeue":
        assert queue.get(timeout=5).payload == "requeue"


def test_a_dead_holders_message_goes_back_to_its_queue_first_in_line_and_flagged(app, queue, redis_client) -> None:  # noqa: ANN001
    transport.set_holder("node-dead@h", 4242, 1000.0, "host-a")
    lost = take(queue, "held by the dead")
    transport.set_holder("node-live@h", 4343, 1000.0, "host-a")
    kept = take(queue, "held by the living")
    queue.put("waiting")

    def dead(holder: dict, read) -> bool:  # noqa: ANN001
        return holder["node"] == "node-dead@h"

    assert transport.restore_held(app, dead) == [lost.delivery_tag]
    assert (lost.delivery_tag not in holders(redis_client) and kept.delivery_tag in holders(redis_client))
    again = queue.get(timeout=5)  # before the one that was waiting: it was taken first
    assert again.payload == "held by the dead" and again.delivery_info.get("redelivered")
    assert queue.get(timeout=5).payload == "waiting"
    # a second pass restores nothing again (never a second copy)
    assert transport.restore_held(app, dead) == []
    kept.ack()


def test_a_holder_record_whose_take_left_unacked_is_dropped_and_no_other(app, queue, redis_client) -> None:  # noqa: ANN001
    # left by a path outside this transport: a worker of an older version acknowledged or restored it
    redis_client.hset(transport.HOLDERS_KEY, "tag-gone", json.dumps({"node": "n", "pid": 1, "since": 0, "host": "h",
                                                                      "at": 1.0, "queue": "q"}))
    transport.set_holder("n", 1, 0, "h")
    live = take(queue, "held")
    assert transport.restore_held(app, lambda holder, read: False) == []
    assert "tag-gone" not in holders(redis_client) and live.delivery_tag in holders(redis_client)
    live.ack()


def test_a_later_take_of_the_same_message_is_not_given_back_for_an_earlier_holder(app, queue, redis_client) -> None:  # noqa: ANN001
    # A worker of an older version took the message again (no record of its own, a new index score):
    # the dead holder's record is about an earlier take and must not move the message.
    transport.set_holder("node-dead@h", 4242, 1000.0, "host-a")
    message = take(queue, "old")
    redis_client.zadd("unacked_index", {message.delivery_tag: 2e9})  # what that later take writes
    assert transport.restore_held(app, lambda holder, read: True) == []
    assert redis_client.hexists("unacked", message.delivery_tag)
    assert message.delivery_tag not in holders(redis_client)  # the stale record went
    message.ack()


def test_a_message_given_back_and_taken_again_meanwhile_is_not_given_back_twice(app, queue, redis_client) -> None:  # noqa: ANN001
    # Two restorers at once (a node's start-up and another node's stuck sweep): the second one read
    # the holders before the first gave the message back and a live process took it again.
    transport.set_holder("node-dead@h", 4242, 1000.0, "host-a")
    lost = take(queue, "raced")
    retaken = []

    def dead(holder: dict, read) -> bool:  # noqa: ANN001
        if holder["node"] != "node-dead@h":
            return False
        if not retaken:  # meanwhile: the other restorer, then a live process takes it again
            with app.connection_for_write() as conn:
                conn.default_channel.qos.restore_by_tag(lost.delivery_tag)
            transport.set_holder("node-live@h", 4343, 1000.0, "host-a")
            retaken.append(queue.get(timeout=5))
        return True

    assert transport.restore_held(app, dead) == []
    assert retaken[0].delivery_tag == lost.delivery_tag and retaken[0].payload == "raced"
    assert holders(redis_client)[lost.delivery_tag]["node"] == "node-live@h"
    assert redis_client.llen(queue.queue.name) == 0  # not queued a second time while the live process runs it
    retaken[0].ack()


def test_a_holder_judged_again_inside_the_step_keeps_its_messages_once_it_is_back(app, queue, redis_client) -> None:  # noqa: ANN001
    # A node whose heartbeat comes back during a pass (Redis back from a restart, a late beat): the
    # judgement read once per process is made again, on WATCHed keys, for each message it gives back.
    transport.set_holder("node-x@h", 7, 1000.0, "host-x")
    first, second = take(queue, "one"), take(queue, "two")
    beat_key = "test:beat:node-x"
    redis_client.delete(beat_key)
    judged: list[bool] = []

    def gone(holder: dict, read) -> bool:  # noqa: ANN001
        verdict = read(beat_key) is None
        judged.append(verdict)
        if verdict and len(judged) == 3:  # (1: the process, 2: the first message, given back)
            redis_client.set(beat_key, b"alive")  # the node beats again while its second one is judged
        return verdict

    restored = transport.restore_held(app, gone, watch=lambda holder: (beat_key,))
    assert len(restored) == 1 and judged == [True, True, True, False]  # (the WATCH made it judge again)
    kept = second if restored == [first.delivery_tag] else first
    assert redis_client.hexists("unacked", kept.delivery_tag) and kept.delivery_tag in holders(redis_client)
    assert queue.get(timeout=5).delivery_tag in restored
    kept.ack()
    redis_client.delete(beat_key)
