"""Messages no worker can run, moved aside to the Redis list `sandbox.dead` (newest first, capped)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis

DEAD_LIST = "sandbox.dead"
COUNTER = "sandbox:dead:count"  # every dead letter ever recorded, for metrics and health
PREVIEW_BYTES = 2048  # enough to recognise a producer, never a whole (possibly huge) body

log = logging.getLogger("sandbox.deadletters")


def preview(body: Any) -> str:
    """The first bytes of a message body as text, whatever its type."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body[:PREVIEW_BYTES]).decode("utf-8", "backslashreplace")
    text = body if isinstance(body, str) else repr(body)
    return text[:PREVIEW_BYTES]


def push(client: redis.Redis, queue: str, reason: str, body: Any, task: str | None = None,
         task_id: str | None = None, cap: int = 10000) -> dict[str, Any]:
    """Record one dead letter (logged and counted too); never raises, the worker must go on."""
    entry = {"dead_id": f"dl{uuid.uuid4().hex[:16]}", "at": time.time(), "queue": queue, "reason": reason[:1000],
             "task": task if isinstance(task, str) else None,
             "id": task_id if isinstance(task_id, str) else None, "body_preview": preview(body)}
    log.error("dead letter on %s: %s (task %r, id %r)", queue, entry["reason"], entry["task"], entry["id"])
    try:
        pipe = client.pipeline(transaction=True)
        pipe.lpush(DEAD_LIST, json.dumps(entry))
        pipe.ltrim(DEAD_LIST, 0, cap - 1)
        pipe.incr(COUNTER)
        pipe.execute()
    except redis.RedisError:
        log.exception("could not store the dead letter above in %s", DEAD_LIST)
    return entry


def entries(client: redis.Redis, start: int = 0, count: int = 50) -> list[dict[str, Any]]:
    """Dead letters, newest first, from index `start`."""
    raw = client.lrange(DEAD_LIST, start, start + count - 1)
    out = []
    for i, item in enumerate(raw):
        try:
            entry = json.loads(item)
        except ValueError:
            entry = {"reason": "unreadable entry", "body_preview": preview(item)}
        out.append({"index": start + i, **entry})
    return out


# Removes the first entry whose JSON carries this dead_id: by identity, so a letter that arrived
# after the operator listed (LPUSH shifts every index) never makes --drop remove another one.
_DROP_BY_ID = """
local needle = '"dead_id": "' .. ARGV[1] .. '"'
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.find(item, needle, 1, true) then return redis.call('LREM', KEYS[1], 1, item) end
end
return 0
"""


def drop(client: redis.Redis, which: int | str | None = None) -> int:
    """Remove one entry by its dead_id (or, for entries older than ids, its index), or every entry
    with None; returns how many went."""
    if which is None:
        count = client.llen(DEAD_LIST)
        client.delete(DEAD_LIST)
        return int(count)
    if isinstance(which, str) and not which.isdigit():
        if not (which.startswith("dl") and all(c in "0123456789abcdef" for c in which[2:])):
            return 0  # not an id we ever wrote (dl + hex): nothing to match
        return int(client.eval(_DROP_BY_ID, 1, DEAD_LIST, which))
    # LSET a marker then LREM it: removes exactly that position even if equal entries exist.
    marker = f"__dropped__{time.time_ns()}"
    try:
        client.lset(DEAD_LIST, int(which), marker)
    except redis.ResponseError:
        return 0
    return int(client.lrem(DEAD_LIST, 1, marker))


def total(client: redis.Redis) -> int:
    """How many dead letters were ever recorded (the list itself is capped)."""
    return int(client.get(COUNTER) or 0)
