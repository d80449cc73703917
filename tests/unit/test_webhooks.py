"""Webhook signing, verification, callback URL checks and retry classification (no services)."""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
import requests

from sandbox.errors import ConfigError, JobRejected
from sandbox.webhooks import check_callback_url, deliver, headers, options_from, sign, verify

SECRET = b"s3cret-for-tests"


def test_sign_is_hmac_sha256_over_timestamp_dot_body():
    expected = hmac.new(SECRET, b"1700000000.{\"a\":1}", hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, b'{"a":1}') == expected
    assert sign(SECRET, 1700000001, b'{"a":1}') != expected
    assert sign(b"other", 1700000000, b'{"a":1}') != expected


def test_headers_carry_signature_delivery_and_event():
    h = headers(SECRET, "job.terminal", b"{}", "d-1", timestamp=1700000000)
    assert h["X-Sandbox-Signature"] == f"t=1700000000,v1={sign(SECRET, 1700000000, b'{}')}"
    assert h["X-Sandbox-Delivery"] == "d-1" and h["X-Sandbox-Event"] == "job.terminal"
    assert h["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        headers(SECRET, "job.anything", b"{}", "d-1")


def test_verify_accepts_a_fresh_valid_signature_and_rotated_secrets():
    body = b'{"id":"j"}'
    header = headers(SECRET, "job.status", body, "d", timestamp=1000)["X-Sandbox-Signature"]
    assert verify(SECRET, header, body, now=1010) == 1000
    rotated = f"t=1000,v1={sign(b'old', 1000, body)},v1={sign(SECRET, 1000, body)}"
    assert verify(SECRET, rotated, body, now=1000) == 1000


@pytest.mark.parametrize("header,body,now", [
    (f"t=1000,v1={sign(b'wrong', 1000, b'{}')}", b"{}", 1000),           # forged with another key
    (f"t=1000,v1={sign(SECRET, 1000, b'{}')}", b'{"x":1}', 1000),         # body tampered
    (f"t=1001,v1={sign(SECRET, 1000, b'{}')}", b"{}", 1000),              # timestamp changed
    (f"t=1000,v1={sign(SECRET, 1000, b'{}')}", b"{}", 1000 + 301),        # replayed too late
    (f"t=1000,v1={sign(SECRET, 1000, b'{}')}", b"{}", 1000 - 301),        # from the future
    (f"v1={sign(SECRET, 1000, b'{}')}", b"{}", 1000),                    # no timestamp
    ("t=1000,t=1000,v1=00", b"{}", 1000),                               # ambiguous timestamp
    ("t=abc,v1=00", b"{}", 1000),
    ("", b"{}", 1000),
    ("t=1000", b"{}", 1000),                                            # no signature at all
])
def test_verify_refuses_forged_tampered_replayed_and_malformed(header, body, now):
    with pytest.raises(ValueError):
        verify(SECRET, header, body, now=now)


ALLOWED = ("hooks.example.com", "*.partner.io", "127.0.0.1", "localhost:8080", "[::1]", "bad:port")


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/sandbox",
    "https://HOOKS.example.com./x?y=1",
    "https://a.partner.io/x",
    "https://deep.a.partner.io:8443/x",
    "http://127.0.0.1:5000/hook",
    "http://localhost:8080/hook",
    "http://[::1]:9000/",
])
def test_allowed_callback_urls_pass(url):
    check_callback_url(url, ALLOWED)


@pytest.mark.parametrize("url,rule", [
    ("https://evil.com/", "host_not_allowed"),
    ("https://hooks.example.com.evil.com/", "host_not_allowed"),
    ("https://partner.io/", "host_not_allowed"),              # the wildcard covers subdomains only
    ("https://xpartner.io/", "host_not_allowed"),
    ("http://localhost:9999/", "host_not_allowed"),           # listed with another port
    ("http://127.0.0.2/", "host_not_allowed"),
    ("http://2130706433/", "host_not_allowed"),               # 127.0.0.1 in another spelling
    ("http://169.254.169.254/latest/meta-data", "host_not_allowed"),
    ("http://hooks.example.com/", "insecure_scheme"),
    ("https://user:pw@hooks.example.com/", "userinfo"),
    ("https://hooks.example.com@evil.com/", "userinfo"),
    ("ftp://hooks.example.com/", "invalid_url"),
    ("file:///etc/passwd", "invalid_url"),
    ("https://hooks.example.com/a b", "invalid_url"),
    ("https://hooks.example.com\\@evil.com/", "invalid_url"),
    ("https://hooks.example.com/#frag", "invalid_url"),
    ("https://hooks.example.com:99999/", "invalid_url"),
    ("https://hooks.example.com/" + "a" * 3000, "invalid_url"),
    ("https://hööks.example.com/", "invalid_url"),
    ("", "invalid_url"),
])
def test_refused_callback_urls_name_the_field_and_rule(url, rule):
    with pytest.raises(JobRejected) as info:
        check_callback_url(url, ALLOWED)
    assert info.value.field == "/callback_url" and info.value.rule == rule


