"""DirectS3's refusals read as botocore reads them, and the store retries only what is transient (no services)."""
from __future__ import annotations

import base64
import io
from typing import Any

import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.parsers import RestXMLParser
from botocore.retries.quota import RetryQuota
from botocore.retries.standard import (OrRetryChecker, RetryContext, ThrottledRetryableChecker,
                                       ThrottlingStatusCodeChecker, TransientRetryableChecker)

from config.settings import WORKER_HEADROOM_THREADS, load_settings
from sandbox import storage
from sandbox.errors import StorageError, StorageUnavailable
from sandbox.s3direct import _client_error, _pool_manager
from sandbox.storage import ArtifactStore

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your '
             b'request rate.</Message><Resource>/b/k</Resource><RequestId>1</RequestId></Error>')
DENIED = b"<Error><Code>SignatureDoesNotMatch</Code><Message>The signature did not match</Message></Error>"
NO_BUCKET = b"<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>"


@pytest.fixture()
def store() -> ArtifactStore:
    # nothing listens on port 9: building a store and translating errors never calls out
    return ArtifactStore(load_settings({"SANDBOX_R2_ENDPOINT": "http://127.0.0.1:9", "SANDBOX_CLOUDFLARE_ACCESS_KEY": "a",
                                        "SANDBOX_CLOUDFLARE_SECRET_KEY": "b"}), actor="w")


def _refusal(status: int, body: bytes) -> ClientError:
    return _client_error(urllib3.HTTPResponse(body=body, status=status), "PutObject")


@pytest.mark.parametrize("status,body", [(503, SLOW_DOWN), (403, DENIED), (404, NO_BUCKET), (503, b""), (400, b"")])
def test_an_s3_error_body_reads_as_botocore_reads_it(status: int, body: bytes) -> None:
    ours = _refusal(status, body).response
    theirs = RestXMLParser().parse({"body": body, "status_code": status, "headers": {}}, None)
    assert {k: ours["Error"][k] for k in ("Code", "Message")} == {k: theirs["Error"][k] for k in ("Code", "Message")}
    assert ours["ResponseMetadata"]["HTTPStatusCode"] == status


@pytest.mark.parametrize("status,body,error,text", [
    (503, SLOW_DOWN, StorageUnavailable, "put k: object store unavailable (SlowDown)"),
    (500, b"", StorageUnavailable, "put k: object store unavailable (500)"),
    (429, b"<html>busy</html>", StorageUnavailable, "put k: object store unavailable (429)"),
    (403, DENIED, StorageError, "put k: access denied (SignatureDoesNotMatch); check the access key, secret and bucket"),
    (403, b"<html>a proxy's page</html>", StorageError, "put k: access denied (403); check the access key, secret and bucket"),
    (404, NO_BUCKET, StorageError, "put k: no such object or bucket (NoSuchBucket)"),
    (400, b"<Error xmlns='urn:x'><Code>InvalidRequest</Code><Message>no</Message></Error>", StorageError,
     "put k: refused (InvalidRequest: no)"),
])
def test_refusals_become_the_store_errors_boto3_refusals_became(store: ArtifactStore, status: int, body: bytes,
                                                                error: type, text: str) -> None:
    translated = store._translate(_refusal(status, body), "put k")
    assert type(translated) is error and str(translated) == text


@pytest.mark.parametrize("failure,sends", [(_refusal(503, SLOW_DOWN), 4), (urllib3.exceptions.ProtocolError("reset"), 4),
                                           (_refusal(403, DENIED), 1)])
def test_a_small_put_is_re_sent_only_when_the_failure_is_transient(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch,
                                                                   failure: Exception, sends: int) -> None:
    store = ArtifactStore(store._settings, actor="w", max_attempts=4, upload_attempts=1)
    sent: list[int] = []
    waits_s: list[float] = []

    def refuse(*_: Any) -> None:
        sent.append(1)
        raise failure

    monkeypatch.setattr(store.direct, "put", refuse)
    monkeypatch.setattr(storage.time, "sleep", waits_s.append)
    with pytest.raises(StorageUnavailable if sends > 1 else StorageError):
        store.upload("jobs/u1/logs/stdout.log", io.BytesIO(b"x"), "u1")
    assert len(sent) == sends and len(waits_s) == sends - 1
    assert all(0 <= w <= 2.0 ** n for n, w in enumerate(waits_s))  # botocore's random 0..2^(n-1) s


