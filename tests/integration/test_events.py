"""EventBus against a real redis-server: log lines, caps, escaping, events, following."""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Iterator

import pytest
import redis

from sandbox.events import EventBus, escape_line, events_key, logs_key


@pytest.fixture(scope="module")
def events_redis_url(redis_url: str) -> str:
    """The harness's real Redis (tests/conftest.py starts it, and fails under CI without it)."""
    return redis_url


@pytest.fixture
def r(events_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(events_redis_url)
    yield client
    client.close()


@pytest.fixture
def job_id() -> str:
    return uuid.uuid4().hex


def _lines(bus: EventBus, job_id: str) -> list[dict]:
    return [entry for _id, entry in bus.read_logs(job_id)]


def test_given_chunks_split_mid_line_when_closed_then_whole_lines_in_order_with_seq(r, job_id):
    bus = EventBus(r)
    sink = bus.log_sink(job_id)
    sink("stdout", b"hel")
    sink("stderr", b"warn")
    sink("stdout", b"lo\nwor")
    sink("stdout", b"ld\r\n")
    sink("stderr", b"ing\nlast-without-newline")
    sink.close()
    got = [(e["stream"], e["line"]) for e in _lines(bus, job_id)]
    assert got == [("stdout", "hello"), ("stdout", "world"), ("stderr", "warning"),
                   ("stderr", "last-without-newline")]
    seqs = [e["seq"] for e in _lines(bus, job_id)]
    assert seqs == [1, 2, 3, 4]
    assert all(isinstance(e["ts"], float) and e["ts"] > 0 for e in _lines(bus, job_id))


def test_control_characters_are_escaped_and_invalid_utf8_replaced(r, job_id):
    bus = EventBus(r)
    sink = bus.log_sink(job_id)
    sink("stdout", b"\x1b[2J\x1b]0;pwned\x07red\rover\x00\x7f\xc2\x9b tab\tok \xe2\x80\xae evil \xff\n")
    sink.close()
    (entry,) = _lines(bus, job_id)
    line = entry["line"]
    assert "\x1b" not in line and "\x07" not in line and "\x00" not in line and "\r" not in line
    assert "\u202e" not in line and "\x9b" not in line and "\x7f" not in line
    assert line.startswith("\\x1b[2J\\x1b]0;pwned\\x07red\\x0dover\\x00\\x7f\\x9b tab\tok \\u202e evil ")
    assert line.endswith("\ufffd")
    assert escape_line("plain ünïcode ✓".encode()) == "plain ünïcode ✓"


def test_an_over_long_line_is_cut_and_its_rest_dropped_while_the_buffer_stays_bounded(r, job_id):
    bus = EventBus(r, max_line_bytes=64)
    sink = bus.log_sink(job_id)
    for _ in range(1000):  # 1 MB without a newline must not grow the sink's buffer
        sink("stdout", b"A" * 1024)
        assert all(len(b) <= 64 for b in sink._partial.values())
    sink("stdout", b"BBB\nnext\n")
    sink.close()
    entries = _lines(bus, job_id)
    assert [e["line"] for e in entries] == ["A" * 64, "next"]
    assert entries[0].get("cut") is True and "cut" not in entries[1]


def test_given_a_line_budget_when_exceeded_then_one_marker_and_later_lines_dropped(r, job_id):
    bus = EventBus(r, max_stream_len=5)
    sink = bus.log_sink(job_id)
    sink("stdout", b"".join(b"line %d\n" % i for i in range(20)))
    sink.close()
    again = bus.log_sink(job_id)  # a second sink (e.g. after a retry) cannot get past the cap
    again("stderr", b"late\n")
    again.close()
    entries = _lines(bus, job_id)
    assert [e["line"] for e in entries[:5]] == [f"line {i}" for i in range(5)]
    assert len(entries) == 6
    assert entries[5]["marker"] == "truncated" and "truncated" in entries[5]["line"]
    assert all("marker" not in e for e in entries[:5])


def test_a_byte_budget_also_ends_the_log(r, job_id):
    bus = EventBus(r, max_log_bytes=100)
    sink = bus.log_sink(job_id)
    sink("stdout", b"x" * 40 + b"\n" + b"y" * 40 + b"\n" + b"z" * 40 + b"\n")
    sink.close()
    entries = _lines(bus, job_id)
    assert [e["line"][0] for e in entries[:2]] == ["x", "y"]
    assert entries[-1].get("marker") == "truncated" and len(entries) == 3


def test_a_job_printing_event_json_never_produces_an_event(r, job_id):
    bus = EventBus(r)
    forged = json.dumps({"type": "status", "status": "succeeded", "seq": 99, "job_id": job_id})
    sink = bus.log_sink(job_id)
    sink("stdout", forged.encode() + b"\n")
    sink("stdout", b"event\n")
    sink.close()
    assert r.xlen(events_key(job_id)) == 0
    assert [e["line"] for e in _lines(bus, job_id)] == [forged, "event"]
    bus.publish(job_id, {"type": "status", "status": "failed"})
    events = [e for _id, e in bus.follow_events(job_id, block_ms=50)]
    assert [(e["type"], e["status"], e["seq"]) for e in events] == [("status", "failed", 1)]


def test_publish_stamps_seq_at_job_id_publishes_and_expires(r, job_id):
    bus = EventBus(r, ttl_s=120)
    pubsub = r.pubsub()
    pubsub.subscribe(events_key(job_id))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    bus.publish(job_id, {"type": "status", "status": "running", "seq": 7, "job_id": "other"})
    bus.publish(job_id, {"type": "security", "detail": {"rule": "seccomp", "syscall": "ptrace"}})
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    published = json.loads(message["data"])
    assert published["seq"] == 1 and published["job_id"] == job_id and published["status"] == "running"
    stored = [e for _id, e in bus.follow_events(job_id, block_ms=50, idle_timeout_s=0.2)]
    assert [e["seq"] for e in stored] == [1, 2]
    assert stored[0] == published
    assert stored[1]["detail"] == {"rule": "seccomp", "syscall": "ptrace"}
    assert 0 < r.ttl(events_key(job_id)) <= 120
    bus.log_sink(job_id)("stdout", b"x\n")
    assert 0 < r.ttl(logs_key(job_id)) <= 120


@pytest.mark.parametrize("event", [{"type": "status", "status": "done"}, {"type": "status"}, {}, {"type": ""}])
def test_publish_refuses_unknown_statuses_and_untyped_events(r, job_id, event):
    with pytest.raises(ValueError):
        EventBus(r).publish(job_id, event)


def test_a_finer_event_kind_goes_out_as_a_security_event(r, job_id):
    bus = EventBus(r)
    bus.publish(job_id, {"type": "security", **{"type": "rejected", "field": "/command"}})
    bus.publish(job_id, {"type": "status", "status": "rejected"})
    kinds = [(e["type"], e.get("kind")) for _id, e in bus.follow_events(job_id, block_ms=50)]
    assert kinds == [("security", "rejected"), ("status", None)]


def test_follow_interleaves_logs_and_events_in_arrival_order(r, job_id):
    bus = EventBus(r)
    bus.publish(job_id, {"type": "status", "status": "running"})
    sink = bus.log_sink(job_id)
    sink("stdout", b"hi\n")
    bus.publish(job_id, {"type": "status", "status": "succeeded"})
    got = [(kind, item.get("line") or item.get("status")) for kind, _id, item in bus.follow(job_id, block_ms=50)]
    assert sorted(got) == sorted([("events", "running"), ("logs", "hi"), ("events", "succeeded")])


@pytest.mark.parametrize("bad", ["a:b", "x*", "", "a" * 65, "j/../k", "ü"])
def test_job_ids_that_could_name_another_key_are_refused(r, bad):
    bus = EventBus(r)
    with pytest.raises(ValueError):
        bus.log_sink(bad)
    with pytest.raises(ValueError):
        bus.publish(bad, {"type": "status", "status": "queued"})


def test_late_follower_gets_everything_and_a_reconnect_resumes_where_it_stopped(r, job_id):
    bus = EventBus(r)
    sink = bus.log_sink(job_id)
    sink("stdout", b"one\ntwo\nthree\n")
    first = bus.follow_logs(job_id, block_ms=50, idle_timeout_s=0.2)
    seen = [next(first), next(first)]
    first.close()
    assert [e["line"] for _id, e in seen] == ["one", "two"]
    sink("stdout", b"four\n")
    sink.close()
    bus.publish(job_id, {"type": "status", "status": "succeeded"})
    rest = list(bus.follow_logs(job_id, last_id=seen[-1][0], block_ms=50))
    assert [e["line"] for _id, e in rest] == ["three", "four"]


def test_live_follower_sees_lines_as_written_and_stops_at_the_terminal_status(r, job_id):
    bus = EventBus(r)
    got: list[str] = []
    follower = threading.Thread(
        target=lambda: got.extend(e["line"] for _id, e in bus.follow_logs(job_id, block_ms=100)))
    follower.start()
    sink = bus.log_sink(job_id)
    bus.publish(job_id, {"type": "status", "status": "running"})
    for i in range(5):
        sink("stdout", b"tick %d\n" % i)
        time.sleep(0.01)
    sink("stderr", b"unterminated")
    sink.close()
    bus.publish(job_id, {"type": "status", "status": "cancelled"})
    follower.join(30)
    assert not follower.is_alive()
    assert got == [f"tick {i}" for i in range(5)] + ["unterminated"]


def test_follow_ends_on_a_terminal_record_even_when_the_events_stream_is_gone(r, job_id):
    bus = EventBus(r)
    sink = bus.log_sink(job_id)
    sink("stdout", b"done\n")
    sink.close()
    r.set(f"sandbox:job:{job_id}", json.dumps({"id": job_id, "status": "timed_out"}))
    assert [e["line"] for _id, e in bus.follow_logs(job_id, block_ms=50)] == ["done"]
    assert list(bus.follow_events(job_id, block_ms=50)) == []
