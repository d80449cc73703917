"""Webhook delivery under the egress address rule: resolve once, refuse non-global answers, connect to
exactly the checked address, ignore proxy variables, end each attempt at a total deadline."""
from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
from typing import Any, Iterator

import pytest

from sandbox.webhooks import delivery_id_for, deliver
from tests.support.hooks import HookReceiver
from tests.support.services import require_module

SECRET = b"egress-webhook-secret"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
# Plain-http deliveries to a name below skip the URL allow-list (allowed_hosts=None): it would ask
# for https (tested in test_webhooks.py); the address rule is what these tests are about.


class Receiver(HookReceiver):
    """Keeps the Host header and delivery id of every POST; answers from a script (default 204)."""

    def __init__(self, script: list[int] | None = None) -> None:
        super().__init__(lambda post: self.script.pop(0) if self.script else 204)
        self.script = list(script or [])

    @property
    def seen(self) -> list[dict[str, Any]]:
        return [{"host": p.headers["Host"], "delivery_id": json.loads(p.body)["delivery_id"]} for p in self.posts]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def _resolver(*answers: list[str]):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize("answer", [["169.254.169.254"], ["10.1.2.3"], ["127.0.0.1"], ["100.64.0.1"],
                                    ["::ffff:127.0.0.1"], ["93.184.216.34", "10.0.0.1"]])
def test_a_callback_name_resolving_to_an_internal_address_is_never_contacted(receiver: Receiver, answer) -> None:
    log = deliver(f"http://hooks.test:{receiver.port}/h", "job.terminal", {"id": "j"}, SECRET,
                  resolve=_resolver(answer), sleep=lambda s: None)
    assert len(log) == 1 and log[0]["error"].startswith("address_not_global")  # refused, not retried
    assert log[0]["status_code"] is None and receiver.seen == []


def test_delivery_connects_to_the_address_it_checked_with_the_host_header_of_the_url(receiver: Receiver) -> None:
    receiver.script = [500]
    resolve = _resolver(["127.0.0.1"], ["127.0.0.1"])
    log = deliver(f"http://hooks.test:{receiver.port}/h", "job.terminal", {"id": "j"}, SECRET,
                  allow_cidrs=LOOPBACK, resolve=resolve,
                  sleep=lambda s: None, delivery_id=delivery_id_for("job-1", "job.terminal", "terminal"))
    assert [e["status_code"] for e in log] == [500, 204]
    assert [s["host"] for s in receiver.seen] == [f"hooks.test:{receiver.port}"] * 2
    assert resolve.calls == ["hooks.test", "hooks.test"]  # once per attempt, never between check and connect
    assert {s["delivery_id"] for s in receiver.seen} == {delivery_id_for("job-1", "job.terminal", "terminal")}


def test_a_rebinding_name_is_refused_on_the_attempt_that_sees_the_internal_answer(receiver: Receiver) -> None:
    receiver.script = [503]
    log = deliver(f"http://hooks.test:{receiver.port}/h", "job.terminal", {"id": "j"}, SECRET,
                  allow_cidrs=LOOPBACK, resolve=_resolver(["127.0.0.1"], ["169.254.169.254"]), sleep=lambda s: None)
    assert [e["status_code"] for e in log] == [503, None]
    assert log[1]["error"].startswith("address_not_global") and len(receiver.seen) == 1


def test_proxy_variables_in_the_worker_environment_are_ignored(receiver: Receiver, monkeypatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard port: a followed proxy fails
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    log = deliver(f"http://127.0.0.1:{receiver.port}/h", "job.terminal", {"id": "j"}, SECRET,
                  allowed_hosts=(f"127.0.0.1:{receiver.port}",), sleep=lambda s: None)
    assert [e["status_code"] for e in log] == [204]


def test_https_is_verified_for_the_name_while_connecting_to_the_pinned_address(tmp_path) -> None:
    trustme = require_module("trustme", "TLS webhook tests")
    ca = trustme.CA()
    cert = ca.issue_cert("hooks.test")
    server = Receiver()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with server:
        common = dict(allowed_hosts=(f"hooks.test:{server.port}", f"other.test:{server.port}"),
                      allow_cidrs=LOOPBACK, ca_bundle=str(ca_file), sleep=lambda s: None, max_attempts=1)
        ok = deliver(f"https://hooks.test:{server.port}/h", "job.terminal", {"id": "j"}, SECRET,
                     resolve=_resolver(["127.0.0.1"]), **common)
        wrong = deliver(f"https://other.test:{server.port}/h", "job.terminal", {"id": "j"}, SECRET,
                        resolve=_resolver(["127.0.0.1"]), **common)
    assert [e["status_code"] for e in ok] == [204]
    assert wrong[0]["status_code"] is None and "SSLError" in wrong[0]["error"]  # cert is not other.test's


def test_each_attempt_ends_at_its_total_deadline_even_against_a_trickling_receiver() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()
    answer = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000  # a byte every 0.1 s: 100 s in all
    sent = [0]

    def trickle() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        for byte in answer:
            if stop.is_set():
                break
            try:
                conn.send(bytes([byte]))
            except OSError:
                break
            sent[0] += 1
            time.sleep(0.1)  # each read is quick; only a total deadline ends this
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        log = deliver(f"http://127.0.0.1:{port}/h", "job.terminal", {"id": "j"}, SECRET,
                      allowed_hosts=(f"127.0.0.1:{port}",), timeout_s=1.0, max_attempts=1)
        sent_by_then = sent[0]
    finally:
        stop.set()
        listener.close()
    assert log[0]["status_code"] is None and log[0]["error"].startswith("deadline")
    # it gave up while the receiver was still trickling (no clock: a loaded host only sends fewer)
    assert sent_by_then < len(answer), sent_by_then


def test_the_delivery_id_is_derived_from_job_event_and_sequence() -> None:
    a = delivery_id_for("job-1", "job.status", "running@1.5")
    assert a == delivery_id_for("job-1", "job.status", "running@1.5")
    assert len({a, delivery_id_for("job-2", "job.status", "running@1.5"),
                delivery_id_for("job-1", "job.terminal", "running@1.5"),
                delivery_id_for("job-1", "job.status", "running@2.5")}) == 4
