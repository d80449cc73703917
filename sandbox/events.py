"""EventBus: live log lines and status/security events of a job, as Redis streams.

Logs and events live in different streams on purpose: a log entry is whatever the job wrote
(escaped and capped), an event is JSON built only here. No line a job prints can become an event.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Iterator

STATUSES = (
    "queued", "creating", "preparing", "running", "collecting", "cleaning",
    "succeeded", "failed", "timed_out", "oom_killed", "cancelled", "rejected", "error",
)
TERMINAL_STATUSES = frozenset(STATUSES[6:])
EVENT_TYPES = ("status", "security")
LOG_STREAMS = ("stdout", "stderr")

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# C0 controls except TAB, DEL, C1 controls, and the bidi/zero-width characters that make a
# terminal or a browser show something other than what was written ("Trojan Source").
_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]}
_ESCAPES.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})
_ESCAPES.update({c: f"\\u{c:04x}" for c in [0x200B, 0x200E, 0x200F, 0x2028, 0x2029,
                                             *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF]})

# One round trip per chunk, atomic per job: assigns seq, enforces the line and byte budget,
# writes the single "log truncated" marker once and drops everything after it.
# A chunk's id makes it apply once: a call retried across a Redis restart (it ran, its reply was
# lost) must not write the lines twice.
# KEYS: stream, meta hash. ARGV: max_lines, max_bytes, ttl_s, maxlen, chunk id, then (stream, ts, line, cut)*
_APPEND_LOGS = """
local max_lines = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local maxlen = ARGV[4]
if redis.call('HGET', KEYS[2], 'chunk') == ARGV[5] then return 0 end
redis.call('HSET', KEYS[2], 'chunk', ARGV[5])
local done = redis.call('HGET', KEYS[2], 'truncated')
local added = 0
for i = 6, #ARGV, 4 do
  if done then
    redis.call('HINCRBY', KEYS[2], 'dropped', 1)
  else
    local line = ARGV[i + 2]
    local lines = redis.call('HINCRBY', KEYS[2], 'lines', 1)
    local bytes = redis.call('HINCRBY', KEYS[2], 'bytes', #line)
    local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
    if lines > max_lines or bytes > max_bytes then
      done = '1'
      redis.call('HSET', KEYS[2], 'truncated', '1')
      redis.call('HINCRBY', KEYS[2], 'dropped', 1)
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'stream', ARGV[i], 'seq', seq,
        'ts', ARGV[i + 1], 'line', '[sandbox] log truncated: later lines were dropped',
        'marker', 'truncated')
    else
      local fields = {'stream', ARGV[i], 'seq', seq, 'ts', ARGV[i + 1], 'line', line}
      if ARGV[i + 3] == '1' then
        table.insert(fields, 'cut')
        table.insert(fields, '1')
      end
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
      added = added + 1
    end
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return added
"""

# The one place an event gets its seq, shared by the scripts that append events (here, and the
# record update in sandbox.state that writes a status change and its event in one step). Seq is
# spliced in here so seq order and stream order agree. The TTLs are set when the stream starts
# (seq 1) and refreshed by a terminal status event (`refresh` = '1'): EXPIRE on every event kept
# nothing longer, since the record's own TTL is fixed at creation.
PUBLISH_LUA_FUNCTION = """
local function publish_event(stream, seq_key, event_without_seq, ttl, maxlen, refresh)
  local seq = redis.call('INCR', seq_key)
  local event = '{"seq":' .. seq .. ',' .. string.sub(event_without_seq, 2)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', event)
  redis.call('PUBLISH', stream, event)
  if seq == 1 or refresh == '1' then
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', seq_key, ttl)
  end
  return seq
