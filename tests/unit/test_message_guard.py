"""The message guards' checks, one malformed envelope or task message at a time (no services)."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from tasks.consumer import Poison, check_message
from tasks.transport import envelope_problem

ROUTED = {"exchange": "", "routing_key": "sandbox"}
GOOD_HEADERS = {"task": "sandbox.submit", "id": "t-1", "retries": 0, "eta": None, "timelimit": [None, None]}
GOOD_BODY = json.dumps([["{}"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def message(headers=GOOD_HEADERS, body=GOOD_BODY, content_type="application/json"):  # noqa: ANN001, ANN201
    return SimpleNamespace(headers=headers, body=body, content_type=content_type)


def check(msg) -> tuple:  # noqa: ANN001
    return check_message(msg, lambda name: name == "sandbox.submit", max_bytes=1024)


def test_a_well_formed_message_passes() -> None:
    assert check(message())[:2] == ("sandbox.submit", "t-1")


@pytest.mark.parametrize(("msg", "why"), [
    (message(headers=None), "not an object"),
    (message(headers={}), "protocol-2"),
    (message(headers={**GOOD_HEADERS, "id": 7}), "'id'"),
    (message(headers={**GOOD_HEADERS, "task": "nope"}), "unknown task"),
    (message(headers={**GOOD_HEADERS, "eta": "soon"}), "'eta'"),
    (message(headers={**GOOD_HEADERS, "retries": -1}), "'retries'"),
    (message(headers={**GOOD_HEADERS, "timelimit": "x"}), "'timelimit'"),
    (message(content_type="application/x-python-serialize"), "content type"),
    (message(body=b"x" * 2000), "SANDBOX_MAX_MESSAGE_BYTES"),
    (message(body=b'{"job": "x"}'), "[args, kwargs, embed]"),
    (message(body=b"[[], {}"), "not JSON"),
    (message(body=b'[[], {}, {"chain": 5}]'), "'chain'"),
])
def test_each_malformed_message_says_why(msg, why) -> None:  # noqa: ANN001
    with pytest.raises(Poison, match=re.escape(why)):
        check(msg)


@pytest.mark.parametrize(("raw", "why"), [
    ([1, 2], "not a message envelope"),
    ({"body": ""}, "'properties'"),
    ({"properties": {"delivery_info": {}}}, "delivery_tag"),
    ({"properties": {"delivery_tag": "t"}}, "delivery_info"),
    ({"properties": {"delivery_tag": "t", "delivery_info": {}}}, "delivery_info.exchange"),
    ({"properties": {"delivery_tag": "t", "delivery_info": {"exchange": ""}}}, "delivery_info.routing_key"),
    ({"properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": 5}}}, "routing_key"),
    ({"properties": {"delivery_tag": "t", "delivery_info": ROUTED, "body_encoding": "rot13"}}, "encoding"),
    ({"body": "%%%", "properties": {"delivery_tag": "t", "delivery_info": ROUTED, "body_encoding": "base64"}}, "base64"),
    ({"body": "", "headers": [], "properties": {"delivery_tag": "t", "delivery_info": ROUTED}}, "headers"),
])
def test_each_broken_envelope_says_why(raw, why) -> None:  # noqa: ANN001
    assert why in (envelope_problem(raw, max_bytes=1024) or "")


def test_a_kombu_envelope_passes() -> None:
    raw = {"body": "W10=", "headers": {}, "content-type": "application/json",
           "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"},
                          "body_encoding": "base64"}}
    assert envelope_problem(raw, max_bytes=1024) is None


def test_every_event_dispatcher_the_consumer_gets_flushes_only_from_the_batch_thread() -> None:
    # Celery's Events step makes a dispatcher (buffer_limit=24) at every (re)connect; 24 waiting
    # events made the sending pool thread publish a batch itself, one PUBLISH per ~24 events.
    from celery.events.dispatcher import EventDispatcher

    from tasks.consumer import EVENT_BUFFER_LIMIT, Consumer

    consumer = Consumer.__new__(Consumer)  # (no broker: only the attribute's setter is under test)
    for _ in range(2):
        consumer.event_dispatcher = EventDispatcher(connection=None, enabled=False)
        assert consumer.event_dispatcher.buffer_limit == EVENT_BUFFER_LIMIT > 24
    consumer.event_dispatcher = None
    assert consumer.event_dispatcher is None