def test_loopback_is_refused_unless_the_allow_list_names_it():
    with pytest.raises(JobRejected):
        check_callback_url("http://127.0.0.1:5000/", ("hooks.example.com",))
    with pytest.raises(JobRejected):
        check_callback_url("http://localhost/", ())


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code

    def close(self) -> None:
        pass


class _Session:
    """Answers from a script: an int is a status code, an exception is raised."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []

    def post(self, url: str, **kwargs: Any) -> _Response:
        self.calls.append({"url": url, **kwargs})
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return _Response(step)


def _deliver(script: list[Any], **kwargs: Any) -> tuple[list[dict], _Session]:
    session = _Session(script)
    log = deliver("https://hooks.example.com/x", "job.terminal", {"id": "j", "status": "succeeded"},
                  SECRET, session=session, sleep=lambda s: None,
                  resolve=lambda host, port: ["93.184.216.34"], **kwargs)
    return log, session


def test_5xx_and_connection_errors_are_retried_with_one_delivery_id_until_success():
    log, session = _deliver([500, requests.ConnectionError("refused"), 503, 204])
    assert [e["status_code"] for e in log] == [500, None, 503, 204]
    assert [e["attempt"] for e in log] == [1, 2, 3, 4]
    assert log[-1]["error"] is None and "ConnectionError" in log[1]["error"]
    assert len({e["delivery_id"] for e in log}) == 1
    bodies = {c["data"] for c in session.calls}
    assert len(bodies) == 1  # the same signed envelope every time
    envelope = json.loads(bodies.pop())
    assert envelope["delivery_id"] == log[0]["delivery_id"] and envelope["event"] == "job.terminal"
    assert envelope["data"] == {"id": "j", "status": "succeeded"}
    for call in session.calls:
        assert call["allow_redirects"] is False
        assert call["headers"]["X-Sandbox-Delivery"] == log[0]["delivery_id"]
        verify(SECRET, call["headers"]["X-Sandbox-Signature"], call["data"])


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 302])
def test_client_errors_and_redirects_are_not_retried(code):
    log, _ = _deliver([code, 200])
    assert [e["status_code"] for e in log] == [code] and log[0]["error"] == f"HTTP {code}"


@pytest.mark.parametrize("code", [408, 429])
def test_timeout_and_rate_limit_answers_are_retried(code):
    log, _ = _deliver([code, 200])
    assert [e["status_code"] for e in log] == [code, 200]


def test_attempts_stop_at_the_maximum_and_the_failure_is_logged_not_raised():
    log, session = _deliver([500] * 10, max_attempts=3)
    assert len(log) == 3 and len(session.calls) == 3 and all(e["status_code"] == 500 for e in log)


def test_delivery_rechecks_the_allow_list_and_needs_a_secret():
    with pytest.raises(JobRejected):
        _deliver([200], allowed_hosts=("other.example.com",))
    with pytest.raises(ConfigError):
        deliver("https://hooks.example.com/", "job.terminal", {}, b"", session=_Session([200]))


def test_options_from_settings_reads_new_settings_with_defaults():
    class S:
        webhook_allowed_hosts = "a.example.com, b.example.com"
        webhook_max_attempts = 7

    options = options_from(S())
    assert options["allowed_hosts"] == ("a.example.com", "b.example.com")
    assert options["max_attempts"] == 7 and options["timeout_s"] == 5.0
    assert options_from(object())["allowed_hosts"] == ()
