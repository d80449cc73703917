"""kombu's Redis transport with a guard where a list item becomes a message (`broker_transport`).

kombu turns each item popped from a queue list into a message before Celery sees it: an item that
is not JSON, or whose envelope lacks `properties`/`delivery_tag` or carries a body it cannot decode,
raised inside the connection's read and the worker logged "connection lost" and lost the item.
Here such an item goes to `sandbox.dead` instead; it was never taken into kombu's unacked set, so
dropping it is its acknowledgement. It also keeps a Redis restart from killing the worker (see
Channel._connparams). Everything else is kombu's own code path.

It also records which worker process holds each unacknowledged message (`HOLDERS_KEY`), in the same
transaction that puts the message in kombu's `unacked` set and takes it out: a process SIGKILLed
with messages fetched but not begun (its prefetch, a create waiting for admission) had them
come back only after the visibility timeout (90 min by default). `restore_held` gives a dead
process's messages back at once: at the restarted node's start-up, and in the stuck sweep for a
node whose heartbeat stopped.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from queue import Empty
from typing import Any, Callable, Iterator

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from config import load_settings
from sandbox import deadletters

log = logging.getLogger("sandbox.transport")
_ENCODINGS = (None, "base64", "utf-8")


def envelope_problem(raw: Any, max_bytes: int) -> str | None:
    """Why a decoded queue item is not a message kombu can build, or None if it is one."""
    if not isinstance(raw, dict):
        return f"queue item is JSON {type(raw).__name__}, not a message envelope"
    props = raw.get("properties")
    if not isinstance(props, dict):
        return "envelope has no 'properties' object"
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        return "envelope has no 'properties.delivery_tag'"
    if not isinstance(props.get("delivery_info"), dict):
        return "envelope has no 'properties.delivery_info' object"
    if props.get("body_encoding") not in _ENCODINGS:
        return f"unknown body encoding {str(props.get('body_encoding'))[:50]!r}"
    body = raw.get("body")
    if body is not None and not isinstance(body, str):
        return "envelope body is not a string"
    if body and len(body) > max_bytes * 4 // 3 + 4:
        return f"body exceeds SANDBOX_MAX_MESSAGE_BYTES ({max_bytes})"
    if body and props.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    if raw.get("headers") is not None and not isinstance(raw["headers"], dict):
        return "envelope headers are not an object"
    for key in ("content-type", "content-encoding"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"envelope {key!r} is not a string"
    return None


HOLDERS_KEY = "sandbox:unacked:holders"  # delivery tag -> the process that took it (JSON), beside `unacked`
_holder: dict[str, str] = {}


def set_holder(node: str, pid: int, since: float, host: str) -> None:
    """Name this process as the holder of the messages it takes from now on (a worker's start-up)."""
    _holder["value"] = json.dumps({"node": node, "pid": pid, "since": since, "host": host})


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with each unacknowledged message's holder kept beside it."""

    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu's QoS.append (kombu 5.7) with one more field in its transaction
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag,
                      dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            if "value" in _holder:
                pipe.hset(HOLDERS_KEY, delivery_tag, _holder["value"])
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # every way out of `unacked` (ack, reject, restore) goes through here
        return super()._remove_from_indices(delivery_tag, pipe).hdel(HOLDERS_KEY, delivery_tag)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; a queue item that is not a valid envelope is dead-lettered."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conninfo = self.connection.client

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new redis.Redis object for every publish and ack (its connections come from
        the channel's pool either way), and redis-py 8 builds ~200 response callbacks per object.
        One object per channel is the same pool and state: worker CPU per job -10 %."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool, cached = self.pool, self.__dict__.get("_sandbox_sync_client")
        if cached is None or cached[0] is not pool:  # kombu replaces the pool after a fork
            cached = self.__dict__["_sandbox_sync_client"] = (pool, super()._create_client())
        return cached[1]

    def _connparams(self, asynchronous: bool = False) -> dict:
        # When Redis goes away, Celery's consumer closes the transport (client = None) and then the
        # channel, whose close restores the unacknowledged messages through a new client: kombu
        # then raised AttributeError and the worker died of "Unrecoverable error" on a Redis restart.
        if self.connection.client is None and self._conninfo is not None:
            self.connection.client = self._conninfo
        return super()._connparams(asynchronous)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's _brpop_read (kombu 5.7), with the item checked before it becomes a message
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            raw = self._checked(dest, item)
            if raw is not None:
                self.connection._deliver(raw, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _checked(self, queue: str, item: Any) -> dict | None:
        settings = _settings()
        try:
            raw = json.loads(bytes_to_str(item))
            problem = envelope_problem(raw, settings.max_message_bytes)
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raw, problem = None, f"queue item is not JSON: {e}"
        if problem is None:
            return raw
        headers = raw.get("headers") if isinstance(raw, dict) and isinstance(raw.get("headers"), dict) else {}
        deadletters.push(_client(), queue, problem, item, headers.get("task"), headers.get("id"),
                         cap=settings.dead_letter_max)
        return None


def held(client: redis.Redis, unacked_key: str = "unacked") -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(delivery tag, its holder, its routing key: the queue it goes back to) of every message a
    holder is recorded for; holder None for a record that is no JSON object, queue None for a
    message no longer unacknowledged (a record whose message left by a path outside this transport)."""
    for tag, _, holder, queue in _held(client, unacked_key):
        yield tag, holder, queue


def _held(client: redis.Redis, unacked_key: str) -> Iterator[tuple[str, bytes, dict[str, Any] | None, str | None]]:
    for tag, raw in client.hgetall(HOLDERS_KEY).items():
        tag = bytes_to_str(tag)
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None
        entry = client.hget(unacked_key, tag)
        try:
            queue = loads(bytes_to_str(entry))[2] if entry else None
        except (ValueError, IndexError, TypeError):
            queue = None
        yield tag, raw, holder if isinstance(holder, dict) else None, queue


def restore_held(app: Any, dead: Callable[[dict[str, Any], str], bool]) -> list[str]:
    """Give back to their queues, first in line, the unacknowledged messages whose holder
    `dead(holder, queue)` says is gone; the delivery tags restored. kombu's own restore (the message
    is flagged redelivered: the consumer's delivery count sees it), in one transaction that first
    checks the message is still held by that same holder: one acknowledged, or restored and taken
    again by a live process, since the holders were read is never sent twice."""
    restored = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        for tag, raw, holder, queue in _held(client, channel.unacked_key):
            if queue is None or holder is None:
                if queue is None:  # its message already left `unacked`: only the record is left
                    client.hdel(HOLDERS_KEY, tag)
                continue
            if dead(holder, queue) and _restore_if_held_by(channel, client, tag, raw):
                restored.append(tag)
    return restored


def _restore_if_held_by(channel: Any, client: redis.Redis, tag: str, holder: bytes) -> bool:
    """kombu's QoS.restore_by_tag (kombu 5.7), only while `holder` still holds the message."""
    done: list[str] = []

    def restore(pipe: Any) -> None:
        done.clear()
        if pipe.hget(HOLDERS_KEY, tag) != holder:
            return
        entry = pipe.hget(channel.unacked_key, tag)
        pipe.multi()
        channel.qos._remove_from_indices(tag, pipe)
        if entry:
            message, exchange, routing_key = loads(bytes_to_str(entry))
            channel._do_restore_message(message, exchange, routing_key, pipe)  # rpush: taken next, as it was
            done.append(tag)

    client.transaction(restore, channel.unacked_key, HOLDERS_KEY)
    return bool(done)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the guarded channel."""

    Channel = Channel


_cached: dict[str, Any] = {}


def _client() -> redis.Redis:
    if "r" not in _cached:
        _cached["r"] = redis.Redis.from_url(_settings().redis_url, socket_timeout=5)
    return _cached["r"]


def _settings() -> Any:
    if "s" not in _cached:
        _cached["s"] = load_settings()
    return _cached["s"]
