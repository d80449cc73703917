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
    for key in ("exchange", "routing_key"):  # (taking it into `unacked` reads both; a restore routes by them)
        if not isinstance(props["delivery_info"].get(key), str):
            return f"envelope has no 'properties.delivery_info.{key}' string"
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


HOLDERS_KEY = "sandbox:unacked:holders"  # delivery tag -> who took it, when, for which queue (JSON)
_holder: dict[str, Any] = {}


def set_holder(node: str, pid: int, since: float, host: str) -> None:
    """Name this process as the holder of the messages it takes from now on (a worker's start-up)."""
    _holder["value"] = {"node": node, "pid": pid, "since": since, "host": host}


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with each unacknowledged message's holder kept beside it."""

    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu's QoS.append (kombu 5.7) with one more field in its transaction. The record carries
        # this take's score in `unacked_index` ("at"): kombu keeps a message's tag when it restores
        # it, so the score is what tells this take from a later one of the same message.
        delivery = message.delivery_info
        now = time.time()
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: now})
            pipe.hset(self.unacked_key, delivery_tag,
                      dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            if "value" in _holder:
                pipe.hset(HOLDERS_KEY, delivery_tag, json.dumps({**_holder["value"], "at": now,
                                                                  "queue": delivery["routing_key"]}))
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


Holder = dict[str, Any]
Read = Callable[[str], Any]


def held(client: redis.Redis, index_key: str = "unacked_index") -> Iterator[tuple[str, Holder | None, bool]]:
    """(delivery tag, its holder record, whether that very take is still unacknowledged) for every
    record: not unacknowledged any more when the message left `unacked` (or was taken again) by a
    path outside this transport. Two round trips, whatever the messages' size."""
    records = [(bytes_to_str(tag), raw) for tag, raw in client.hgetall(HOLDERS_KEY).items()]
    scores = client.zmscore(index_key, [tag for tag, _ in records]) if records else []
    for (tag, raw), score in zip(records, scores):
        holder = _record(raw)
        yield tag, holder, holder is not None and score is not None and score == holder.get("at")


def restore_held(app: Any, gone: Callable[[Holder, Read], bool],
                 watch: Callable[[Holder], tuple[str, ...]] = lambda holder: (),
                 movable: Callable[[Holder], bool] = lambda holder: True) -> list[str]:
    """Give back to their queues, first in line, the unacknowledged messages whose holder is gone;
    the delivery tags restored.

    `gone(holder, read)` judges the process a record names ("node", "pid", "since", "host"), reading
    any Redis key it needs with `read`: once per process, then again for each of its messages inside
    the transaction that gives it back, which WATCHes the keys `watch(holder)` names along with
    `unacked`, its index and the records. So a message is given back only while that very take (the
    record and its index score unchanged) is held by a process judged gone at that moment: never one
    acknowledged, or given back and taken again by a live process, since the records were read.
    `movable(holder)` may keep a message where it is (by its "queue"). The giving back is kombu's
    own (flagged redelivered: the consumer's delivery count sees it). A record whose take is no
    longer unacknowledged is dropped.
    """
    restored = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client, qos = channel.client, channel.qos
        verdicts: dict[tuple, bool] = {}
        for tag, holder, current in held(client, qos.unacked_index_key):
            if holder is None:
                continue
            if current:
                if not movable(holder):
                    continue
                process = tuple(str(holder.get(k)) for k in ("node", "pid", "since", "host"))
                if process not in verdicts:
                    verdicts[process] = gone(holder, client.get)
                if not verdicts[process]:
                    continue
            if _settle(channel, client, qos, tag, holder, gone, watch(holder)):
                restored.append(tag)
    return restored


def _settle(channel: Any, client: redis.Redis, qos: Any, tag: str, holder: Holder,
            gone: Callable[[Holder, Read], bool], watch: tuple[str, ...]) -> bool:
    """In one transaction: give the message back (kombu's QoS.restore_by_tag, kombu 5.7) if the record
    is unchanged, its take still unacknowledged and its holder still gone; or drop a record whose take
    left. True if the message was given back."""
    given: list[bool] = []

    def step(pipe: Any) -> None:
        given.clear()
        if _record(pipe.hget(HOLDERS_KEY, tag)) != holder:
            return  # acknowledged, given back or taken again since it was read
        if pipe.zscore(qos.unacked_index_key, tag) != holder.get("at"):
            pipe.multi()
            pipe.hdel(HOLDERS_KEY, tag)  # this take left `unacked` by a path outside this transport
            return
        entry = pipe.hget(qos.unacked_key, tag)
        if entry is None or not gone(holder, pipe.get):
            return
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        message, exchange, routing_key = loads(bytes_to_str(entry))
        channel._do_restore_message(message, exchange, routing_key, pipe)  # rpush: taken next, as it was
        given.append(True)

    client.transaction(step, qos.unacked_key, qos.unacked_index_key, HOLDERS_KEY, *watch)
    return bool(given)


def _record(raw: Any) -> Holder | None:
    try:
        holder = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


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
