"""Webhooks end to end over real HTTP: a loopback receiver that verifies every delivery."""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pytest
import requests

from sandbox.errors import JobRejected
from sandbox.webhooks import deliver, headers, sign, verify
from tests.support.hooks import HookReceiver, Post

SECRET = b"integration-secret"


class Receiver(HookReceiver):
    """Verifies signatures, refuses stale or forged ones, keeps each delivery id once."""

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__(self._judge)
        self.fail_first = fail_first
        self.accepted: dict[str, dict[str, Any]] = {}
        self.refused: list[str] = []

    @property
    def requests(self) -> int:
        return len(self.posts)

    def _judge(self, post: Post) -> int:
        if self.requests <= self.fail_first:
            return 500
        try:
            verify(SECRET, post.headers.get("X-Sandbox-Signature", ""), post.body, tolerance_s=300)
        except ValueError as e:
            self.refused.append(str(e))
            return 401
        envelope = json.loads(post.body)
        # The id is taken from the signed body; the header is only a convenience copy.
        delivery_id = envelope["delivery_id"]
        if delivery_id in self.accepted:
            self.refused.append("duplicate delivery")
            return 409
        self.accepted[delivery_id] = envelope
        return 204


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def flaky_receiver() -> Iterator[Receiver]:
    with Receiver(fail_first=1) as server:
        yield server


RECORD = {"id": "job-1", "status": "succeeded", "exit_code": 0,
          "artifacts": [{"key": "jobs/job-1/output/a.txt", "size": 3, "url": "https://r2/x?sig"}]}


def _deliver(url: str, **kwargs: Any) -> list[dict[str, Any]]:
    return deliver(url, "job.terminal", RECORD, SECRET, allowed_hosts=("127.0.0.1",),
                   backoff_initial_s=0.05, backoff_max_s=0.2, **kwargs)


def test_terminal_record_arrives_signed_even_when_the_first_delivery_fails(flaky_receiver):
    log = _deliver(flaky_receiver.url)
    assert [e["status_code"] for e in log] == [500, 204]
    assert log[0]["delivery_id"] == log[1]["delivery_id"]
    (envelope,) = flaky_receiver.accepted.values()
    assert envelope == {"delivery_id": log[0]["delivery_id"], "event": "job.terminal", "data": RECORD}
    assert flaky_receiver.refused == []


def test_every_delivery_gets_its_own_id_and_each_verifies(receiver):
    first, second = _deliver(receiver.url), _deliver(receiver.url)
    assert first[-1]["status_code"] == second[-1]["status_code"] == 204
    assert len(receiver.accepted) == 2 and first[0]["delivery_id"] != second[0]["delivery_id"]


def _post(url: str, body: bytes, header_values: dict[str, str]) -> int:
    return requests.post(url, data=body, headers=header_values, timeout=5).status_code


def test_forged_tampered_and_replayed_deliveries_are_refused(receiver):
    body = json.dumps({"delivery_id": "d-1", "event": "job.terminal", "data": RECORD}).encode()
    forged = headers(b"guessed-secret", "job.terminal", body, "d-1")
    assert _post(receiver.url, body, forged) == 401

    genuine = headers(SECRET, "job.terminal", body, "d-1")
    tampered = body.replace(b"succeeded", b"failed!!!")
    assert _post(receiver.url, tampered, genuine) == 401

    stale_ts = int(time.time()) - 3600  # a capture from an hour ago, replayed now
    stale = {**genuine, "X-Sandbox-Signature": f"t={stale_ts},v1={sign(SECRET, stale_ts, body)}"}
    assert _post(receiver.url, body, stale) == 401
    assert receiver.accepted == {}

    assert _post(receiver.url, body, genuine) == 204
    # A replay inside the window, even under a new header id, carries the signed body id.
    assert _post(receiver.url, body, {**genuine, "X-Sandbox-Delivery": "d-other"}) == 409
    assert list(receiver.accepted) == ["d-1"]
    assert len(receiver.refused) == 4


def test_a_receiver_that_refuses_with_4xx_is_not_retried(receiver):
    log = deliver(receiver.url, "job.status", {"id": "j", "status": "running"}, b"not-the-secret",
                  allowed_hosts=("127.0.0.1",), backoff_initial_s=0.05)
    assert [e["status_code"] for e in log] == [401]
    assert receiver.requests == 1 and receiver.accepted == {}


def test_an_unreachable_receiver_is_retried_then_logged():
    server = HookReceiver()
    url = server.url
    server.server_close()  # the port is now closed: connection refused
    log = _deliver(url, max_attempts=3)
    assert len(log) == 3 and all(e["status_code"] is None and e["error"] for e in log)


def test_loopback_receivers_need_the_allow_list(receiver):
    with pytest.raises(JobRejected):
        deliver(receiver.url, "job.terminal", RECORD, SECRET, allowed_hosts=("hooks.example.com",))
    assert receiver.requests == 0
