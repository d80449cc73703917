"""Small PUTs and presigned URLs through DirectS3 (botocore's signer on urllib3) against real SeaweedFS.

DirectS3 replaces boto3 for the calls every job makes (issue 10): these tests hold it to what boto3
did: the same signatures, byte for byte; keys stored exactly; refusals and SSE-C as before.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import logging
import os
from typing import Any

import botocore.auth
import pytest
import requests

from config.settings import Settings
from sandbox.errors import StorageError
from sandbox.s3client import sse_headers
from sandbox.storage import ArtifactStore
from tests.integration.test_storage import _settings as store_settings
from tests.integration.test_storage import seaweed  # noqa: F401  (the module's SeaweedFS, a fixture)
from tests.support.seaweed import SeaweedServer

# Names a job may give its outputs: every one must reach the store as exactly this key.
ODD_NAMES = ["a b+c%d~e.txt", "é/ü/😀.log", "q?x=1&y=#frag", "semi;colon,comma:at@bang!", "%2e%2e/%2F/%00",
             "quote'\"back`", "tilde~star*paren()", "brackets[]{}<>|^", "\u202eevil\u200b.txt", "..../...x",
             "\x80c1-control\x9f", "plus+plus%2B", " lead and trail "]
# SeaweedFS stores a backslash as `/` whoever sends it (boto3 too), so it is only in the signing test
SIGNED_NAMES = [*ODD_NAMES, "back\\slash"]


def _settings(server: SeaweedServer, sse_c_key: str = "", **extra: str) -> Settings:
    # presign_put exists only for remote sandboxes
    return dataclasses.replace(store_settings(server, sse_c_key, **extra), runtime="fly")


@pytest.fixture()
def events() -> list[dict]:
    return []


@pytest.fixture()
def store(seaweed: SeaweedServer, events: list[dict]) -> ArtifactStore:
    return ArtifactStore(_settings(seaweed), actor="w", audit=events.append)


def _spy_sends(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every request DirectS3 hands to urllib3, recorded, then really sent."""
    pool, sent = store.direct._http, []
    urlopen = pool.urlopen

    def record(method: str, url: str, **kw: Any) -> Any:
        sent.append({"method": method, "url": url, **kw})
        return urlopen(method, url, **kw)

    monkeypatch.setattr(pool, "urlopen", record)
    return sent


@pytest.mark.parametrize("sse", [False, True])
def test_urls_and_put_signatures_are_those_boto3_makes(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch,
                                                       sse: bool) -> None:
    # Given boto3 and DirectS3 signing at the same instant, with and without SSE-C
    frozen = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)  # the store checks skew
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: frozen)
    key_b64 = base64.b64encode(os.urandom(32)).decode() if sse else ""
    store = ArtifactStore(_settings(seaweed, sse_c_key=key_b64), actor="w")
    boto_sends: list[dict] = []

    def record(request: Any, **_: Any) -> None:
        boto_sends.append({"url": request.url, **request.headers})

    store.client.meta.events.register("before-send.s3", record)  # the process's client: unregistered below
    try:
        _compare_with_boto3(store, boto_sends, _spy_sends(store, monkeypatch))
    finally:
        store.client.meta.events.unregister("before-send.s3", record)


def _compare_with_boto3(store: ArtifactStore, boto_sends: list[dict], direct_sends: list[dict]) -> None:
    for name in SIGNED_NAMES:
        key = f"jobs/d1/output/{name}"
        params = {"Bucket": store.bucket, "Key": key, **store._sse()}
        # Then every presigned URL is the one boto3 would have handed out, character for character
        assert store.presign_get(key, "d1", ttl_s=600) == store.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=600)
        assert store.presign_put(key, "d1", ttl_s=60) == store.client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=60)
        # And a PUT carries the very Authorization, payload hash and SSE-C headers boto3 sends
        store.client.put_object(Body=b"same bytes", **params)
        store.upload(key, io.BytesIO(b"same bytes"), "d1")
        signed = {"Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", *sse_headers(store._sse_key)}
        boto = {h: v.decode() if isinstance(v, bytes) else v for h, v in boto_sends[-1].items() if h in signed}
        direct = {h: v for h, v in direct_sends[-1]["headers"].items() if h in signed}
        assert direct == boto and len(direct) == len(signed)
        assert direct_sends[-1]["url"] == boto_sends[-1]["url"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_are_stored_under_exactly_their_key_and_served_by_their_url(store: ArtifactStore,
                                                                              name: str) -> None:
    key, data = f"jobs/d2/output/{name}", name.encode("utf-8", "surrogateescape") + b"\n"
    assert store.upload(key, io.BytesIO(data), "d2") == len(data)
    assert key in {o["key"] for o in store.list_keys("jobs/d2/output/")}
    assert store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read() == data
    assert requests.get(store.presign_get(key, "d2", ttl_s=60), timeout=10).content == data


def test_a_put_signed_with_a_wrong_secret_is_refused_at_once_and_stores_nothing(
        seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, events: list[dict]) -> None:
    bad = ArtifactStore(_settings(seaweed, SANDBOX_CLOUDFLARE_SECRET_KEY="not-the-secret"), actor="w",
                        audit=events.append)
    sends = _spy_sends(bad, monkeypatch)
    with pytest.raises(StorageError, match="access denied"):
        bad.upload("jobs/d3/output/a", io.BytesIO(b"x"), "d3")
    assert len(sends) == 1  # a refusal is not retried, per call or per upload
    assert [(e["op"], e["outcome"]) for e in events] == [("put", "error")]
    assert seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix="jobs/d3/").get("KeyCount") == 0
    # and a URL presigned with the wrong secret is refused by the store too
    assert requests.get(bad.presign_get("shared/none", "d3", ttl_s=60), timeout=10).status_code == 403


