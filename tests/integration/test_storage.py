"""ArtifactStore against a real SeaweedFS S3 server with auth on."""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import time
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import pytest
import requests

from config.settings import Settings, load_settings
from sandbox.errors import ConfigError, StorageError
from sandbox.storage import PART_BYTES, ArtifactStore, retention_from_settings
from tests.support.seaweed import SeaweedServer, seaweed_or_skip


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with seaweed_or_skip(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def _settings(server: SeaweedServer, sse_c_key: str = "", **extra: str) -> Settings:
    settings = load_settings({**server.env(), "SANDBOX_R2_SSE_C_KEY": sse_c_key, **extra})
    if getattr(settings, "r2_sse_c_key", None) != sse_c_key:  # a Settings without the field yet
        object.__setattr__(settings, "r2_sse_c_key", sse_c_key)
    return settings


@pytest.fixture()
def events() -> list[dict]:
    return []


@pytest.fixture()
def store(seaweed: SeaweedServer, events: list[dict]) -> ArtifactStore:
    return ArtifactStore(_settings(seaweed), actor="worker-1", audit=events.append)


class _ShortReads(io.RawIOBase):
    """A non-seekable source that returns at most 100 KiB per read, like a pipe."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001
        n = min(len(buf), 100 * 1024, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class _FailingSource(io.RawIOBase):
    """Gives `good` bytes, then fails like a disk error."""

    def __init__(self, good: int) -> None:
        self._left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001
        if self._left <= 0:
            raise OSError("disk gone")
        n = min(len(buf), self._left)
        buf[:n] = b"z" * n
        self._left -= n
        return n


def test_round_trip_small_and_multipart(store: ArtifactStore, events: list[dict]) -> None:
    small, big = b"hello", os.urandom(2 * PART_BYTES + 12345)
    assert store.upload("jobs/j1/input/small.txt", io.BytesIO(small), "j1") == len(small)
    assert store.upload("jobs/j1/input/big.bin", io.BytesIO(big), "j1", size=len(big)) == len(big)
    with store.open_input("jobs/j1/input/big.bin", "j1") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big).digest()
    with store.open_input("jobs/j1/input/small.txt", "j1") as f:
        assert f.read() == small
    listed = {o["key"]: o["size"] for o in store.list_keys("jobs/j1/")}
    assert listed == {"jobs/j1/input/small.txt": len(small), "jobs/j1/input/big.bin": len(big)}
    assert [e["op"] for e in events] == ["put", "put", "get", "get"]
    assert all(e["outcome"] == "ok" and e["actor"] == "worker-1" and e["job_id"] == "j1" for e in events)
    assert events[1]["size"] == len(big)


def test_unknown_size_short_reads_give_equal_parts(store: ArtifactStore, seaweed: SeaweedServer) -> None:
    # Given a pipe-like source with short reads and no size, parts must still be equal (R2 rule).
    data = os.urandom(2 * PART_BYTES + 777)
    assert store.upload("jobs/j2/output/pipe.bin", io.BufferedReader(_ShortReads(data)), "j2") == len(data)
    client = seaweed.client()
    sizes = [client.head_object(Bucket=seaweed.bucket, Key="jobs/j2/output/pipe.bin", PartNumber=n)["ContentLength"]
             for n in (1, 2, 3)]
    assert sizes == [PART_BYTES, PART_BYTES, 777]


def test_failed_upload_leaves_no_object_and_no_open_upload(store: ArtifactStore, seaweed: SeaweedServer,
                                                             events: list[dict]) -> None:
    with pytest.raises(OSError):
        store.upload("jobs/j3/output/broken.bin", io.BufferedReader(_FailingSource(PART_BYTES + 10)), "j3")
    assert list(store.list_keys("jobs/j3/")) == []
    uploads = seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket).get("Uploads", [])
    assert [u for u in uploads if u["Key"].startswith("jobs/j3/")] == []


def test_size_mismatch_is_refused_without_writing(store: ArtifactStore) -> None:
    with pytest.raises(StorageError, match="expected 10 bytes"):
        store.upload("jobs/j4/output/a", io.BytesIO(b"abc"), "j4", size=10)
    assert list(store.list_keys("jobs/j4/")) == []


def test_missing_key_is_a_clear_storage_error(store: ArtifactStore, events: list[dict]) -> None:
    with pytest.raises(StorageError, match="no such object"):
        store.open_input("jobs/j5/input/nothing", "j5")
    assert events[-1]["op"] == "get" and events[-1]["outcome"] == "error"


@pytest.mark.parametrize("key", ["jobs/other/input/x", "jobs/j6/output/x", "secrets/x", "jobs/j6/input/../../x"])
def test_open_input_refuses_keys_outside_the_jobs_inputs(store: ArtifactStore, key: str) -> None:
    with pytest.raises(StorageError):
        store.open_input(key, "j6")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "a/./b", "a/", "a/b\x00c", "a/b\nc", "x" * 1025, "a/\udc80"])
def test_hostile_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(StorageError):
        store.upload(key, io.BytesIO(b"x"), "j7")


def test_wrong_credentials_are_refused(seaweed: SeaweedServer) -> None:
    bad = ArtifactStore(_settings(seaweed, SANDBOX_CLOUDFLARE_SECRET_KEY="not-the-secret"), actor="w")
    with pytest.raises(StorageError, match="access denied"):
        bad.upload("jobs/j8/output/a", io.BytesIO(b"x"), "j8")
    unknown = ArtifactStore(_settings(seaweed, SANDBOX_CLOUDFLARE_ACCESS_KEY="AKNOBODY"), actor="w")
    with pytest.raises(StorageError, match="access denied"):
        list(unknown.list_keys("jobs/"))
    assert seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix="jobs/j8/").get("KeyCount") == 0


def test_plain_http_is_refused_off_loopback(seaweed: SeaweedServer) -> None:
    with pytest.raises(ConfigError, match="SANDBOX_R2_ENDPOINT"):
        ArtifactStore(_settings(seaweed, SANDBOX_R2_ENDPOINT="http://r2.example.com"), actor="w")


def test_presigned_get_works_and_tampering_or_expiry_is_refused(store: ArtifactStore,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    store.upload("jobs/j9/output/report.txt", io.BytesIO(b"report"), "j9")
    store.upload("jobs/j9/output/other.txt", io.BytesIO(b"other"), "j9")
    with caplog.at_level(logging.DEBUG):
        url = store.presign_get("jobs/j9/output/report.txt", "j9", ttl_s=600)
        short = store.presign_get("jobs/j9/output/report.txt", "j9", ttl_s=1)
    ok = requests.get(url, timeout=10)
    assert ok.status_code == 200 and ok.content == b"report"
    signature = parse_qs(urlparse(url).query)["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for tampered in (url.replace("report.txt", "other.txt"), url.replace(signature, flipped),
                     url.replace("X-Amz-Expires=600", "X-Amz-Expires=6000")):
        assert requests.get(tampered, timeout=10).status_code == 403
    time.sleep(2.5)  # let the 1-second URL lapse; not a timing assertion
    assert requests.get(short, timeout=10).status_code == 403
    # Then: the URLs (and their signatures) appear in no log record, but the presign is audited.
    assert signature not in caplog.text and "X-Amz-Signature" not in caplog.text
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sandbox.audit"]
    assert [a["op"] for a in audits] == ["presign", "presign"] and audits[0]["key"] == "jobs/j9/output/report.txt"


@pytest.mark.parametrize("ttl", [0, 7 * 24 * 3600 + 1])
def test_presign_ttl_outside_one_second_to_seven_days_is_refused(store: ArtifactStore, ttl: int) -> None:
    with pytest.raises(StorageError, match="ttl"):
        store.presign_get("jobs/j9/output/report.txt", "j9", ttl_s=ttl)


def test_sse_c_round_trip_and_wrong_key_fails_clearly(seaweed: SeaweedServer) -> None:
    key_a, key_b = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    enc = ArtifactStore(_settings(seaweed, sse_c_key=key_a), actor="w")
    small, big = b"secret", os.urandom(PART_BYTES + 99)
    for key, data in (("shared/j10-s.txt", small), ("shared/j10-b.bin", big)):
        enc.upload(key, io.BytesIO(data), "j10")
        with enc.open_input(key, "j10") as f:
            assert f.read() == data
    # Without the key the server refuses to serve it: the object really is encrypted at rest.
    plain = ArtifactStore(_settings(seaweed), actor="w")
    with pytest.raises(StorageError, match="SSE-C"):
        plain.open_input("shared/j10-s.txt", "j10")
    wrong = ArtifactStore(_settings(seaweed, sse_c_key=key_b), actor="w")
    for key in ("shared/j10-s.txt", "shared/j10-b.bin"):
        with pytest.raises(StorageError, match="SSE-C key may not match"):
            wrong.open_input(key, "j10")


def test_bad_sse_c_key_setting_names_the_variable(seaweed: SeaweedServer) -> None:
    with pytest.raises(ConfigError, match="SANDBOX_R2_SSE_C_KEY"):
        ArtifactStore(_settings(seaweed, sse_c_key=base64.b64encode(b"short").decode()), actor="w")


def test_retention_sweep_removes_only_what_is_past_retention(seaweed: SeaweedServer, events: list[dict]) -> None:
    store = ArtifactStore(_settings(seaweed, SANDBOX_R2_BUCKET="retention"), actor="w", audit=events.append)
    store.ensure_bucket()
    keys = ["jobs/r1/input/a", "jobs/r1/output/b", "jobs/r1/logs/stdout", "jobs/r2/artifacts/c", "templates/t1"]
    for key in keys:
        store.upload(key, io.BytesIO(b"data"), key.split("/")[1])
    retention = {"input": 7, "output": 30, "logs": 30, "artifacts": 30}
    now = dt.datetime.now(dt.timezone.utc)
    assert store.sweep_expired(retention, now=now + dt.timedelta(days=1)) == 0
    assert store.sweep_expired(retention, now=now + dt.timedelta(days=8)) == 1
    remaining = {o["key"] for o in store.list_keys("")}
    assert "jobs/r1/input/a" not in remaining and set(keys[1:]) <= remaining
    assert store.sweep_expired(retention, now=now + dt.timedelta(days=31)) == 3
    remaining = {o["key"] for o in store.list_keys("")}
    assert "templates/t1" in remaining and not any(k.startswith(("jobs/r1/", "jobs/r2/")) for k in remaining)
    deletes = [e for e in events if e["op"] == "delete"]
    assert {e["key"] for e in deletes} == set(keys[:4]) and {e["job_id"] for e in deletes} == {"r1", "r2"}


def test_lifecycle_rules_are_set_per_prefix(store: ArtifactStore, seaweed: SeaweedServer) -> None:
    store.apply_lifecycle({"input": 7, "output": 30, "logs": 14, "artifacts": 30, "shared": 90})
    rules = {r["ID"]: r for r in seaweed.client().get_bucket_lifecycle_configuration(Bucket=seaweed.bucket)["Rules"]}
    assert rules["jobs"]["Filter"]["Prefix"] == "jobs/" and rules["jobs"]["Expiration"]["Days"] == 30
    assert rules["shared"]["Expiration"]["Days"] == 90
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1


def test_ensure_bucket_creates_a_missing_bucket(seaweed: SeaweedServer) -> None:
    fresh = ArtifactStore(_settings(seaweed, SANDBOX_R2_BUCKET="fresh-bucket"), actor="w")
    fresh.ensure_bucket()
    fresh.ensure_bucket()  # idempotent
    assert fresh.upload("shared/x", io.BytesIO(b"x"), "j") == 1


def test_retention_defaults_until_settings_carry_them(seaweed: SeaweedServer) -> None:
    assert retention_from_settings(_settings(seaweed)) == {"input": 7, "output": 30, "logs": 30, "artifacts": 30}


def test_presigned_upload_urls_are_never_made_for_a_local_sandbox(seaweed: SeaweedServer) -> None:
    local = ArtifactStore(_settings(seaweed, SANDBOX_RUNTIME="local"), actor="w")
    with pytest.raises(StorageError, match="local sandbox"):
        local.presign_put("jobs/j11/output/a", "j11")
    remote = ArtifactStore(dataclasses.replace(_settings(seaweed), runtime="fly"), actor="w")
    with pytest.raises(StorageError, match="outside"):
        remote.presign_put("jobs/j11/input/a", "j11")
    url = remote.presign_put("jobs/j11/output/a", "j11", ttl_s=60)
    assert requests.put(url, data=b"from the machine", timeout=10).status_code == 200
    assert requests.put(url.replace("/j11/output/a", "/j11/output/b"), data=b"x", timeout=10).status_code == 403
    assert seaweed.client().get_object(Bucket=seaweed.bucket, Key="jobs/j11/output/a")["Body"].read() == b"from the machine"


def test_a_forked_worker_builds_its_own_clients(store: ArtifactStore) -> None:
    # Given boto3's client and the direct pool (small PUTs) made in the parent, a socket open; when a
    # worker process forks, it must not reuse their sockets.
    parent, parent_direct = store.client, store.direct
    store.upload("jobs/f1/output/parent", io.BytesIO(b"p"), "f1")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            ok = (store.client is not parent and store.direct is not parent_direct
                  and store.upload("jobs/f1/output/x", io.BytesIO(b"child"), "f1") == 5)
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    assert store.client is parent and store.direct is parent_direct
    assert store.client.get_object(Bucket=store.bucket, Key="jobs/f1/output/x")["Body"].read() == b"child"


def test_an_empty_source_with_skip_empty_stores_nothing_and_audits_nothing(store: ArtifactStore,
                                                                          events: list[dict]) -> None:
    # Given empty sources, seekable and pipe-like, that the caller allows to be skipped
    assert store.upload("jobs/j12/logs/stderr.log", io.BytesIO(b""), "j12", skip_empty=True) == 0
    assert store.upload("jobs/j12/logs/setup-stderr.log", io.BufferedReader(_ShortReads(b"")), "j12",
                        skip_empty=True) == 0
    # Then no object and no audit line (no object was touched); the caller records the emptiness
    assert list(store.list_keys("jobs/j12/")) == [] and events == []
    # Without the flag an empty object is stored as before, and a non-empty one with the flag too
    assert store.upload("jobs/j12/output/empty.txt", io.BytesIO(b""), "j12") == 0
    assert store.upload("jobs/j12/logs/stdout.log", io.BytesIO(b"x"), "j12", skip_empty=True) == 1
    assert {o["key"]: o["size"] for o in store.list_keys("jobs/j12/")} == {
        "jobs/j12/output/empty.txt": 0, "jobs/j12/logs/stdout.log": 1}
    assert [(e["op"], e["key"]) for e in events] == [("put", "jobs/j12/output/empty.txt"),
                                                     ("put", "jobs/j12/logs/stdout.log")]


def test_a_small_put_goes_in_one_request_without_waiting_for_100_continue(store: ArtifactStore,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore asks `Expect: 100-continue` for any file-like body: a round trip more per small object.
    # A small PUT goes through the store's DirectS3 pool; watch what it hands to urllib3.
    pool, sent = store.direct._http, []
    urlopen = pool.urlopen
    monkeypatch.setattr(pool, "urlopen", lambda method, url, **kw: (
        sent.append((method, kw["headers"].get("Expect"), kw["body"])), urlopen(method, url, **kw))[1])
    store.upload("jobs/j13/logs/stdout.log", io.BytesIO(b"one send"), "j13")
    assert sent == [("PUT", None, b"one send")]  # the body in memory goes with the headers, unasked
    body = store.client.get_object(Bucket=store.bucket, Key="jobs/j13/logs/stdout.log")["Body"].read()
    assert body == b"one send"
