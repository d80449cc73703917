"""kombu's Redis transport with a guard where a list item becomes a message (`broker_transport`).

kombu turns each item popped from a queue list into a message before Celery sees it: an item that
is not JSON, or whose envelope lacks `properties`/`delivery_tag` or carries a body it cannot decode,
raised inside the connection's read and the worker logged "connection lost" and lost the item.
Here such an item goes to `sandbox.dead` instead; it was never taken into kombu's unacked set, so
dropping it is its acknowledgement. It also keeps a Redis restart from killing the worker (see
Channel._connparams). Everything else is kombu's own code path.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

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


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; a queue item that is not a valid envelope is dead-lettered."""

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