def test_the_pool_takes_botocores_timeouts_ca_bundle_and_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    r2 = "https://acct.r2.cloudflarestorage.com"
    direct = _pool_manager(r2, 30.0)
    assert type(direct) is urllib3.PoolManager
    kw = direct.connection_pool_kw
    assert (kw["timeout"].connect_timeout, kw["timeout"].read_timeout) == (10.0, 30.0)
    assert kw["retries"].total is False and kw["cert_reqs"] == "CERT_REQUIRED" and kw["ca_certs"]
    # an operator's proxy, honoured as boto3 honours it, unless NO_PROXY names the host
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    proxied = _pool_manager(r2, 5.0)
    assert isinstance(proxied, urllib3.ProxyManager) and proxied.proxy.host == "proxy.internal"
    assert proxied.connection_pool_kw["ca_certs"] == "/etc/ssl/private-ca.pem"
    # a proxy's user:password goes in a Proxy-Authorization header, as botocore sends it (not a 407)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.internal:3128")
    authed = _pool_manager(r2, 5.0)
    assert isinstance(authed, urllib3.ProxyManager) and authed.proxy.host == "proxy.internal"
    assert authed.proxy_headers == {"Proxy-Authorization": "Basic " + base64.b64encode(b"user:p@ss").decode()}
    # a proxy without a scheme is http://, as botocore reads it (urllib3 alone raises ProxySchemeUnknown)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")
    bare = _pool_manager(r2, 5.0)
    assert isinstance(bare, urllib3.ProxyManager) and (bare.proxy.scheme, bare.proxy.host) == ("http", "proxy.internal")
    monkeypatch.setenv("NO_PROXY", "r2.cloudflarestorage.com")
    assert type(_pool_manager(r2, 5.0)) is urllib3.PoolManager


def test_the_pool_keeps_a_connection_per_thread_that_may_put(monkeypatch: pytest.MonkeyPatch) -> None:
    # a worker runs node_max_sandboxes + headroom threads: a pool of 10 threw away each extra socket
    settings = load_settings({"SANDBOX_R2_ENDPOINT": "http://127.0.0.1:9", "SANDBOX_CLOUDFLARE_ACCESS_KEY": "a",
                              "SANDBOX_CLOUDFLARE_SECRET_KEY": "pool", "SANDBOX_NODE_MAX_SANDBOXES": "100"})
    kw = ArtifactStore(settings, actor="w").direct._http.connection_pool_kw
    assert kw["maxsize"] == 100 + WORKER_HEADROOM_THREADS and kw["block"] is False


def _error(code: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()


@pytest.mark.parametrize("status,body,retried", [
    (500, b"", True), (502, b"", True), (503, SLOW_DOWN, True), (504, b"", True), (429, b"", True),
    (400, _error("RequestTimeout"), True), (503, _error("SlowDown"), True), (400, _error("Throttling"), True),
    (501, _error("NotImplemented"), False), (505, b"", False), (403, _error("RequestTimeTooSkewed"), False),
    (400, _error("InvalidRequest"), False), (403, DENIED, False),
])
def test_a_failure_is_transient_exactly_when_botocore_standard_mode_re_sends_it(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, status: int, body: bytes, retried: bool) -> None:
    refusal = _refusal(status, body)
    botocore_checks = OrRetryChecker([TransientRetryableChecker(), ThrottledRetryableChecker(),
                                      ThrottlingStatusCodeChecker()])
    context = RetryContext(attempt_number=1, parsed_response=refusal.response,
                           http_response=AWSResponse("https://h/b/k", status, {}, None))
    # RequestTimeTooSkewed: botocore does not re-send it either (its clock would sign the same time)
    assert botocore_checks.is_retryable(context) is retried
    assert isinstance(store._translate(refusal, "put k"), StorageUnavailable) is retried
    store = ArtifactStore(store._settings, actor="w", max_attempts=3, upload_attempts=1)
    sent: list[int] = []

    def refuse(*_: Any) -> None:
        sent.append(1)
        raise refusal

    monkeypatch.setattr(store.direct, "put", refuse)
    monkeypatch.setattr(storage.time, "sleep", lambda _s: None)
    with pytest.raises(StorageUnavailable if retried else StorageError):
        store.upload("jobs/u2/logs/stdout.log", io.BytesIO(b"x"), "u2")
    assert len(sent) == (3 if retried else 1)


@pytest.mark.parametrize("failure,cost", [(_refusal(503, SLOW_DOWN), storage.THROTTLED_RETRY_COST),
                                          (urllib3.exceptions.ProtocolError("reset"), storage.RETRY_COST)])
def test_a_long_outage_spends_the_retry_quota_then_puts_fail_at_their_first_error(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, failure: Exception, cost: int) -> None:
    # botocore's standard mode stops retrying once its quota (500) is spent; _put_small did not:
    # in an outage every PUT of every job waited out all its retries, forever.
    store = ArtifactStore(store._settings, actor="w", max_attempts=2, upload_attempts=1)
    monkeypatch.setattr(store.direct, "retry_quota", RetryQuota())  # this test's own, full
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    sent: list[int] = []
    answer: list[Exception | None] = [failure]

    def put(*_: Any) -> None:
        sent.append(1)
        if answer[0] is not None:
            raise answer[0]

    monkeypatch.setattr(store.direct, "put", put)

    def sends_of_one_upload() -> int:
        before = len(sent)
        try:
            store.upload("jobs/q1/logs/stdout.log", io.BytesIO(b"x"), "q1")
        except StorageUnavailable:
            pass
        return len(sent) - before

    sends = [sends_of_one_upload() for _ in range(RetryQuota.INITIAL_CAPACITY // cost + 5)]
    assert sends == [2] * (RetryQuota.INITIAL_CAPACITY // cost) + [1] * 5
    # the store answers again: each call that needed no retry gives 1 back, until a retry is paid
    answer[0] = None
    spare = RetryQuota.INITIAL_CAPACITY % cost
    for _ in range(cost - spare):
        assert sends_of_one_upload() == 1
    answer[0] = failure
    assert sends_of_one_upload() == 2 and sends_of_one_upload() == 1