end
"""

# KEYS: stream, seq counter. ARGV: the event JSON without seq (starts with '{'), ttl_s, maxlen,
# '1' to refresh the TTLs.
_PUBLISH = PUBLISH_LUA_FUNCTION + """
return publish_event(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"""


def check_job_id(job_id: str) -> str:
    """The id itself, if it cannot change which Redis key it names (no ':' or '*')."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


def logs_key(job_id: str) -> str:
    """Stream of a job's log lines."""
    return f"sandbox:job:{check_job_id(job_id)}:logs"


def events_key(job_id: str) -> str:
    """Stream, and pub/sub channel, of a job's status and security events."""
    return f"sandbox:job:{check_job_id(job_id)}:events"


def escape_line(raw: bytes) -> str:
    """Text safe to print anywhere: invalid UTF-8 replaced, control characters spelled out."""
    return raw.decode("utf-8", "replace").translate(_ESCAPES)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decode_fields(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


def _log_entry(fields: dict[Any, Any]) -> dict[str, Any]:
    raw = _decode_fields(fields)
    entry: dict[str, Any] = {
        "stream": raw.get("stream", ""),
        "seq": int(raw.get("seq", 0)),
        "ts": float(raw.get("ts", 0.0)),
        "line": raw.get("line", ""),
    }
    if raw.get("cut") == "1":
        entry["cut"] = True
    if "marker" in raw:
        entry["marker"] = raw["marker"]
    return entry


class LogSink:
    """Callable(stream, chunk) that turns raw output into capped, escaped log entries."""

    def __init__(self, bus: "EventBus", job_id: str) -> None:
        self._bus = bus
        self._job_id = job_id
        self._partial: dict[str, bytearray] = {s: bytearray() for s in LOG_STREAMS}
        self._skipping: dict[str, bool] = {s: False for s in LOG_STREAMS}
        self.closed = False

    def __call__(self, stream: str, chunk: bytes) -> None:
        """Split `chunk` into lines of `stream`, keeping a trailing partial line for later."""
        if stream not in self._partial:
            raise ValueError(f"unknown log stream {stream!r}")
        if self.closed or not chunk:
            return
        now = time.time()
        *complete, tail = bytes(chunk).split(b"\n")
        lines: list[tuple[str, float, bytes, bool]] = []
        for piece in complete:
            lines += self._take(stream, piece, now, ended=True)
        lines += self._take(stream, tail, now, ended=False)
        self._bus._append(self._job_id, lines)

    def _take(self, stream: str, piece: bytes, now: float, ended: bool) -> list[tuple[str, float, bytes, bool]]:
        # The buffer never grows past max_line_bytes: an over-long line is emitted cut, and the
        # rest of it is skipped until its newline arrives.
        buf, limit = self._partial[stream], self._bus.max_line_bytes
        if self._skipping[stream]:
            self._skipping[stream] = not ended
            return []
        if len(piece) > limit - len(buf):
            buf += piece[: limit - len(buf)]
            line = (stream, now, bytes(buf), True)
            buf.clear()
            self._skipping[stream] = not ended
            return [line]
        buf += piece
        if not ended:
            return []
        line = (stream, now, bytes(buf), False)
        buf.clear()
        return [line]

    def event(self, entry: dict[str, Any]) -> None:
        """Publish one connection-log entry of the egress proxy on the job's event stream."""
        # on the wire as {"type": "security", "kind": "network", ...}: the stream carries two types
        self._bus.publish(self._job_id, {**entry, "type": "network"})

    def close(self) -> None:
        """Flush the last partial line of each stream; later calls are ignored."""
        if self.closed:
            return
        now = time.time()
        lines = [(s, now, bytes(b), False) for s, b in self._partial.items() if b]
        for b in self._partial.values():
            b.clear()
        self.closed = True
        self._bus._append(self._job_id, lines)


class EventBus:
    """Writes and follows the per-job log and event streams in Redis."""

    def __init__(self, redis_client: Any, max_line_bytes: int = 4096, max_stream_len: int = 10_000,
                 ttl_s: int = 7 * 24 * 3600, max_log_bytes: int = 4 * 1024 * 1024,
                 max_events: int = 1000) -> None:
        if max_line_bytes < 16 or max_stream_len < 1 or ttl_s < 1:
            raise ValueError("EventBus limits must be positive (max_line_bytes >= 16)")
        self.redis = redis_client
        self.max_line_bytes = max_line_bytes  # bytes of raw output per line before it is cut
        self.max_stream_len = max_stream_len  # log lines per job, then one truncation marker
        self.max_log_bytes = max_log_bytes  # escaped bytes per job across all lines
        self.max_events = max_events  # approximate cap of the events stream
        self.ttl_s = ttl_s
        self._append_script = redis_client.register_script(_APPEND_LOGS)
        self._publish_script = redis_client.register_script(_PUBLISH)

    @classmethod
    def from_settings(cls, redis_client: Any, settings: Any) -> "EventBus":
        """An EventBus with limits taken from Settings (new settings read with defaults)."""
        return cls(
            redis_client,
            max_line_bytes=getattr(settings, "max_log_line_bytes", 4096),
            max_stream_len=getattr(settings, "max_log_lines", 10_000),
            ttl_s=getattr(settings, "record_ttl_s", 7 * 24 * 3600),
            max_log_bytes=getattr(settings, "max_log_bytes", 4 * 1024 * 1024),
        )

    def log_sink(self, job_id: str) -> LogSink:
        """A sink for the runtime's output of this job; close() it when the command ends."""
        check_job_id(job_id)
        return LogSink(self, job_id)

    def _append(self, job_id: str, lines: list[tuple[str, float, bytes, bool]]) -> None:
        if not lines:
            return
        args: list[Any] = [self.max_stream_len, self.max_log_bytes, self.ttl_s, self.max_stream_len + 100,
                           uuid.uuid4().hex]
        for stream, ts, raw, cut in lines:
            text = escape_line(raw.rstrip(b"\r") if not cut else raw)
            args += [stream, f"{ts:.6f}", text, "1" if cut else "0"]
        meta = f"sandbox:job:{job_id}:logmeta"
        self._append_script(keys=[logs_key(job_id), meta], args=args)

    def publish(self, job_id: str, event: dict[str, Any]) -> int:
        """Add seq/at/job_id to a status or security event, XADD and PUBLISH it; returns seq."""
        keys, args = self.encode(job_id, event)
        return int(self._publish_script(keys=keys, args=args))

    def publish_on(self, pipe: Any, job_id: str, event: dict[str, Any]) -> None:
        """Queue `publish` on `pipe` (inside its MULTI): the event lands with the block's other
        writes, or not at all when the transaction aborts."""
        keys, args = self.encode(job_id, event)
        self._publish_script(keys=keys, args=args, client=pipe)

    def encode(self, job_id: str, event: dict[str, Any]) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of `publish_event` (PUBLISH_LUA_FUNCTION) for this event: a script that
        changes a record can append the record's event in the same atomic step."""
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise ValueError("an event needs a type")
        if kind == "status" and event.get("status") not in STATUSES:
            raise ValueError(f"unknown status {event.get('status')!r}")
        body = {k: v for k, v in event.items() if k not in ("seq", "at", "job_id")}
        if kind not in EVENT_TYPES:
            # Only two types go on the wire; a finer kind ("rejected", "seccomp") is kept beside it.
            body.update(type="security", kind=kind)
        body.update(at=time.time(), job_id=check_job_id(job_id))
        text = json.dumps(body, separators=(",", ":"), allow_nan=False, default=str)
        key = events_key(job_id)
        refresh = "1" if _is_terminal(body) else "0"
        return [key, f"{key}:seq"], [text, self.ttl_s, self.max_events, refresh]

    def read_logs(self, job_id: str, page: int = 500) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every log entry written so far, in order, without blocking (for persisting at collect)."""
        key, start = logs_key(job_id), "-"
        while True:
            rows = self.redis.xrange(key, min=start, max="+", count=page)
            for entry_id, fields in rows:
                yield _text(entry_id), _log_entry(fields)
            if len(rows) < page:
                return
            start = "(" + _text(rows[-1][0])

    def follow_logs(self, job_id: str, last_id: str = "0", block_ms: int = 1000,
                    idle_timeout_s: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Log entries after `last_id` as they arrive, until the job reaches a terminal status."""
        for kind, entry_id, item in self._follow(job_id, last_id, "0", block_ms, idle_timeout_s):
            if kind == "logs":
                yield entry_id, item

    def follow_events(self, job_id: str, last_id: str = "0", block_ms: int = 1000,
                      idle_timeout_s: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Events after `last_id` as they arrive; ends after the terminal status event."""
        ekey = events_key(job_id)
        idle_since = time.monotonic()
        while True:
            rows = self.redis.xread({ekey: last_id}, count=100, block=block_ms)
            if not rows:
                if self._record_is_terminal(job_id) or _idle(idle_since, idle_timeout_s):
                    return
                continue
            idle_since = time.monotonic()
            for _stream, entries in rows:
                for entry_id, fields in entries:
                    last_id = _text(entry_id)
                    event = _event(fields)
                    yield last_id, event
                    if _is_terminal(event):
                        return

    def _record_is_terminal(self, job_id: str) -> bool:
        # A follower that arrives after the events stream expired (or was trimmed) would
        # otherwise block forever; the job record is the truth.
        raw = self.redis.get(f"sandbox:job:{job_id}")
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            return False
        return isinstance(record, dict) and record.get("status") in TERMINAL_STATUSES

    def follow(self, job_id: str, log_id: str = "0", event_id: str = "0", block_ms: int = 1000,
               idle_timeout_s: float | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """("logs"|"events", entry id, item) as they arrive, until the job is terminal."""
        return self._follow(job_id, log_id, event_id, block_ms, idle_timeout_s)

    def _follow(self, job_id: str, log_id: str, event_id: str, block_ms: int,
                idle_timeout_s: float | None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        # Reading both streams in one XREAD lets a log follower notice the terminal event; the
        # log stream is drained once more after it, since the last lines may land just before.
        lkey, ekey = logs_key(job_id), events_key(job_id)
        idle_since = time.monotonic()
        finished = False
        while True:
            rows = self.redis.xread({lkey: log_id, ekey: event_id}, count=500,
                                    block=None if finished else block_ms)
            if finished and not rows:
                return
            if not rows:
                if self._record_is_terminal(job_id):
                    finished = True
                elif _idle(idle_since, idle_timeout_s):
                    return
                continue
            idle_since = time.monotonic()
            for stream, entries in rows:
                is_logs = _text(stream) == lkey
                for entry_id, fields in entries:
                    if is_logs:
                        log_id = _text(entry_id)
                        yield "logs", log_id, _log_entry(fields)
                    else:
                        event_id = _text(entry_id)
                        event = _event(fields)
                        finished = finished or _is_terminal(event)
                        yield "events", event_id, event


def _event(fields: dict[Any, Any]) -> dict[str, Any]:
    raw = _decode_fields(fields).get("event", "{}")
    try:
        value = json.loads(raw)
    except ValueError:
        return {"type": "invalid"}
    return value if isinstance(value, dict) else {"type": "invalid"}


def _idle(since: float, timeout_s: float | None) -> bool:
    return timeout_s is not None and time.monotonic() - since > timeout_s


def _is_terminal(event: dict[str, Any]) -> bool:
    return event.get("type") == "status" and event.get("status") in TERMINAL_STATUSES
