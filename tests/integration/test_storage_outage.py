"""S3 stopped in the middle of a multipart upload: retried as documented, never a partial object."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from config.settings import load_settings
from sandbox.errors import StorageError, StorageUnavailable
from sandbox.storage import PART_BYTES, ArtifactStore
from tests.support.seaweed import SeaweedServer, seaweed_or_skip

KEY = "jobs/out1/output/big.bin"


@pytest.fixture()
def seaweed(tmp_path: Path) -> Iterator[SeaweedServer]:
    # Each test stops its server, so none is shared.
    with seaweed_or_skip(tmp_path / "seaweed") as server:
        yield server


class _Tripwire(io.BytesIO):
    """A seekable source that runs `trip` once, when the reader first passes `at` bytes."""

    def __init__(self, data: bytes, at: int, trip: Callable[[], None]) -> None:
        super().__init__(data)
        self._at, self._trip, self.tripped = at, trip, False

    def read(self, n: int | None = -1) -> bytes:
        if not self.tripped and self.tell() >= self._at:
            self.tripped = True
            self._trip()
        return super().read(n)


def _visible(server: SeaweedServer, key: str) -> bool:
    found = server.client().list_objects_v2(Bucket=server.bucket, Prefix=key).get("Contents", [])
    return any(o["Key"] == key for o in found)


def test_short_outage_mid_upload_is_retried_and_the_object_is_whole(seaweed: SeaweedServer) -> None:
    events: list[dict] = []
    store = ArtifactStore(load_settings(seaweed.env()), actor="w", audit=events.append,
                          max_attempts=4, upload_attempts=4)
    data = os.urandom(3 * PART_BYTES + 5)
    seen_during_upload: list[bool] = []
    restarter: list[threading.Thread] = []

    def outage() -> None:
        # Given two parts already sent: no object may be visible yet; then S3 goes away for ~1 s.
        seen_during_upload.append(_visible(seaweed, KEY))
        seaweed.stop()
        thread = threading.Timer(1.0, seaweed.start)
        thread.start()
        restarter.append(thread)

    source = _Tripwire(data, at=2 * PART_BYTES, trip=outage)
    try:
        stored = store.upload(KEY, source, "out1", size=len(data))
    finally:
        for thread in restarter:
            thread.join()
    assert source.tripped and seen_during_upload == [False]
    assert stored == len(data)
    body = seaweed.client().get_object(Bucket=seaweed.bucket, Key=KEY)["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()  # nothing lost or doubled
    assert [e["outcome"] for e in events if e["op"] == "put"] == ["ok"]
    # An upload id abandoned while S3 was down is invisible, and the sweep aborts it later.
    store.sweep_expired({}, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2))
    assert seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket).get("Uploads", []) == []


def test_lasting_outage_fails_as_unavailable_and_leaves_no_object(seaweed: SeaweedServer) -> None:
    events: list[dict] = []
    store = ArtifactStore(load_settings(seaweed.env()), actor="w", audit=events.append,
                          max_attempts=2, upload_attempts=2)
    data = os.urandom(2 * PART_BYTES + 5)
    source = _Tripwire(data, at=PART_BYTES, trip=seaweed.stop)
    with pytest.raises(StorageUnavailable):
        store.upload(KEY, source, "out1", size=len(data))
    assert events[-1]["op"] == "put" and events[-1]["outcome"] == "unavailable"
    with pytest.raises(StorageUnavailable):
        store.open_input("jobs/out1/input/x", "out1")
    # When S3 comes back, the failed upload left nothing that looks like an object.
    seaweed.start()
    assert not _visible(seaweed, KEY)
    with pytest.raises(StorageError, match="no such object"):
        ArtifactStore(load_settings(seaweed.env()), actor="w").open_input("shared/none", "out1")
    # And the stage's own retry (what Celery does after StorageUnavailable) then succeeds.
    assert store.upload(KEY, io.BytesIO(data), "out1", size=len(data)) == len(data)
    assert _visible(seaweed, KEY)


def _count_puts(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    direct, calls = store.direct, []
    put = direct.put
    monkeypatch.setattr(direct, "put", lambda *a, **k: (calls.append(1), put(*a, **k))[1])
    return calls


def test_small_put_through_a_short_outage_is_retried_per_call(seaweed: SeaweedServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Given S3 down for about a second when a small object (one request, no multipart) is stored
    events: list[dict] = []
    # one whole-upload attempt: only _put_small's own loop may re-send (tenacity's would pass too);
    # 8 sends wait up to 127 s in all, so the restart is not outwaited by chance
    store = ArtifactStore(load_settings(seaweed.env()), actor="w", audit=events.append, max_attempts=8,
                          upload_attempts=1)
    calls = _count_puts(store, monkeypatch)
    seaweed.stop()
    restart = threading.Timer(1.0, seaweed.start)
    restart.start()
    try:
        stored = store.upload("jobs/out2/logs/stdout.log", io.BytesIO(b"small"), "out2")
    finally:
        restart.join()
    # Then the PUT is re-sent until S3 answers, and the object is there once, whole
    assert stored == 5 and len(calls) > 1
    assert seaweed.client().get_object(Bucket=seaweed.bucket, Key="jobs/out2/logs/stdout.log")["Body"].read() == b"small"
    assert [(e["op"], e["outcome"]) for e in events] == [("put", "ok")]


def test_small_put_attempts_are_max_attempts_per_call_times_upload_attempts(seaweed: SeaweedServer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # As with botocore's retries under tenacity's: each whole-upload attempt gets max_attempts sends.
    events: list[dict] = []
    store = ArtifactStore(load_settings(seaweed.env()), actor="w", audit=events.append,
                          max_attempts=3, upload_attempts=2)
    calls = _count_puts(store, monkeypatch)
    seaweed.stop()
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.upload("jobs/out3/logs/stdout.log", io.BytesIO(b"small"), "out3")
    assert len(calls) == 3 * 2
    assert [(e["op"], e["outcome"]) for e in events] == [("put", "unavailable")]
    seaweed.start()
    assert not _visible(seaweed, "jobs/out3/logs/stdout.log")