def test_an_sse_c_presigned_get_serves_only_a_holder_of_the_key(seaweed: SeaweedServer) -> None:
    raw = os.urandom(32)
    enc = ArtifactStore(_settings(seaweed, sse_c_key=base64.b64encode(raw).decode()), actor="w")
    enc.upload("jobs/d4/input/s.txt", io.BytesIO(b"sealed"), "d4")
    url = enc.presign_get("jobs/d4/input/s.txt", "d4", ttl_s=60)
    assert requests.get(url, headers=sse_headers(raw), timeout=10).content == b"sealed"
    assert requests.get(url, timeout=10).status_code in (400, 403)
    assert requests.get(url, headers=sse_headers(os.urandom(32)), timeout=10).status_code in (400, 403)
    # the object really is encrypted at rest: boto3 without the key is refused
    plain = ArtifactStore(_settings(seaweed), actor="w")
    with pytest.raises(StorageError, match="SSE-C"):
        plain.open_input("jobs/d4/input/s.txt", "d4")


def test_no_signature_reaches_the_logs(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    sends = _spy_sends(store, monkeypatch)
    gets: list[str] = []  # boto3's own GET: botocore.endpoint logs its prepared headers at DEBUG

    def spy_get(request: Any, **_: Any) -> None:
        value = request.headers["Authorization"]
        gets.append(value.decode() if isinstance(value, bytes) else value)

    store.client.meta.events.register("before-send.s3.GetObject", spy_get)
    try:
        with caplog.at_level(logging.DEBUG):
            store.upload("jobs/d5/logs/stdout.log", io.BytesIO(b"out"), "d5")
            store.upload("jobs/d5/input/in.txt", io.BytesIO(b"in"), "d5")
            url = store.presign_get("jobs/d5/logs/stdout.log", "d5")
            assert store.open_input("jobs/d5/input/in.txt", "d5").read() == b"in"
    finally:
        store.client.meta.events.unregister("before-send.s3.GetObject", spy_get)
    put_signature = sends[-1]["headers"]["Authorization"].rsplit("Signature=", 1)[1]
    get_signature = gets[-1].rsplit("Signature=", 1)[1]
    url_signature = url.rsplit("X-Amz-Signature=", 1)[1]
    assert "botocore.auth" in {r.name for r in caplog.records}  # the signer did log, at DEBUG
    assert "botocore.endpoint" in {r.name for r in caplog.records}  # and so did the sender
    assert put_signature not in caplog.text and url_signature not in caplog.text
    assert get_signature not in caplog.text
    assert "X-Amz-Signature" not in caplog.text


def test_no_sse_c_key_reaches_the_logs(seaweed: SeaweedServer, caplog: pytest.LogCaptureFixture) -> None:
    # Given an SSE-C store, when boto3 (a GET) and DirectS3 (a PUT) send the key at DEBUG, then no
    # log line shows it: botocore prints a request's params and canonical request at DEBUG.
    key_b64 = base64.b64encode(os.urandom(32)).decode()
    store = ArtifactStore(_settings(seaweed, sse_c_key=key_b64), actor="w")
    with caplog.at_level(logging.DEBUG):
        store.upload("jobs/d7/input/secret.txt", io.BytesIO(b"sealed"), "d7")
        assert store.open_input("jobs/d7/input/secret.txt", "d7").read() == b"sealed"
    assert "botocore.auth" in {r.name for r in caplog.records}  # botocore did sign the GET, logging at DEBUG
    assert key_b64 not in caplog.text and key_b64.lower() not in caplog.text.lower()
